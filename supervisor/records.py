"""What the supervisor keeps on disk: the run dir layout, the event log, the heartbeat it reads, and the lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from supervisor.procs import pid_alive

LOCK_NAME = ".nanochat-run.lock"  # in the checkpoint dir: the resource two supervisors must not share


@dataclass(frozen=True)
class RunDir:
    """<run dir>/events.jsonl, heartbeat.json and attempt-NNN/ (torchrun.log + torchrun's per-rank logs)."""

    path: Path

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def heartbeat(self) -> Path:
        return self.path / "heartbeat.json"

    def attempt(self, n: int) -> Path:
        return self.path / f"attempt-{n:03d}"


def append_event(run_dir: RunDir, event: str, **fields) -> dict:
    record = {"event": event, "time": time.time(), **fields}
    run_dir.path.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(run_dir.events, "ab+") as f:
        if f.tell() and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n":
            line = "\n" + line  # a supervisor killed mid-write left a torn line: never glue this record onto it
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
    return record


def read_events(run_dir: RunDir) -> list[dict]:
    """Every event; a torn last line (the supervisor was killed mid-write) is skipped."""
    if not run_dir.events.exists():
        return []
    out = []
    for line in run_dir.events.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LockError(RuntimeError):
    pass


class Lock:
    """An exclusive flock on a file in the checkpoint dir. The kernel drops it when we die, so a lock file whose
    flock can be taken is stale, whatever pid it names: we take it over and say so."""

    def __init__(self, checkpoint_dir: Path):
        self.path = checkpoint_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str:
        """Take the lock; returns a message if a stale lock was taken over, else ''. Raises LockError if held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_lock(self.path.parent) or {}
            raise LockError(
                f"another supervisor (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is driving"
                f" {self.path.parent}; stop it first, or use another --model-tag / --checkpoint-dir"
            ) from None
        previous = read_lock(self.path.parent)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous and previous.get("pid") and previous.get("pid") != os.getpid():
            return f"took over a stale lock from pid {previous['pid']} (no longer running)"
        return ""

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def read_lock(checkpoint_dir: Path) -> dict | None:
    try:
        text = (checkpoint_dir / LOCK_NAME).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def lock_holder(checkpoint_dir: Path) -> dict | None:
    """The live supervisor holding the lock, or None (no lock file, or a stale one)."""
    path = checkpoint_dir / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it
    except BlockingIOError:
        info = read_lock(checkpoint_dir) or {}
        info["alive"] = bool(info.get("pid")) and pid_alive(int(info["pid"]))
        return info
    finally:
        os.close(fd)
