"""Reinforcement learning on problems with a checkable answer, from the final SFT checkpoint (nanochat/rl.py says
how: group sampling, reward by the task's check, advantage = reward - group mean, a plain policy gradient).

One process:   python -m scripts.chat_rl --num_iterations=50
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --tasks=gsm8k
Every setting: python -m scripts.chat_rl --help

Starts from the final checkpoint of chatsft_checkpoints/<model_tag> and saves to chatrl_checkpoints/<model_tag>, with
the checkpoint contract of every phase (nanochat/phase.py runs the loop). Its evaluation is pass@k on held-out
problems (higher is better), recorded in the meta as val_pass@k.
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_phase import check_tokenizer, mixtures, seq_len, start_model
from nanochat.common import print0
from nanochat.config import ConfigError, parse_args
from nanochat.engine import Engine
from nanochat.optim import OptimConfig, Optimizers
from nanochat.paths import phase_dirs
from nanochat.phase import Phase, Plan
from nanochat.registry import PHASES
from nanochat.rl import Rollouts, pass_at_k, pg_loss
from nanochat.settings import RLConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.train_loop import run_and_exit

PHASE = PHASES["rl"]


@record
def main(argv: list[str]) -> int:
    cfg, overrides = parse_args(RLConfig(), argv)
    tokenizer = get_tokenizer()
    check_tokenizer(tokenizer)
    # before the phase holds its directory: bad settings and tasks that cannot load change nothing
    ckpt_dir, source_dir = phase_dirs(PHASE.name, cfg.model_tag, cfg.checkpoint_dir, cfg.source_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.prompts_per_step % world or cfg.eval_problems % world:
        raise ConfigError(f"--prompts_per_step={cfg.prompts_per_step} and --eval_problems={cfg.eval_problems} must"
                          f" be multiples of the world size {world}")  # fmt: skip
    train_mix, test_mix = mixtures(cfg, rank, world)
    for task in train_mix.tasks + test_mix.tasks:
        if task.eval_type is None:
            raise ConfigError(f"the {task.name} task has no automatic check to reward; RL takes arithmetic, spelling,"
                              " choice, or the downloaded gsm8k, mmlu, arc-easy, arc-challenge")  # fmt: skip
    phase = Phase(PHASE.run_name, cfg, ckpt_dir, overrides)
    model, source = start_model(phase, source_dir, cfg, tokenizer)
    context = seq_len(cfg, model)
    per_rank = cfg.prompts_per_step // world
    examples = sum(len(t) for t in train_mix.tasks)
    iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, round(cfg.num_epochs * examples /
                                                                               cfg.prompts_per_step))  # fmt: skip
    rows = cfg.prompts_per_step * cfg.num_samples
    plan = Plan(iterations, context, per_rank * cfg.num_samples // cfg.device_batch_size, rows * context,
                cfg.eval_problems // world)  # fmt: skip
    print0(f"rollouts: {cfg.prompts_per_step} prompts x {cfg.num_samples} samples per step = {per_rank} prompts on"
           f" each of {world} ranks, {plan.grad_accum} micro-batches of {cfg.device_batch_size} each")  # fmt: skip
    print0(f"training for {iterations:,} steps ({iterations * cfg.prompts_per_step:,} prompts of {examples:,})")
    print0(f"evaluation: pass@{cfg.pass_k} on {cfg.eval_problems} held-out problems")
    optim_cfg = OptimConfig(cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
    optimizers = Optimizers(model, optim_cfg, rank, world)
    engine = Engine(model, tokenizer)
    autocast = lambda: phase.autocast  # noqa: E731 - a fresh context manager per use
    sampling = (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
    loader = Rollouts(engine, train_mix, cfg.device_batch_size, context, cfg.num_samples, *sampling, autocast)
    evaluate = pass_at_k(engine, test_mix, plan.eval_steps, cfg.pass_k, *sampling, autocast)
    return phase.train(model, optimizers, loader, plan, evaluate, meta={"source": source, "tasks": cfg.tasks},
                       loss_fn=pg_loss, metric=f"val_pass@{cfg.pass_k}", step_stats=loader.stats)  # fmt: skip


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
