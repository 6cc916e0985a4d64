"""RL's costs, measured side by side in one run, and how fast a finished speedrun knows it is finished.

    python -m scripts.bench_rl [--depth 4] [--samples 16] [--new_tokens 128] [--rounds 3]

Rollouts: one group of --samples completions of --new_tokens tokens from one prompt, three ways, interleaved
round by round: batched with the KV cache (what chat_rl does: one prefill, then one forward per token for the whole
group), one sample at a time with the cache, and one at a time without it (GPT.generate: the whole context again
at every token). Sampled tokens/s for each, and the ratios.
An RL step: the same group sampled, then trained on (forward and backward of the policy-gradient loss), timed
apart: the share of the step spent sampling.
Speedrun rerun: the tiny pipeline (depth 1, built-in data) run once, then run again: the seconds the second run
takes to decide that nothing is left to do (target: under 5 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import OptimConfig, Optimizers
from nanochat.rl import pg_loss, rollout
from nanochat.tasks import get_task
from nanochat.tokenizer import Tokenizer
from scripts.bench_chat import prepare

SPEEDRUN_TOML = """
[tokenizer]
vocab_size = {vocab}
[base]
head_dim = 32
max_seq_len = 128
device_batch_size = 4
total_batch_size = -1
num_iterations = 10
eval_every = -1
eval_tokens = 512
sample_every = -1
[mid]
device_batch_size = 2
total_batch_size = 512
num_iterations = 4
eval_every = -1
eval_tokens = 256
task_size = 200
[sft]
device_batch_size = 2
total_batch_size = 512
num_iterations = 4
eval_every = -1
eval_tokens = 256
task_size = 200
[rl]
num_iterations = 2
prompts_per_step = 1
num_samples = 2
device_batch_size = 2
max_new_tokens = 8
tasks = "choice"
task_size = 200
eval_every = -1
eval_problems = 2
pass_k = 1
[eval]
tasks = "choice"
max_problems = 2
max_tokens = 8
"""


def random_model(depth: int, tokenizer: Tokenizer) -> GPT:
    """An untrained model with random output projections (zero ones would make every position alike)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, tokenizer.vocab_size, 1024, head_dim=64))
    model.init_weights(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


def full_length(engine: Engine) -> Engine:
    """The engine with no stop token and no tool: every sample runs --new_tokens long, so the arms compare like for
    like (an untrained model would otherwise end samples at random points)."""
    engine.stop, engine.python_start = set(), -1
    return engine


def rollouts(args: argparse.Namespace, model: GPT, engine: Engine, prompt: list[int]) -> dict[str, float]:
    """Seconds per group, median over rounds, for the three ways of sampling it."""
    n, new = args.samples, args.new_tokens
    times: dict[str, list[float]] = {
        "batched, KV cache": [],
        "one at a time, KV cache": [],
        "one at a time, no cache": [],
    }
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        tokens, _, _ = rollout(engine, prompt, n, new, 1.0, 50, seed=0)
        times["batched, KV cache"].append(time.perf_counter() - t0)
        assert sum(map(len, tokens)) == n * new, "a sample ended early: the timing would not compare like for like"
        t0 = time.perf_counter()
        for i in range(n):
            rollout(engine, prompt, 1, new, 1.0, 50, seed=i)
        times["one at a time, KV cache"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            with torch.no_grad():
                model.generate(prompt, new, temperature=1.0, seed=i)
        times["one at a time, no cache"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rl_step(args: argparse.Namespace, model: GPT, engine: Engine, prompt: list[int]) -> tuple[float, float]:
    """(sampling, training) seconds of one RL step on one group, median over rounds."""
    optimizers = Optimizers(model, OptimConfig(0.01, 0.0002, 0.001, 0.0), 0, 1)
    sampling, training = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        tokens, masks, _ = rollout(engine, prompt, args.samples, args.new_tokens, 1.0, 50, seed=r)
        t1 = time.perf_counter()
        rows = [prompt + t for t in tokens]
        T = max(map(len, rows)) - 1
        x = torch.tensor([row[:-1] + [0] * (T + 1 - len(row)) for row in rows])
        y = torch.tensor([[-1] * (len(prompt) - 1) + t + [-1] * (T + 1 - len(prompt) - len(t)) for t in tokens])
        advantages = torch.randn(args.samples)
        for start in range(0, args.samples, args.batch):  # micro-batches, as chat_rl's --device_batch_size
            part = slice(start, start + args.batch)
            (pg_loss(model, (x[part], y[part], advantages[part])) * args.batch / args.samples).backward()
        optimizers.step(1.0, 0.95)
        optimizers.zero_grad()
        sampling.append(t1 - t0)
        training.append(time.perf_counter() - t1)
    return statistics.median(sampling), statistics.median(training)


def speedrun_rerun(tokenizer: Tokenizer, base: Path) -> tuple[float, float]:
    """(first run, rerun) seconds of `nanochat-run speedrun` on the tiny pipeline."""
    config = base / "speedrun.toml"
    config.write_text(SPEEDRUN_TOML.format(vocab=tokenizer.vocab_size))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "supervisor.cli", "speedrun", "--depth", "1", "--builtin", "--config", str(config),
           "--backoff", "0"]  # fmt: skip
    took = []
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        took.append(time.perf_counter() - t0)
        if proc.returncode:
            sys.exit(f"speedrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    assert "attempt" not in proc.stdout, "the rerun trained something"
    return took[0], took[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="the group: completions per prompt")
    p.add_argument("--batch", type=int, default=8, help="completions per training micro-batch")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tokenizer = prepare(base)
        model = random_model(args.depth, tokenizer)
        engine = full_length(Engine(model.eval(), tokenizer))
        prompt = tokenizer.render_for_completion(get_task("arithmetic", "test")[0])
        print(f"depth {args.depth} ({model.num_params():,} parameters), {args.threads} threads, a group of"
              f" {args.samples} x {args.new_tokens} tokens from a {len(prompt)}-token arithmetic prompt")  # fmt: skip
        times = rollouts(args, model, engine, prompt)
        best = times["batched, KV cache"]
        print("\nrollout                     seconds   sampled tok/s  time vs batched")
        for name, t in times.items():
            print(f"{name:<27}{t:>8.2f}{args.samples * args.new_tokens / t:>16,.0f}{t / best:>11.1f}x")
        sampling, training = rl_step(args, model.train(), engine, prompt)
        share = sampling / (sampling + training)
        print(f"\nRL step on one group: sampling {sampling:.2f}s, training {training:.2f}s: {100 * share:.0f}% of the"
              " step is sampling")  # fmt: skip
        first, rerun = speedrun_rerun(tokenizer, base)
        print(f"\nspeedrun (tiny pipeline): first run {first:.1f}s; the rerun decides nothing is left in {rerun:.2f}s"
              f" ({'under' if rerun < 5 else 'OVER'} the 5 s target)")  # fmt: skip


if __name__ == "__main__":
    main()
