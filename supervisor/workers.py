"""The processes of one attempt: torchrun's workers as they appear, with their ranks, how and when each ended,
which got our stop signal, and whatever else carries the attempt's tag.

torchrun starts each worker in a session of its own, so neither torchrun's process group nor its session holds
them; a worker whose torchrun died is reparented and invisible as a child. We track them from the start instead
(pid plus create time: psutil refuses to signal a reused pid) and, at the end, look for every live process whose
environment carries the attempt id (procs.ATTEMPT_ENV), which catches anything the tracking missed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from supervisor import procs


@dataclass
class Worker:
    proc: psutil.Process
    rank: int | None
    local_rank: int | None
    signalled: float | None = None  # monotonic time our stop signal reached it
    exitcode: int | None = None  # Popen-style, when we saw it dead before torchrun reaped it
    ended: float | None = None  # wall time we first saw it dead

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name(self) -> str:
        return f"pid {self.pid}" + (f" (rank {self.rank})" if self.rank is not None else "")

    def to_dict(self) -> dict:
        return {"pid": self.pid, "rank": self.rank, "exitcode": self.exitcode, "ended": self.ended}


class Workers:
    """torchrun's worker processes of one attempt."""

    def __init__(self, attempt_id: str, expected: int):
        self.attempt_id = attempt_id
        self.expected = expected  # workers torchrun starts on this node
        self.all: list[Worker] = []

    def refresh(self, torchrun_pid: int) -> list[Worker]:
        """Add torchrun's new worker children; returns them. Cheap once all expected workers are known."""
        if len(self.all) >= self.expected:
            return []
        try:
            children = psutil.Process(torchrun_pid).children()
        except psutil.Error:
            return []
        known = {w.proc for w in self.all}  # psutil.Process compares pid and create time
        new = []
        for child in children:
            if child in known:
                continue
            try:
                env = child.environ()
            except (psutil.Error, OSError):
                continue
            # between fork and exec a child still shows torchrun's environment: it is a worker once RANK is set
            if env.get(procs.ATTEMPT_ENV) != self.attempt_id or "RANK" not in env:
                continue
            new.append(Worker(child, _int(env.get("RANK")), _int(env.get("LOCAL_RANK"))))
        self.all += new
        return new

    def live(self) -> list[Worker]:
        return [w for w in self.all if w.ended is None and procs.alive(w.proc)]

    def check_exits(self) -> list[Worker]:
        """Workers seen dead for the first time, with their exit status when torchrun has not reaped them yet."""
        ended = []
        for w in self.all:
            if w.ended is not None or procs.alive(w.proc):
                continue
            w.ended, w.exitcode = time.time(), procs.zombie_status(w.pid)
            ended.append(w)
        return ended

    def by_rank(self, rank: int | None) -> Worker | None:
        return next((w for w in self.all if w.rank == rank), None) if rank is not None else None

    def leftovers(self) -> list[psutil.Process]:
        """Every live process of the attempt: tracked workers, plus anything carrying the attempt's tag."""
        found = {w.proc: None for w in self.live()}
        found.update({p: None for p in procs.attempt_processes(self.attempt_id)})
        return list(found)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
