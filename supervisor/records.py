"""What the supervisor keeps on disk: the run dir layout, the event log and the heartbeat it reads. (The locks on
the checkpoint dir are nanochat/locks.py's: one owner for the trainer's and the supervisor's.)"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat import safefile
from nanochat.redact import redact

TORCHRUN_LOG = "torchrun.log"  # torchrun's own output in an attempt's log dir, every rank's lines tee'd into it


@dataclass(frozen=True)
class RunDir:
    """<run dir>/events.jsonl, heartbeat.json and attempt-NNN/ (torchrun.log + torchrun's per-rank logs).

    Attempts are numbered across invocations of `nanochat-run train` on one run dir, and an attempt dir is never
    reused: the classifier reads evidence only from the attempt at hand.
    """

    path: Path

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def heartbeat(self) -> Path:
        return self.path / "heartbeat.json"

    def attempt(self, n: int) -> Path:
        return self.path / f"attempt-{n:03d}"

    def attempt_dirs(self, events: list[dict] | None = None) -> dict[int, Path]:
        """Every attempt's log dir by number, oldest first: the attempt-NNN folders, or where the attempt's
        `attempt_start` event says it logged (a temp dir, when the run dir could not take it)."""
        found = {}
        for p in self.path.glob("attempt-*") if self.path.is_dir() else []:
            if (m := re.fullmatch(r"attempt-(\d{3,})", p.name)) and p.is_dir():
                found[int(m.group(1))] = p
        for e in read_events(self) if events is None else events:
            if e.get("event") == "attempt_start" and isinstance(e.get("attempt"), int) and e.get("log_dir"):
                found[e["attempt"]] = Path(e["log_dir"])
        return dict(sorted(found.items()))

    def next_attempt(self) -> int:
        """One past the highest attempt number in the event log or on disk."""
        logged = [e["attempt"] for e in read_events(self) if isinstance(e.get("attempt"), int)]
        n = max(logged, default=0) + 1
        while self.attempt(n).exists():
            n += 1
        return n

    def make_attempt_dir(self, n: int) -> tuple[int, Path, str]:
        """(number, dir, problem) for a new attempt: attempt-NNN, or the next free number if NNN appeared in the
        meantime. If the run dir cannot take it (a full disk), a temp dir elsewhere, and the problem says so."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    self.attempt(n).mkdir()
                    return n, self.attempt(n), ""
                except FileExistsError:
                    n += 1
        except OSError as e:
            where = Path(tempfile.mkdtemp(prefix=f"nanochat-run-attempt-{n:03d}-"))
            return n, where, f"cannot create {self.attempt(n)} ({e}); this attempt's logs go to {where}"


def append_event(run_dir: RunDir, event: str, **fields) -> dict:
    record = {"event": event, "time": time.time(), **fields}
    run_dir.path.mkdir(parents=True, exist_ok=True)
    line = redact(json.dumps(record, default=str)) + "\n"  # never a credential in a URL (nanochat/redact.py)
    with safefile.open_append(run_dir.events, "ab+") as f:  # never through a link planted at the name
        if f.tell() and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n":
            line = "\n" + line  # a supervisor killed mid-write left a torn line: never glue this record onto it
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
    return record


class EventLog:
    """The run's event log, best effort: the supervisor must not die of its own records (a full disk, a read-only
    run dir). The first failure is reported once; later ones are silent, and the run goes on."""

    def __init__(self, run_dir: RunDir, warn: Callable[[str], None]):
        self.run_dir, self.warn, self.failed = run_dir, warn, False

    def append(self, event: str, **fields) -> dict:
        try:
            return append_event(self.run_dir, event, **fields)
        except OSError as e:
            if not self.failed:
                self.warn(f"cannot write the event log {self.run_dir.events} ({e}); going on without it")
            self.failed = True
            return {"event": event, **fields}


def read_events(run_dir: RunDir) -> list[dict]:
    """Every event; a torn last line (the supervisor was killed mid-write) is skipped."""
    try:
        text = safefile.read_text(run_dir.events, errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(safefile.read_bytes(path, limit=1 << 20))  # a planted link or FIFO: no heartbeat
    except (OSError, ValueError):
        return None


def rank_logs(log_dir: Path) -> dict[int, dict[str, Path]]:
    """{local rank: {"stdout": path, "stderr": path}} of one attempt, for the files that exist. torchrun's
    `--log-dir=<attempt dir> --redirects=3` writes them to <log dir>/<rdzv run id>_<random>/attempt_<k>/<local rank>/
    (k counts torchrun's own restarts; we run it with --max-restarts=0, but the newest wins if there are more)."""
    found: dict[int, dict[str, Path]] = {}
    rank_dirs = [p for p in log_dir.glob("*/attempt_*/*") if p.name.isdigit() and p.is_dir()]
    for d in sorted(rank_dirs, key=lambda p: (p.stat().st_mtime, p.parent.name)):
        files = {kind: d / f"{kind}.log" for kind in ("stdout", "stderr") if (d / f"{kind}.log").exists()}
        if files:
            found[int(d.name)] = files
    return dict(sorted(found.items()))
