"""Reinforcement learning on problems with a checkable answer, from the final SFT checkpoint (nanochat/rl.py says
how: group sampling, reward by the task's check, advantage = reward - group mean, a plain policy gradient).

One process:   python -m scripts.chat_rl --num_iterations=50
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --tasks=gsm8k
Every setting: python -m scripts.chat_rl --help

Starts from the final checkpoint of chatsft_checkpoints/<model_tag> and saves to chatrl_checkpoints/<model_tag>, with
the checkpoint contract of every phase: nanochat/phase.py runs the loop over this script's `Reinforcement` recipe.
Its evaluation is pass@k on held-out problems (higher is better), recorded in the meta as val_pass@k.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_phase import check_tokenizer, mixtures, seq_len, start_model
from nanochat.common import print0
from nanochat.config import ConfigError, parse_args
from nanochat.engine import Engine
from nanochat.optim import OptimConfig, Optimizers
from nanochat.paths import phase_dirs
from nanochat.phase import Between, Phase, Recipe
from nanochat.registry import PHASES
from nanochat.rl import Rollouts, pass_at_k, pg_loss
from nanochat.settings import RLConfig
from nanochat.tasks import TaskMixture
from nanochat.tokenizer import Tokenizer, get_tokenizer
from nanochat.train_loop import run_and_exit

PHASE = PHASES["rl"]


class Reinforcement(Recipe):
    """RL's recipe: the SFT model, rollouts sampled from the current weights as its data (nanochat/rl.py), the
    policy-gradient loss, pass@k on held-out problems, and the mean reward on every step line. A step is
    prompts_per_step groups of num_samples completions; an evaluation, eval_problems problems over the ranks."""

    def __init__(self, phase: Phase, cfg: RLConfig, tokenizer: Tokenizer, source_dir: Path,
                 mixes: tuple[TaskMixture, TaskMixture]) -> None:  # fmt: skip
        train_mix, test_mix = mixes
        world = phase.dist.world_size
        self.model, source = start_model(phase, source_dir, cfg, tokenizer)
        context = seq_len(cfg, self.model)
        per_rank, examples = cfg.prompts_per_step // world, sum(len(t) for t in train_mix.tasks)
        self.plan = phase.plan(context, lambda per_step: round(cfg.num_epochs * examples / cfg.prompts_per_step),
                               rows_per_step=cfg.prompts_per_step * cfg.num_samples,
                               eval_steps=cfg.eval_problems // world)  # fmt: skip
        iterations, accum = self.plan.num_iterations, self.plan.grad_accum
        print0(f"rollouts: {cfg.prompts_per_step} prompts x {cfg.num_samples} samples per step = {per_rank} prompts on"
               f" each of {world} ranks, {accum} micro-batches of {cfg.device_batch_size} each")  # fmt: skip
        print0(f"training for {iterations:,} steps ({iterations * cfg.prompts_per_step:,} prompts of {examples:,})")
        print0(f"evaluation: pass@{cfg.pass_k} on {cfg.eval_problems} held-out problems")
        optim_cfg = OptimConfig(cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
        self.optimizers = Optimizers(self.model, optim_cfg, phase.dist.rank, world)
        engine = Engine(self.model, tokenizer)
        autocast = lambda: phase.autocast  # noqa: E731 - a fresh context manager per use
        sampling = (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
        self.loader = Rollouts(engine, train_mix, cfg.device_batch_size, context, cfg.num_samples, *sampling, autocast)
        self.pass_at_k = pass_at_k(engine, test_mix, self.plan.eval_steps, cfg.pass_k, *sampling, autocast)
        self.meta, self.metric = {"source": source, "tasks": cfg.tasks}, f"val_pass@{cfg.pass_k}"

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return pg_loss(model, batch)

    def evaluate(self, step: int, between: Between) -> float | None:
        return self.pass_at_k(step, between)

    def step_stats(self) -> dict[str, float]:
        return self.loader.stats()


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
    mixes = mixtures(cfg, rank, world)
    for task in mixes[0].tasks + mixes[1].tasks:
        if task.eval_type is None:
            raise ConfigError(f"the {task.name} task has no automatic check to reward; RL takes arithmetic, spelling,"
                              " choice, or the downloaded gsm8k, mmlu, arc-easy, arc-challenge")  # fmt: skip
    phase = Phase(PHASE.run_name, cfg, ckpt_dir, overrides)
    return phase.train(Reinforcement(phase, cfg, tokenizer, source_dir, mixes))


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
