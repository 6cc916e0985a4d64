"""Inference for the chat phases: KV-cached sampling of several samples from one prompt, with the calculator tool.

The prompt is prefilled once (batch 1), its cache copied into num_samples rows, then every row decodes one token
per step. When a row emits <|python_start|> ... <|python_end|>, the engine evaluates the enclosed arithmetic and
forces <|output_start|> result <|output_end|> into that row: the model reads those tokens like any other, but they
are the tool's, not the model's (mask 0 for RL).

bf16 autocast is the caller's business: wrap the calls in torch.autocast on CUDA if wanted.
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanochat import checkpoint
from nanochat.calculator import calculate
from nanochat.checkpoint import CheckpointError
from nanochat.common import autodetect_device_type
from nanochat.gpt import GPT, GPTConfig, KVCache
from nanochat.paths import model_dir
from nanochat.registry import PHASES
from nanochat.tokenizer import Tokenizer

PAD = -1  # the token reported for a row that has already finished


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options that pick the checkpoint to run (scripts/chat_cli.py, scripts/chat_eval.py)."""
    parser.add_argument("--phase", choices=list(PHASES), default="sft", help="whose checkpoint (default: sft)")
    parser.add_argument("--model_tag", default="", help="the checkpoint folder (default: the phase's one model)")
    parser.add_argument("--checkpoint_dir", default="", help="a checkpoint dir, instead of --phase/--model_tag")
    parser.add_argument("--step", type=int, default=-1, help="a checkpoint step (default: the newest valid one)")
    parser.add_argument("--device_type", choices=["auto", "cuda", "cpu"], default="auto")


def load_from_args(args: argparse.Namespace) -> tuple[Path, GPT, checkpoint.Meta]:
    """(checkpoint dir, model, meta) for the options of add_model_args."""
    directory = model_dir(args.phase, args.model_tag, args.checkpoint_dir)
    device = autodetect_device_type() if args.device_type == "auto" else args.device_type
    return directory, *load_checkpoint_model(directory, args.step, torch.device(device))


def load_checkpoint_model(
    directory: Path, step: int = -1, device: torch.device | str = "cpu"
) -> tuple[GPT, checkpoint.Meta]:
    """A model for inference from a checkpoint dir of any phase: the newest valid checkpoint, or the one at `step`
    (verified either way), in eval mode. Returns (model, meta)."""
    ckpt = next(checkpoint.valid_newest_first(directory, step=None if step < 0 else step), None)
    if ckpt is None:
        which = f"valid checkpoint at step {step}" if step >= 0 else "valid checkpoint"
        raise CheckpointError(f"{directory} has no {which}: train one first, or pick another with --step")
    with torch.device(device):
        model = GPT(GPTConfig(**ckpt.meta.model_config))
    model.to(device)
    model.load_state_dict(checkpoint.load_model(directory, ckpt, device, model))
    return model.eval(), ckpt.meta


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> torch.Tensor:
    """One token id per row of logits (B, vocab): argmax at temperature 0, else a draw among the top_k logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(values / temperature, dim=-1), 1, generator=generator)
        return indices.gather(-1, choice).squeeze(-1)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1)


class Step(NamedTuple):
    """One decoding step across the samples: tokens[i] is sample i's next token (PAD once it has finished),
    forced[i] whether the tool wrote it, done[i] whether the sample had already finished (tokens[i] is PAD)."""

    tokens: list[int]
    forced: list[bool]
    done: list[bool]


@dataclass
class _Row:
    """The tool state of one sample."""

    forced: deque[int] = field(default_factory=deque)  # tool output waiting to be fed, one token per step
    expr: list[int] | None = None  # the tokens of an open python block
    done: bool = False


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.special_id
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop = {special("<|assistant_end|>"), tokenizer.bos_id}

    def _observe(self, row: _Row, token: int) -> None:
        """Advance row's tool state past token; a finished python block queues the calculator's answer."""
        if token in self.stop:
            row.done = True
        elif token == self.python_start:
            row.expr = []
        elif token == self.python_end and row.expr is not None:
            result = calculate(self.tokenizer.decode(row.expr))
            row.expr = None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.expr is not None:
            row.expr.append(token)

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[Step]:
        """Stream num_samples continuations of the prompt `tokens`, one Step per decoded position.

        A sample finishes with <|assistant_end|> or <|bos|> (that token is yielded); the stream ends when all have
        finished, after max_tokens steps, or when the model's context (sequence_len) is full."""
        if not tokens or num_samples < 1 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need a prompt, num_samples >= 1, temperature >= 0, top_k >= 1 or None; got "
                             f"{len(tokens)} tokens, {num_samples=}, {temperature=}, {top_k=}")  # fmt: skip
        context = self.model.config.sequence_len
        if len(tokens) > context:
            raise ValueError(f"prompt of {len(tokens)} tokens exceeds the model's context of {context}")
        device = self.model.wte.weight.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        cache = KVCache(self.model.config.n_layer, min(len(tokens) + max_tokens, context))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=cache)[:, -1]
        cache.expand(num_samples)
        logits = logits.expand(num_samples, -1)
        rows = [_Row() for _ in range(num_samples)]
        for _ in range(max_tokens):
            sampled = sample_next(logits, temperature, top_k, generator).tolist()
            step = Step([], [], [])
            for row, token in zip(rows, sampled):
                step.done.append(row.done)
                if row.done:
                    token, forced = PAD, False
                else:
                    forced = bool(row.forced)
                    token = row.forced.popleft() if forced else token
                    self._observe(row, token)
                step.tokens.append(token)
                step.forced.append(forced)
            yield step
            if all(row.done for row in rows) or cache.pos == cache.max_len:
                return
            # finished rows still ride along in the batch: feed them any valid id and ignore their logits
            feed = torch.tensor([[max(t, 0)] for t in step.tokens], dtype=torch.long, device=device)
            logits = self.model(feed, kv_cache=cache)[:, -1]

    def generate_batch(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """The num_samples completions (without the prompt and the terminating token) and, per token, a mask:
        1 if the model sampled it, 0 if the tool forced it."""
        completions: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for step in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, forced, done) in enumerate(zip(*step)):
                if not done and token not in self.stop:
                    completions[i].append(token)
                    masks[i].append(0 if forced else 1)
        return completions, masks
