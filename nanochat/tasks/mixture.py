"""TaskMixture: an endless, seeded, resumable and rank-sharded stream of conversations drawn from several tasks.

The stream is one global sequence shared by all ranks. Draw number n picks a task at random by weight, from a
random stream keyed on (seed, n // BLOCK); the k-th draw of a task is example perm_e[k mod len] of that task,
where perm_e is a seeded shuffle for epoch e = k // len. So each task is visited once per epoch in a fresh
order, and the whole stream is a function of the seed and two counters: the draw number and the per-task draw
counts. Rank r of W takes draws r, r + W, r + 2W, ..., and every rank steps through whole rounds of W draws,
so all ranks hold the same state after each draw: any rank's state_dict resumes every rank (even with a
different world size), and no two ranks ever get the same draw.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence

from nanochat.tasks.base import Conversation, Task

BLOCK = 4096  # task choices are drawn this many at a time, each block from its own seeded stream


class TaskMixture:
    """Weighted, seeded interleaving of tasks (weights default to equal); iterate it for conversations."""

    def __init__(
        self,
        tasks: Sequence[Task],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if weights is None:
            weights = [1.0] * len(tasks)
        if len(weights) != len(tasks):
            raise ValueError(f"got {len(weights)} weights for {len(tasks)} tasks")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"task weights must be finite and >= 0, got {list(weights)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.tasks = list(tasks)
        self.weights = [float(w) for w in weights]
        self.sizes = [len(t) for t in self.tasks]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # tasks with no examples or weight 0 are never drawn
        self._live = [i for i, (w, n) in enumerate(zip(self.weights, self.sizes)) if w > 0 and n > 0]
        if not self._live:
            what = ", ".join(f"{t.name}: {n} examples, weight {w:g}" for t, n, w in zip(tasks, self.sizes, weights))
            raise ValueError(f"empty task mixture: no task has both examples and a weight > 0 ({what or 'no tasks'})")
        total = sum(self.weights[i] for i in self._live)
        self._cumulative = list(itertools.accumulate(self.weights[i] / total for i in self._live))
        self._step = 0  # draws taken from the global stream, by all ranks together
        self._counts = [0] * len(self.tasks)  # draws of each task so far, by all ranks together
        self._block: tuple[int, list[int]] = (-1, [])
        self._orders: dict[int, tuple[int, list[int]]] = {}  # task -> (epoch, its shuffled example order)

    def _task_of(self, draw: int) -> int:
        block, offset = divmod(draw, BLOCK)
        if self._block[0] != block:
            rng = random.Random(f"mixture/{self.seed}/choices/{block}")
            last = len(self._live) - 1  # guards against float rounding at the top of the cumulative sum
            picks = [self._live[min(bisect.bisect_right(self._cumulative, rng.random()), last)] for _ in range(BLOCK)]
            self._block = (block, picks)
        return self._block[1][offset]

    def _example_of(self, task: int, count: int) -> int:
        epoch, offset = divmod(count, self.sizes[task])
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            order = list(range(self.sizes[task]))
            random.Random(f"mixture/{self.seed}/order/{task}/{epoch}").shuffle(order)
            self._orders[task] = cached = (epoch, order)
        return cached[1][offset]

    def advance(self) -> tuple[int, int]:
        """Take this rank's next draw: (position of the task in `tasks`, index of the example in that task)."""
        mine = (-1, -1)
        for offset in range(self.world_size):  # the whole round, so the per-task counts stay global
            task = self._task_of(self._step + offset)
            if offset == self.rank:
                mine = (task, self._counts[task])
            self._counts[task] += 1
        self._step += self.world_size
        return mine[0], self._example_of(*mine)

    def __iter__(self) -> TaskMixture:
        return self

    def __next__(self) -> Conversation:
        task, index = self.advance()
        return self.tasks[task][index]

    @property
    def epoch(self) -> float:
        """How many times over the stream has gone through the drawable examples (1.0 = as many draws as examples)."""
        return self._step / sum(self.sizes[i] for i in self._live)

    def _signature(self) -> list:
        return [[t.name, t.split, n, w] for t, n, w in zip(self.tasks, self.sizes, self.weights)]

    def state_dict(self) -> dict:
        """The position in the stream (plain JSON-able data); the same on every rank after the same draws."""
        return {"step": self._step, "counts": list(self._counts), "seed": self.seed, "tasks": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of this mixture (same tasks, sizes, weights and seed); the world size may
        differ from the one that saved it."""
        if state.get("seed") != self.seed or state.get("tasks") != self._signature():
            raise ValueError(
                f"the saved task-mixture state is for another mixture (seed {state.get('seed')}, tasks"
                f" {state.get('tasks')}), not this one (seed {self.seed}, tasks {self._signature()})"
            )
        self._step = int(state["step"])
        self._counts = [int(c) for c in state["counts"]]
