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
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_phase import ChatConfig, check_tokenizer, mixtures, seq_len, start_model
from nanochat.common import print0
from nanochat.config import ConfigError, parse_args
from nanochat.engine import Engine
from nanochat.optim import OptimConfig, Optimizers
from nanochat.paths import phase_dirs
from nanochat.phase import Phase, Plan
from nanochat.registry import PHASES
from nanochat.rl import Rollouts, pass_at_k, pg_loss
from nanochat.tokenizer import get_tokenizer
from nanochat.train_loop import run_and_exit

PHASE = PHASES["rl"]


@dataclass
class RLConfig(ChatConfig):
    # data: tasks with an automatic check (arithmetic offline; gsm8k with the `datasets` package)
    tasks: str = "arithmetic"  # the training mixture, name[:weight],...
    max_seq_len: int = -1  # prompt + answer, in tokens; -1 = the source model's context
    # sampling
    prompts_per_step: int = 16  # prompts per optimizer step, over all ranks (a multiple of the world size)
    num_samples: int = 16  # the group: completions sampled per prompt
    max_new_tokens: int = 256  # the longest answer
    temperature: float = 1.0
    top_k: int = 50  # 0 = sample from the whole vocabulary
    device_batch_size: int = 8  # completions per forward/backward pass (divides num_samples)
    total_batch_size: int = -1  # unused: a step is prompts_per_step x num_samples completions
    # optimization: 5% of the pretraining learning rates, decayed linearly to 0
    embedding_lr: float = 0.01
    unembedding_lr: float = 0.0002
    matrix_lr: float = 0.001
    warmdown_ratio: float = 1.0
    # evaluation: pass@k on held-out problems
    eval_every: int = 60  # -1 = only at the end
    eval_problems: int = 256  # held-out problems per evaluation, over all ranks
    pass_k: int = 8  # samples per problem
    save_every: int = 60

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("prompts_per_step", "num_samples", "max_new_tokens", "eval_problems", "pass_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.num_samples % self.device_batch_size:
            raise ConfigError(f"--device_batch_size={self.device_batch_size} must divide --num_samples="
                              f"{self.num_samples} (a micro-batch holds completions of one prompt)")  # fmt: skip
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (a group of identical greedy answers teaches nothing), got"
                              f" {self.temperature}")  # fmt: skip
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0 (0 = no limit), got {self.top_k}")


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
