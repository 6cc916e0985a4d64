"""Fault injection for tests and drills: `--debug_fault=KIND@WHERE:WHAT[!][,rank=R]`.

    sigkill@step:7       SIGKILL this process right after step 7 completes (before its save)
    sigkill@save:optim   SIGKILL in the middle of a save: model|optim (mid-write), meta (before the commit),
                         latest (after the commit, before latest_step.txt), prune (mid-prune), snapshot (in
                         the middle of writing an in-memory snapshot)
    raise@step:5         raise RuntimeError (a crash with a traceback)
    oom@step:5           raise torch.OutOfMemoryError (what a CUDA OOM looks like to the supervisor)
    hang@step:5          stop making progress forever (sleeps; signals still work)
    memhog@step:3        allocate and touch memory until the kernel's OOM killer steps in
    sigkill@upload:optim SIGKILL in the middle of a remote upload (--remote_dir): after model|optim is sent, or
                         before the meta (meta)
    sleep@save:40        sleep 40 s in the middle of every save (a slow save, for grace-period tests)
    sleep@eval:2         sleep 2 s after every validation batch (a slow evaluation, for stop tests)
    nan@step:7           the loss of step 7 is NaN, again on the rerun (bad data: nanochat/guard.py rolls back), until
                         the run has dealt with it (rolled back or skipped the update)
    flip@step:7          the loss of step 7 is NaN on the first try only (a rerun is clean: silent data corruption)
    spike@step:7         the loss of step 7 (and so its gradients) is 100x too large
    sleep@upload:2       sleep 2 s after the model file of every remote upload (a slow upload that progresses)

A fault fires once per checkpoint directory: a marker file `.fault-fired-<spec>` records it, so the restarted run
carries on as after a transient failure. A `!` suffix makes it fire on every attempt, like a deterministic bug.
`,rank=R` picks the rank that misbehaves (default 0). `sleep` faults fire on every save.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat import safefile

_SPEC = re.compile(
    r"^(sigkill|raise|oom|hang|memhog|sleep|nan|flip|spike)@(step|save|eval|upload):([a-z0-9]+)(!?)(?:,rank=(\d+))?$"
)
_LOSS_FAULTS = ("nan", "flip", "spike")  # they change a step's loss (at_loss) rather than end the process
_SAVE_PHASES = ("model", "optim", "meta", "latest", "prune", "snapshot")


@dataclass
class Fault:
    kind: str
    where: str  # "step", "save" or "eval"
    what: str  # a step number or a save phase (or seconds, for sleep)
    every_attempt: bool
    rank: int
    spec: str
    marker_dir: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault | None:
        if not spec:
            return None
        m = _SPEC.match(spec)
        if not m:
            raise ValueError(
                f"--debug_fault={spec!r} is not a fault spec; examples: sigkill@step:7, sigkill@save:optim,"
                " raise@step:5!, hang@step:5, oom@step:5, memhog@step:3, sleep@save:40 (see nanochat/faults.py)"
            )
        kind, where, what, bang, rank = m.groups()
        timed = kind == "sleep"
        if timed and (where == "step" or not what.isdigit()) or not timed and where == "eval":
            raise ValueError(
                f"--debug_fault={spec!r}: sleep takes @save, @eval or @upload:SECONDS, others @step or @save"
            )
        if kind in _LOSS_FAULTS and where != "step":
            raise ValueError(f"--debug_fault={spec!r}: {kind} faults take a step, e.g. {kind}@step:7")
        if not timed and where == "step" and not what.isdigit():
            raise ValueError(f"--debug_fault={spec!r}: step faults take a step number, e.g. @step:7")
        if not timed and where == "save" and what not in _SAVE_PHASES:
            raise ValueError(f"--debug_fault={spec!r}: save phase must be one of {', '.join(_SAVE_PHASES)}")
        if where == "upload" and not timed and what not in ("model", "optim", "meta"):
            raise ValueError(
                f"--debug_fault={spec!r}: upload faults take model, optim or meta, e.g. sigkill@upload:optim"
            )
        return cls(kind, where, what, bool(bang), int(rank or 0), spec)

    def _armed(self, rank: int) -> bool:
        if rank != self.rank:
            return False
        if self.every_attempt or self.kind == "sleep":
            return True
        marker = self.marker
        if os.path.lexists(marker):  # (a link planted there counts as fired: never followed, never written through)
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        safefile.write_text(marker, f"{time.time()}\n")  # before firing: a SIGKILL leaves no chance afterwards
        return True

    @property
    def marker(self) -> Path:
        """The file whose presence means this fault has fired (once per run, unless `!`: every attempt)."""
        safe = re.sub(r"[^a-z0-9]+", "-", self.spec.lower()).strip("-")
        return (self.marker_dir or Path(".")) / f".fault-fired-{safe}"

    def at_loss(self, loss, step: int, rank: int, rerun: bool):
        """A micro-batch's loss in step `step` (a tensor), spoilt as the fault says (`rerun`: the step's second try)."""
        if self.kind not in _LOSS_FAULTS or int(self.what) != step or rank != self.rank:
            return loss
        if self.kind == "nan":  # every try, until settled(): the marker is written once the run dealt with it
            if os.path.lexists(self.marker) and not self.every_attempt:
                return loss
            print(f"debug_fault: nan at step {step}{' (rerun)' * rerun}", flush=True)
            return loss * float("nan")
        if self.kind == "flip" and rerun or not self._armed(rank):
            return loss
        print(f"debug_fault: {self.kind} at step {step}", flush=True)
        return loss * (float("nan") if self.kind == "flip" else 100.0)

    def settled(self) -> None:
        """The loop has dealt with a nan fault's step (rolled back, or skipped its update): it fires no more."""
        if self.kind == "nan" and not os.path.lexists(self.marker):
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            safefile.write_text(self.marker, f"{time.time()}\n")

    def at_step(self, step: int, rank: int) -> None:
        if self.kind in _LOSS_FAULTS:
            return
        if self.where == "step" and int(self.what) == step and self._armed(rank):
            fire(self.kind, f"step {step}")

    def at_save(self, phase: str, rank: int) -> None:
        if self.where != "save":
            return
        if self.kind == "sleep":
            if phase == "model" and rank == self.rank:
                print(f"debug_fault: sleeping {self.what}s inside the save", flush=True)
                time.sleep(float(self.what))
        elif phase == self.what and self._armed(rank):
            fire(self.kind, f"save phase {phase}")

    def at_upload(self, phase: str) -> None:
        """In the uploader thread (rank 0): after the `phase` file is sent (before the meta, for "meta")."""
        if self.where == "upload" and self.kind == "sleep":
            if phase == "model":
                time.sleep(float(self.what))
        elif self.where == "upload" and phase == self.what and self._armed(0):
            fire(self.kind, f"upload phase {phase}")

    def at_eval_batch(self, rank: int) -> None:
        if self.where == "eval" and rank == self.rank:
            time.sleep(float(self.what))


def fire(kind: str, where: str) -> None:
    print(f"debug_fault: {kind} at {where}", flush=True)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "raise":
        raise RuntimeError(f"debug_fault: injected crash at {where}")
    elif kind == "oom":
        import torch  # (here: parsing a fault spec must not import torch)

        raise torch.OutOfMemoryError(f"debug_fault: injected CUDA out of memory at {where}")
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "memhog":
        import torch

        hog = []
        while True:  # 64 MiB at a time, touched so the pages are really resident
            hog.append(torch.ones(16 << 20, dtype=torch.float32))
