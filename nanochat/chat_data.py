"""Training data of the chat phases: conversations from a TaskMixture, rendered by the tokenizer, in batches.

Midtraining packs them end to end into full rows, like pretraining, and trains on every token (`PackedLoader`).
SFT trains only on what the assistant writes, on whole conversations: several to a row, each picked to fit the
space left best from a few rendered ahead, the rest padded (`BestFitLoader`); or, with --pack=False, one to a
padded row (`PaddedLoader`). All keep their position as plain data, so a checkpoint resumes them exactly: the
mixture's counters, and the tokens (or conversations) drawn but not yet handed out.
"""

from __future__ import annotations

import random

import torch

from nanochat.config import ConfigError
from nanochat.tasks import Task, TaskMixture
from nanochat.tokenizer import Tokenizer

IGNORE = -1  # a target the loss skips (cross_entropy's ignore_index in GPT.forward)


MAX_SKIPS = 1000  # conversations in a row with nothing to train on before an SFT loader gives up
LOOKAHEAD = 16  # conversations rendered ahead for the best fit: enough to fill rows of the built-in tasks


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


def draw(tokenizer: Tokenizer, mixture: TaskMixture, T: int) -> tuple[tuple[int, int], list[int], list[int]]:
    """The mixture's next conversation with something to train on once cut at T+1 tokens: its (task, index), ids
    and mask. One cut before the assistant's first token is skipped (nothing to learn from it)."""
    for _ in range(MAX_SKIPS):
        task, index = mixture.advance()
        ids, mask = render_one(tokenizer, mixture.tasks[task], index, T + 1)
        if any(mask[1:]):
            return (task, index), ids, mask
    raise ConfigError(
        f"{MAX_SKIPS} conversations in a row end before the assistant speaks at --max_seq_len={T}: raise it, or"
        " use tasks with shorter prompts"
    )


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


class SFTRows:
    """What the two SFT loaders share: rows of conversations turned into inputs and masked targets, and the counts
    behind the padding report."""

    def __init__(self, tokenizer: Tokenizer, mixture: TaskMixture, B: int, T: int, device: torch.device) -> None:
        self.tokenizer, self.mixture, self.B, self.T, self.device = tokenizer, mixture, B, T, device
        self.pad = tokenizer.special_id("<|assistant_end|>")  # any id: padded positions are never targets
        self.slots = self.filled = self.targets = 0  # row positions handed out, not padding, trained on

    def batch(self, rows: list[list[tuple[list[int], list[int]]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's conversations (ids, mask) laid end to end (at most T+1 tokens), then padding."""
        x = torch.full((self.B, self.T), self.pad, dtype=torch.long)
        y = torch.full((self.B, self.T), IGNORE, dtype=torch.long)
        for r, convs in enumerate(rows):
            ids = [t for c in convs for t in c[0]]
            mask = [m for c in convs for m in c[1]]
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
            self.filled += n
        self.targets += int((y != IGNORE).sum())
        self.slots += y.numel()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def report(self) -> str:
        return (
            f"padding: {100 * (1 - self.filled / self.slots):.1f}% of the row positions (rank 0); with the prompts,"
            f" {100 * (1 - self.targets / self.slots):.1f}% trained nothing"
        )


class PaddedLoader(SFTRows):
    """One conversation per row, cut at T+1 tokens and padded; targets only where the assistant writes."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch([[draw(self.tokenizer, self.mixture, self.T)[1:]] for _ in range(self.B)])

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: go on from the furthest rank's position (ranks skip different conversations)."""
        self.mixture.load_state_dict(furthest(states))


class BestFitLoader(SFTRows):
    """Whole conversations packed into rows of T+1 tokens: each row takes, while one fits, the longest of the
    `lookahead` conversations waiting that fits the space left, and pads the rest. A conversation is only cut when
    it alone exceeds a row (as in `PaddedLoader`); the longest waiting one always opens a row, so none waits long.
    Targets only where the assistant writes. Every conversation opens with <|bos|>, which is what SFT's --doc_mask
    keys on to keep attention inside each conversation of a row (GPT.forward's doc_start); without it attention
    crosses into the row's earlier conversations. scripts/bench_mask.py measures the difference."""

    def __init__(self, tokenizer: Tokenizer, mixture: TaskMixture, B: int, T: int, device: torch.device,
                 lookahead: int = LOOKAHEAD) -> None:  # fmt: skip
        super().__init__(tokenizer, mixture, B, T, device)
        self.lookahead = lookahead
        self.waiting: list[tuple[tuple[int, int], list[int], list[int]]] = []  # drawn, not yet in a row

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch([self.row() for _ in range(self.B)])

    def row(self) -> list[tuple[list[int], list[int]]]:
        convs, space = [], self.T + 1
        while True:
            while len(self.waiting) < self.lookahead:
                self.waiting.append(draw(self.tokenizer, self.mixture, self.T))
            fits = [i for i, (_, ids, _) in enumerate(self.waiting) if len(ids) <= space]
            if not fits:
                return convs
            _, ids, mask = self.waiting.pop(max(fits, key=lambda i: len(self.waiting[i][1])))  # first of equals
            convs.append((ids, mask))
            space -= len(ids)

    def state_dict(self) -> dict:
        return {"mixture": self.mixture.state_dict(), "waiting": [list(key) for key, _, _ in self.waiting]}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.rerender(state.get("waiting", []))  # none in a state saved with --pack=False

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: go on from the furthest rank's position; the conversations the old ranks had
        waiting are dealt out to the new ones, so none of them is lost."""
        self.mixture.load_state_dict(furthest(states))
        old = [key for i, s in enumerate(states) if i % self.mixture.world_size == self.mixture.rank
               for key in s.get("waiting", [])]  # fmt: skip
        self.rerender(old)

    def rerender(self, keys: list) -> None:
        self.waiting = []
        for task, index in keys:
            ids, mask = render_one(self.tokenizer, self.mixture.tasks[task], index, self.T + 1)
            self.waiting.append(((task, index), ids, mask))


def furthest(states: list[dict]) -> dict:
    """Of the ranks' saved loader states, the mixture position furthest along: no draw is seen twice."""
    return max((s["mixture"] for s in states), key=lambda m: m["step"])
