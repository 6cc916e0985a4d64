"""Chat tasks for midtraining, SFT and evaluation, by name.

Built in (generated from a seed, offline): arithmetic, spelling, choice, identity.
Downloaded with Hugging Face `datasets`: smoltalk, mmlu, arc-easy, arc-challenge, gsm8k; without it (or offline)
they raise a one-line TaskUnavailable naming the built-in alternative.

    tasks, weights = parse_mixture("arithmetic:2,spelling,identity", "train", seed=0)
    for conversation in TaskMixture(tasks, weights, seed=0, rank=rank, world_size=world_size): ...
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

from nanochat.tasks.arc import ARC, ARCChallenge
from nanochat.tasks.arithmetic import Arithmetic
from nanochat.tasks.base import Conversation, Task, TaskUnavailable
from nanochat.tasks.choice import Choice
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.identity import Identity
from nanochat.tasks.mixture import TaskMixture
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spelling import Spelling

TASKS: dict[str, Callable[..., Task]] = {
    cls.name: cls for cls in (Arithmetic, Spelling, Choice, Identity, SmolTalk, MMLU, ARC, ARCChallenge, GSM8K)
}
BUILTIN_TASKS = ["arithmetic", "spelling", "choice", "identity"]

__all__ = ["TASKS", "BUILTIN_TASKS", "Conversation", "Task", "TaskMixture", "TaskUnavailable", "get_task"]
__all__ += ["parse_mixture", "parse_mixture_spec"]


def _check_name(name: str) -> None:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown task {name!r}: {hint}(known tasks: {', '.join(TASKS)})")


def get_task(name: str, split: str, seed: int = 0, **kw: int) -> Task:
    """The task called name for split ("train" or "test"). seed drives the generated tasks (the downloaded ones have
    fixed rows and ignore it); kw: size (generated tasks only), start, stop, step (a slice of the examples)."""
    _check_name(name)
    return TASKS[name](split=split, seed=seed, **kw)


def parse_mixture_spec(spec: str) -> list[tuple[str, float]]:
    """ "arithmetic:2,spelling,identity" -> [("arithmetic", 2.0), ("spelling", 1.0), ("identity", 1.0)].

    Checks names and weights only (nothing is loaded), so a command line can fail fast with a one-line error.
    """
    entries: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, has_weight, weight_text = (s.strip() for s in item.partition(":"))
        if not name:
            raise ValueError(
                f"empty entry in task mixture {spec!r}: write name[:weight],... e.g. arithmetic:2,spelling"
            )
        _check_name(name)
        if any(name == seen for seen, _ in entries):
            raise ValueError(f"task {name!r} appears twice in {spec!r}: give it once, with the weight you want")
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"the weight of {name!r} must be a number >= 0, got {weight_text!r}")
        entries.append((name, weight))
    return entries


def parse_mixture(spec: str, split: str, seed: int = 0, **kw: int) -> tuple[list[Task], list[float]]:
    """The tasks and weights of a mixture spec like "arithmetic:2,spelling,identity" (weights default to 1)."""
    entries = parse_mixture_spec(spec)
    return [get_task(name, split, seed, **kw) for name, _ in entries], [weight for _, weight in entries]
