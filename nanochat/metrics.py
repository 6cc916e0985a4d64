"""What a run records about itself as it trains: `metrics.jsonl` beside its checkpoints (one JSON line per step,
kept across restarts), and wandb when `--run` names one.

metrics.jsonl holds five kinds of lines, each with "kind", "step" and "time":
    start  an attempt began at "step" (0: from scratch; else the checkpoint it resumed from), with "attempt" (the
           supervisor's attempt number, None when unsupervised) and "reached": the highest step the previous
           attempts had logged (the steps past "step" were lost with them; None when nothing was lost)
    step   one optimizer step: "loss" (smoothed, debiased), "lrm" (learning-rate multiplier), "tok_per_s", "mfu"
           (percent, where the peak is known), "dt" (seconds), "attempt", plus the phase's own numbers (RL's reward)
    eval   an evaluation at "step": the metric by name ("val_bpb", "val_pass@k")
    rollback  the run went back to the checkpoint at "step" after bad numbers at step "at" (nanochat/guard.py):
           "reason" (nan, spike), "skipped" ([first, last] step whose data was skipped), "reached" as for start
    anomaly  bad numbers at "step" that the run went on past (--on_nan/--on_spike=warn): "reason", "action"

A started attempt first drops every line past the step it resumes from (rewriting the file to a temp file and
renaming it, so a crash meanwhile leaves the old file or the new one), then appends its start line: the file always
tells one consistent history, one "step" line per step, plus where each attempt began and what the one before it
lost. Rank 0 writes it; a failure (a full disk, a symlink planted at the name: nanochat/safefile.py never follows
one) warns once and never stops training.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from nanochat import safefile, spare

FILE = "metrics.jsonl"


def read(directory: Path) -> list[dict]:
    """Every well-formed line of a checkpoint dir's metrics.jsonl, in order (a torn last line is skipped)."""
    try:
        return parse(safefile.read_text(directory / FILE, errors="replace"))
    except FileNotFoundError:
        return []


def parse(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def attempt_number() -> int | None:
    """The supervisor's attempt number (NANOCHAT_ATTEMPT_ID is "<run id>-<n>"; a warm spare's is its own tag, and
    the attempt it became is in spare.BECAME_ENV), None when unsupervised."""
    tag = os.environ.get(spare.BECAME_ENV) or os.environ.get("NANOCHAT_ATTEMPT_ID", "")
    tail = tag.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def archive(directory: Path, into: Path) -> None:
    """A fresh start (--resume=False) moved the old checkpoints into `into`: their history goes with them."""
    if (directory / FILE).exists():
        os.replace(directory / FILE, into / FILE)


def setup_wandb(run: str, config: dict, master: bool, warn: Callable[[str], None]):
    """A wandb run when --run names one (rank 0), else None; wandb missing is a warning, not a failure."""
    if run == "dummy" or not master:
        return None
    try:
        import wandb
    except ImportError:
        warn(f"--run={run} asks for wandb logging but wandb is not installed (pip install wandb); not logging")
        return None
    return wandb.init(project="nanochat", name=run, config=config)


class MetricsLog:
    """metrics.jsonl for one attempt (module doc). `enabled` on the checkpoint writers only (rank 0; with a dir per
    node, each node's local rank 0, logging its own loss)."""

    def __init__(self, directory: Path, enabled: bool, start_step: int, warn: Callable[[str], None]) -> None:
        self.path, self.enabled, self.failed, self.warn = directory / FILE, enabled, False, warn
        self.attempt, self.start, self.file = attempt_number(), None, None
        if not enabled:
            return
        try:
            reached = self._cut(start_step)
        except OSError as e:
            self._failed(e)
            return
        # written with the first record: a rerun that finds the run finished and does nothing adds no line
        self.start = {"kind": "start", "step": start_step, "attempt": self.attempt, "reached": reached}

    def _cut(self, step: int) -> int | None:
        """Drop every line past `step` (and a torn or malformed one), atomically; the highest step dropped."""
        try:
            text = safefile.read_text(self.path, errors="replace")
        except FileNotFoundError:
            text = ""
        records, reached = parse(text), None
        kept = [r for r in records if r["step"] <= step]
        for record in records:
            if record["step"] > step and record.get("kind") == "step":
                reached = max(reached or 0, record["step"])
        if len(kept) != len(text.splitlines()) or text and not text.endswith("\n"):
            safefile.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return reached

    def anomaly(self, step: int, **fields) -> None:
        """Bad numbers at `step` that the run went on past (--on_nan/--on_spike=warn: nanochat/guard.py)."""
        self._append({"kind": "anomaly", "step": step, "attempt": self.attempt, **fields})

    def rollback(self, step: int, **fields) -> None:
        """The run went back to `step` (nanochat/guard.py): the lines past it go, a "rollback" line says why."""
        if not self.enabled or self.failed:
            return
        if self.file is not None:
            self.file.close()
            self.file = None
        try:
            reached = self._cut(step)
        except OSError as e:
            self._failed(e)
            return
        self._append({"kind": "rollback", "step": step, "attempt": self.attempt, "reached": reached, **fields})

    def step(self, step: int, **numbers) -> None:
        self._append({"kind": "step", "step": step, "attempt": self.attempt, **numbers})

    def eval(self, step: int, **metric) -> None:
        self._append({"kind": "eval", "step": step, **metric})

    def _append(self, record: dict) -> None:
        if not self.enabled or self.failed:
            return
        if self.start is not None:
            start, self.start = self.start, None
            self._append(start)
        try:
            if self.file is None:  # opened once, line-buffered: a step costs one write, and a crash tears one line
                self.file = safefile.open_append(self.path, "a", buffering=1)  # lives as long as the attempt
            self.file.write(json.dumps({**record, "time": time.time()}) + "\n")
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        if not self.failed:
            self.warn(f"cannot write {self.path} ({e.strerror or e}); training goes on without it")
        self.failed = True
