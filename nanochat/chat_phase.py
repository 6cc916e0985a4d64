"""What midtraining and SFT share on top of a Phase: the checkpoint they start from (the previous phase's final one,
recorded in every checkpoint of theirs as its source), the chat settings, the task mixtures and the evaluation.

    base_checkpoints/<tag>  --mid_train-->  mid_checkpoints/<tag>  --chat_sft-->  chatsft_checkpoints/<tag>

A fresh phase loads its source's weights (never its optimizer state); a resumed phase loads only its own
checkpoint, and says so if its source has changed since it started from it. `ChatRecipe` is what the two phases
hand to the loop (nanochat/phase.py); RL (scripts/chat_rl.py) uses the start and the mixtures.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import checkpoint
from nanochat.chat_data import PaddedLoader, SFTRows, mean_tokens
from nanochat.checkpoint import CheckpointError
from nanochat.common import print0, warn0
from nanochat.config import ConfigError
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import OptimConfig, Optimizers
from nanochat.paths import phase_dirs
from nanochat.phase import Between, Phase, Recipe
from nanochat.registry import PhaseInfo
from nanochat.settings import ChatConfig
from nanochat.tasks import BUILTIN_TASKS, TaskMixture, get_task, parse_mixture_spec
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer


def check_tokenizer(tokenizer: Tokenizer) -> None:
    try:
        for token in SPECIAL_TOKENS:
            tokenizer.special_id(token)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def find_source(phase: Phase, source_dir: Path, step: int) -> checkpoint.Checkpoint:
    """The source checkpoint: its final one (or the valid one at `step`). Rank 0 verifies it, the others hear."""
    found: list = [None, None]
    if phase.dist.master:
        try:
            at, final = (step, None) if step >= 0 else (None, lambda c: c.final)
            found[0] = next(checkpoint.valid_newest_first(source_dir, warn0, accept=final, step=at), None)
            if found[0] is None:
                which = f"valid checkpoint at step {step}" if step >= 0 else "valid final checkpoint"
                found[1] = CheckpointError(
                    f"{source_dir} has no {which} to start from: finish the previous phase first, or pick another"
                    " with --source_dir / --source_step (nothing was changed)"
                )
        except OSError as e:
            found[1] = CheckpointError(f"cannot read the source {source_dir} ({e.strerror or e})")
    if phase.dist.is_distributed:
        dist.broadcast_object_list(found, src=0)
    if found[1] is not None:
        raise found[1]
    return found[0]


def start_model(phase: Phase, source_dir: Path, cfg: ChatConfig, tokenizer: Tokenizer) -> tuple[GPT, dict]:
    """The model (its source's weights, or nothing loaded when resuming) and the source record for the meta."""
    if phase.resume_from is not None:  # only its own checkpoint; the source merely gets checked
        saved = phase.resume_from[1].meta
        record, model_cfg = saved.source or {}, GPTConfig(**saved.model_config)
        same_vocab(model_cfg, tokenizer, phase.ckpt_dir)
        if changed := checkpoint.source_changed(record):
            warn0(f"this phase started from {record.get('dir')} step {record.get('step')}, which {changed} since;"
                  " resuming from this phase's own checkpoint")  # fmt: skip
        return phase.build(model_cfg, init=lambda m: None), record
    source = find_source(phase, source_dir, cfg.source_step)
    model_cfg = GPTConfig(**source.meta.model_config)
    same_vocab(model_cfg, tokenizer, source_dir)
    record = checkpoint.source_record(source_dir, source)
    print0(f"starting from {source_dir} step {source.step} ({record.get('phase')})")

    def init(model: GPT) -> None:
        model.load_state_dict(checkpoint.load_model(source_dir, source, phase.device, model))

    return phase.build(model_cfg, init), record


def same_vocab(model_cfg: GPTConfig, tokenizer: Tokenizer, where: Path) -> None:
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"the model in {where} has a vocabulary of {model_cfg.vocab_size}, the tokenizer {tokenizer.vocab_size}:"
            " it was trained with another tokenizer; use that one, or retrain the base model with this one"
        )


def seq_len(cfg: ChatConfig, model: GPT) -> int:
    if cfg.max_seq_len > model.config.sequence_len:
        raise ConfigError(f"--max_seq_len={cfg.max_seq_len} exceeds the model's context {model.config.sequence_len}")
    return cfg.max_seq_len if cfg.max_seq_len > 0 else model.config.sequence_len


def mixtures(cfg: ChatConfig, rank: int, world: int) -> tuple[TaskMixture, TaskMixture]:
    """(training mixture, evaluation mixture), each sharded by rank; a task that cannot load is a one-line error."""

    def mixture(spec: str, split: str, size: int) -> TaskMixture:
        entries = parse_mixture_spec(spec)
        sized = lambda name: {"size": size} if name in BUILTIN_TASKS else {}  # noqa: E731 - downloaded: fixed
        tasks = [get_task(name, split, cfg.seed, **sized(name)) for name, _ in entries]
        return TaskMixture(tasks, [w for _, w in entries], seed=cfg.seed, rank=rank, world_size=world)

    try:
        test_size = cfg.task_size // 20 + 1  # 500 test conversations per generated task by default
        return mixture(cfg.tasks, "train", cfg.task_size), mixture(cfg.eval_tasks or cfg.tasks, "test", test_size)
    except ValueError as e:  # TaskUnavailable, an empty mixture
        raise ConfigError(str(e)) from None


def epochs_horizon(cfg: ChatConfig, tokenizer: Tokenizer, mixture: TaskMixture, T: int, per_row: bool):
    """num_epochs passes over the mixture, in optimizer steps, given the tokens (or rows, `per_row`) per step."""
    examples = sum(len(t) for t, w in zip(mixture.tasks, mixture.weights) if w > 0)
    tokens = examples * (T if per_row else mean_tokens(tokenizer, mixture, T + 1))
    return lambda per_step: round(cfg.num_epochs * tokens / per_step)


class ChatRecipe(Recipe):
    """Midtraining's and SFT's recipe: the source's model, the task mixture's conversations in rows by the phase's
    loader (nanochat/chat_data.py), num_epochs passes over them, and bits per byte on the evaluation mixture's test
    conversations, scored on what the phase trains on. Every evaluation reads the same conversations, so they
    compare across steps and restarts. With `doc_mask` (SFT's packed rows), attention stays inside each conversation
    of a row, in training and evaluation alike (GPT.forward's doc_start: every conversation opens with <|bos|>)."""

    def __init__(self, phase: Phase, cfg: ChatConfig, tokenizer: Tokenizer, source_dir: Path,
                 mixes: tuple[TaskMixture, TaskMixture], loader_cls: type, doc_mask: bool = False) -> None:  # fmt: skip
        train_mix, self.test_mix = mixes
        self.model, source = start_model(phase, source_dir, cfg, tokenizer)
        T, B = seq_len(cfg, self.model), cfg.device_batch_size
        self.plan = phase.plan(T, epochs_horizon(cfg, tokenizer, train_mix, T, per_row=loader_cls is PaddedLoader))
        optim_cfg = OptimConfig(cfg.embedding_lr, cfg.unembedding_lr, cfg.matrix_lr, cfg.weight_decay)
        self.optimizers = Optimizers(self.model, optim_cfg, phase.dist.rank, phase.dist.world_size)
        self.loader_cls = loader_cls
        self.loader = self.loader_cls(tokenizer, train_mix, B, T, phase.device)
        self.meta = {"source": source, "tasks": cfg.tasks}
        self.tokenizer, self.B, self.T, self.device = tokenizer, B, T, phase.device
        self.token_bytes = tokenizer.token_bytes().to(phase.device)
        self.start = self.test_mix.state_dict()
        self.doc_start = tokenizer.bos_id if doc_mask else None

    def loss(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return model(*batch, doc_start=self.doc_start)

    def evaluate(self, step: int, between: Between) -> float | None:
        self.test_mix.load_state_dict(self.start)
        val = self.loader_cls(self.tokenizer, self.test_mix, self.B, self.T, self.device)
        model = self.model if self.doc_start is None else partial(self.model, doc_start=self.doc_start)
        return evaluate_bpb(model, val, self.plan.eval_steps, self.token_bytes, between)


def train_chat(info: PhaseInfo, cfg: ChatConfig, overrides: dict, loader_cls: type, doc_mask: bool = False) -> int:
    """A chat phase from start to end, its rows from `loader_cls`: `PackedLoader` (midtraining) lays conversations
    end to end and trains on every token; the SFT loaders (`BestFitLoader`, `PaddedLoader`) keep them whole and
    train on the assistant's tokens only. `doc_mask`: attention stays inside each conversation of a row."""
    tokenizer = get_tokenizer()
    check_tokenizer(tokenizer)
    # before the phase starts (and holds, maybe archives, its directory): a missing source folder or a task that
    # cannot load changes nothing (torchrun's RANK and WORLD_SIZE: the process group comes with the phase)
    ckpt_dir, source_dir = phase_dirs(info.name, cfg.model_tag, cfg.checkpoint_dir, cfg.source_dir)
    mixes = mixtures(cfg, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    phase = Phase(info.run_name, cfg, ckpt_dir, overrides)
    recipe = ChatRecipe(phase, cfg, tokenizer, source_dir, mixes, loader_cls, doc_mask)
    code = phase.train(recipe)
    loader = recipe.loader
    if isinstance(loader, SFTRows) and loader.slots:
        print0(loader.report())
    return code
