"""Pretrain a GPT, nanochat style.

One process:   python -m scripts.base_train --depth=4 --num_iterations=100
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
Every setting: python -m scripts.base_train --help

Settings are the fields of TrainConfig (and of the LoopConfig every phase shares), both in nanochat/settings.py,
overridden as --key=value (or --key value, dashes allowed). The loop, saving, resuming and stopping are the
phase's (nanochat/phase.py); this script's `BaseTraining` recipe is what is base training's own: a fresh model,
pretraining data, the Chinchilla horizon and samples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.common import print0
from nanochat.config import parse_args
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import OptimConfig, Optimizers
from nanochat.paths import phase_dir
from nanochat.phase import Between, Phase, Recipe
from nanochat.registry import PHASES
from nanochat.settings import TrainConfig
from nanochat.tokenizer import Tokenizer, get_tokenizer
from nanochat.train_loop import run_and_exit

PHASE = PHASES["base"]


class BaseTraining(Recipe):
    """Base training's recipe: a fresh model (the same seed on every rank), pretraining data, the Chinchilla
    horizon (--target_param_data_ratio), bits per byte on the validation shard, and samples of two prompts."""

    def __init__(self, phase: Phase, cfg: TrainConfig, tokenizer: Tokenizer) -> None:
        self.phase, self.cfg, self.tokenizer = phase, cfg, tokenizer
        dist_info, device = phase.dist, phase.device
        model_cfg = GPTConfig.from_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.head_dim)
        self.model = phase.build(model_cfg, init=lambda m: m.init_weights(cfg.seed))  # same seed: same on every rank
        ratio = cfg.target_param_data_ratio
        self.plan = phase.plan(cfg.max_seq_len, lambda per_step: round(ratio * self.model.num_params() / per_step))
        optim_cfg = OptimConfig(cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
        self.optimizers = Optimizers(self.model, optim_cfg, dist_info.rank, dist_info.world_size)
        self.loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train", dist_info.rank,
                                 dist_info.world_size, device, seed=cfg.seed)  # fmt: skip
        self.token_bytes = tokenizer.token_bytes().to(device)
        self.meta = {"tokenizer": tokenizer.fingerprint}  # a speedrun rerun tells from it whether the tokenizer changed
        self.sample_every = cfg.sample_every

    def evaluate(self, step: int, between: Between) -> float | None:
        cfg, dist_info = self.cfg, self.phase.dist
        val = DataLoader(self.tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", dist_info.rank,
                         dist_info.world_size, self.phase.device)  # fmt: skip
        return evaluate_bpb(self.model, val, self.plan.eval_steps, self.token_bytes, between)

    def sample(self, step: int) -> None:
        if not self.phase.dist.master:
            return
        self.model.eval()
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            with self.phase.autocast:
                tokens = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
                out = self.model.generate(tokens, max_tokens=16, temperature=0)
            print0(f"sample @ {step}: {prompt!r} -> {self.tokenizer.decode(out)!r}")
        self.model.train()


@record
def main(argv: list[str]) -> int:
    cfg, overrides = parse_args(TrainConfig(), argv)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else phase_dir(PHASE.name, cfg.tag)
    tokenizer = get_tokenizer()  # before the phase starts: a missing tokenizer must not archive anything first
    phase = Phase(PHASE.run_name, cfg, ckpt_dir, overrides)
    return phase.train(BaseTraining(phase, cfg, tokenizer))


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
