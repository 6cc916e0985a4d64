"""Chat phases and the engine, side by side in one run.

    python -m scripts.bench_chat [--depth 4] [--seq 256] [--steps 30] [--rounds 3] [--new_tokens 256]

Training: base training, midtraining and SFT (one padded row per conversation, --pack=False, and packed best fit,
the default) at the same depth, batch and sequence length, the four arms interleaved round by round; tokens/s is
the median over each run's steps after its first (compilation and warm-up). SFT's tokens count row positions,
padding included; beside them its padding share and the useful rates: tokens that are not padding, and tokens
trained on (the assistant's), per second.
Generation: the same greedy completion of --new_tokens tokens by the engine (KV cache) and by GPT.generate (the
whole context again at every token), interleaved; the ratio is uncached time over cached time.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, tokenizer_dir


def prepare(base: Path) -> Tokenizer:
    write_builtin_corpus(data_dir(base), num_shards=3, max_docs=400, seed=0)
    train, _ = train_val_shards(data_dir(base))
    tokenizer = Tokenizer.train(iter_texts(train, max_chars=2_000_000), 1024)
    tokenizer.save(tokenizer_dir(base))
    return tokenizer


def train(args: argparse.Namespace, base: Path, module: str, out: Path, source: Path | None, tag: str,
          *more: str) -> dict:  # fmt: skip
    common = [f"--max_seq_len={args.seq}", "--device_batch_size=4", "--total_batch_size=-1", "--eval_every=-1",
              "--eval_tokens=256", "--save_every=0", f"--num_iterations={args.steps}", f"--checkpoint_dir={out}",
              "--resume=False"]  # fmt: skip
    extra = [f"--depth={args.depth}", "--head_dim=64", "--sample_every=-1"] if source is None else [
        f"--source_dir={source}", "--task_size=2000"]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": str(args.threads)}
    argv = [sys.executable, "-m", module, *common, *extra, *more]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rates = [float(r.replace(",", "")) for r in re.findall(r"tok/s ([\d,]+)", proc.stdout)][1:]
    shares = re.search(r"padding: ([\d.]+)%.* ([\d.]+)% trained nothing", proc.stdout)
    padding, untrained = (float(shares.group(1)), float(shares.group(2))) if shares else (None, None)
    return {"tok_s": statistics.median(rates), "padding": padding, "untrained": untrained, "tag": tag}


def generation(args: argparse.Namespace, tokenizer: Tokenizer) -> tuple[float, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, tokenizer.vocab_size, 1024, head_dim=64))
    model.init_weights(0)
    with torch.no_grad():  # an untrained model's zero output projections would make every step the same
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    model.eval()
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode("def fibonacci(n):\n    ")]
    cached, uncached = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _step in engine.generate(prompt, 1, args.new_tokens, temperature=0.0):
            pass
        cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.generate(prompt, args.new_tokens, temperature=0)
        uncached.append(time.perf_counter() - t0)
    return statistics.median(cached), statistics.median(uncached)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_chat-") as tmp:
        base = Path(tmp)
        tokenizer = prepare(base)
        src = base / "base_src"
        train(args, base, "scripts.base_train", src, None, "base")  # the source of mid, and mid's of SFT
        mid_src = base / "mid_src"
        train(args, base, "scripts.mid_train", mid_src, src, "mid")
        arms = {"base": [], "mid": [], "sft": [], "sft-packed": []}
        for r in range(args.rounds):
            arms["base"].append(train(args, base, "scripts.base_train", base / f"b{r}", None, "base"))
            arms["mid"].append(train(args, base, "scripts.mid_train", base / f"m{r}", src, "mid"))
            arms["sft"].append(train(args, base, "scripts.chat_sft", base / f"s{r}", mid_src, "sft", "--pack=False"))
            arms["sft-packed"].append(train(args, base, "scripts.chat_sft", base / f"p{r}", mid_src, "sft-packed"))
        rate = {k: statistics.median(x["tok_s"] for x in v) for k, v in arms.items()}
        print(f"training, depth {args.depth}, {args.seq} tokens/row, 4 rows/micro-batch, median of {args.rounds} runs:")
        useful = {}
        for k in arms:
            pad, untrained = arms[k][-1]["padding"], arms[k][-1]["untrained"]
            extra = ""
            if pad is not None:
                useful[k] = (rate[k] * (1 - pad / 100), rate[k] * (1 - untrained / 100))
                extra = (f" (padding {pad:.1f}% of row positions: {useful[k][0]:,.0f} non-padding tok/s,"
                         f" {useful[k][1]:,.0f} trained-on tok/s)")  # fmt: skip
            print(f"  {k:<10} {rate[k]:>10,.0f} tok/s   {rate[k] / rate['base']:.3f}x base{extra}")
        (old_real, old_trained), (new_real, new_trained) = useful["sft"], useful["sft-packed"]
        print(f"SFT packed over padded: {new_real / old_real:.1f}x non-padding tok/s, {new_trained / old_trained:.1f}x"
              " trained-on tok/s")  # fmt: skip
        cached, uncached = generation(args, tokenizer)
        n = args.new_tokens
        print(f"generation, {n} new tokens, greedy: KV cache {n / cached:,.0f} tok/s, without {n / uncached:,.0f}"
              f" tok/s: {uncached / cached:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
