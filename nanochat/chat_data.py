"""Training data of the chat phases: conversations from a TaskMixture, rendered by the tokenizer, in batches.

Midtraining packs them end to end into full rows, like pretraining, and trains on every token (`PackedLoader`).
SFT gives each conversation a row of its own, padded, and trains only on what the assistant writes
(`PaddedLoader`). Both keep their position as plain data, so a checkpoint resumes them exactly: the mixture's
counters, and for packing the few tokens left over from the last batch.
"""

from __future__ import annotations

import random

import torch

from nanochat.config import ConfigError
from nanochat.tasks import Task, TaskMixture
from nanochat.tokenizer import Tokenizer

IGNORE = -1  # a target the loss skips (cross_entropy's ignore_index in GPT.forward)


MAX_SKIPS = 1000  # conversations in a row with nothing to train on before a padded loader gives up


def render(tokenizer: Tokenizer, mixture: TaskMixture, max_tokens: int) -> tuple[list[int], list[int]]:
    """The mixture's next conversation, rendered."""
    task, index = mixture.advance()
    return render_one(tokenizer, mixture.tasks[task], index, max_tokens)


def render_one(tokenizer: Tokenizer, task: Task, index: int, max_tokens: int) -> tuple[list[int], list[int]]:
    """Example `index` of `task`, rendered; a malformed one is a one-line error naming it (exit 2)."""
    try:
        return tokenizer.render_conversation(task[index], max_tokens)
    except ValueError as e:
        raise ConfigError(f"task {task.name} ({task.split}) example {index}: {e}") from None


def mean_tokens(tokenizer: Tokenizer, mixture: TaskMixture, max_tokens: int, sample: int = 256) -> float:
    """The mean rendered length of the mixture's conversations, from a seeded sample: the same on every rank
    and every restart, so a horizon derived from it is too."""
    rng = random.Random(f"mean_tokens/{mixture.seed}")
    lengths = []
    for _ in range(sample):
        task = rng.choices(range(len(mixture.tasks)), weights=mixture.weights)[0]
        if len(mixture.tasks[task]):
            index = rng.randrange(len(mixture.tasks[task]))
            lengths.append(len(render_one(tokenizer, mixture.tasks[task], index, max_tokens)[0]))
    return sum(lengths) / max(1, len(lengths))


class PackedLoader:
    """Rows of T+1 consecutive tokens from conversations laid end to end (each starts with <|bos|>)."""

    def __init__(self, tokenizer: Tokenizer, mixture: TaskMixture, B: int, T: int, device: torch.device) -> None:
        self.tokenizer, self.mixture, self.B, self.T, self.device = tokenizer, mixture, B, T, device
        self.buffer: list[int] = []  # tokens rendered but not consumed yet

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1  # the last target of a row is the first input of the next
        while len(self.buffer) < need:
            self.buffer += render(self.tokenizer, self.mixture, self.T + 1)[0]
        rows = torch.tensor(self.buffer[:need], dtype=torch.long)
        del self.buffer[: self.B * self.T]
        x, y = rows[:-1].view(self.B, self.T), rows[1:].view(self.B, self.T)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.buffer = list(state["buffer"])

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: go on from the furthest rank's position (the others' leftovers are dropped)."""
        self.mixture.load_state_dict(furthest(states))
        self.buffer = []


class PaddedLoader:
    """One conversation per row, cut at T+1 tokens and padded; targets only where the assistant writes."""

    def __init__(self, tokenizer: Tokenizer, mixture: TaskMixture, B: int, T: int, device: torch.device) -> None:
        self.tokenizer, self.mixture, self.B, self.T, self.device = tokenizer, mixture, B, T, device
        self.pad = tokenizer.special_id("<|assistant_end|>")  # any id: padded positions are never targets
        self.targets = self.slots = 0  # trained-on tokens and row positions handed out (the padding share)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((self.B, self.T), self.pad, dtype=torch.long)
        y = torch.full((self.B, self.T), IGNORE, dtype=torch.long)
        for row in range(self.B):
            ids, mask = render(self.tokenizer, self.mixture, self.T + 1)
            skipped = 0
            while not any(mask[1:]):  # cut before the assistant's first token: nothing to learn from it
                skipped += 1
                if skipped == MAX_SKIPS:
                    raise ConfigError(
                        f"{MAX_SKIPS} conversations in a row end before the assistant speaks at --max_seq_len="
                        f"{self.T}: raise it, or use tasks with shorter prompts"
                    )
                ids, mask = render(self.tokenizer, self.mixture, self.T + 1)
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
        self.targets += int((y != IGNORE).sum())
        self.slots += y.numel()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: go on from the furthest rank's position (ranks skip different conversations)."""
        self.mixture.load_state_dict(furthest(states))


def furthest(states: list[dict]) -> dict:
    """Of the ranks' saved loader states, the mixture position furthest along: no draw is seen twice."""
    return max((s["mixture"] for s in states), key=lambda m: m["step"])
