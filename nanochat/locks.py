"""Locks on a checkpoint dir: one trainer writes it, one supervisor drives it.

    .trainer.lock        flock'ed by the trainer (rank 0) for its whole life, supervised or not: a second writer
                         can never start while one is alive (it would delete the first one's temp files)
    .nanochat-run.lock   flock'ed by `nanochat-run train`: one supervisor per checkpoint dir
    .speedrun.lock       flock'ed by `nanochat-run speedrun` in its run dir: one speedrun per run dir

Each lock file names its holder (pid, host, start time) for error messages and `nanochat-run status`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from nanochat import safefile
from nanochat.errors import CheckpointError
from nanochat.lifeline import pid_alive
from nanochat.safefile import make_dir

LOCKS = {"supervisor": ".nanochat-run.lock", "trainer": ".trainer.lock", "speedrun": ".speedrun.lock"}


class LockError(CheckpointError):
    """Another live process holds the directory."""


class DirLock:
    """An exclusive flock on `.trainer.lock` or `.nanochat-run.lock` in a checkpoint dir, naming its holder. The
    kernel drops it when the holder dies, so a lock file whose flock can be taken is stale, whatever pid it names."""

    def __init__(self, directory: Path, role: str, node: int | None = None):
        # a multi-node run's supervisors share the checkpoint dir: one lock per node rank (two supervisors for the
        # same node of the same run are refused, the nodes of one run are not)
        name = LOCKS[role] if node is None else LOCKS[role].replace(".lock", f"-node{node}.lock")
        self.path, self.role = directory / name, role
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0, on_wait: Callable[[dict], None] | None = None) -> str:
        """Take the lock, waiting up to `wait` seconds for a live holder (`on_wait` is told once). Returns a message
        if a stale lock was taken over, else ''. Raises LockError naming the holder if it stays held."""
        make_dir(self.path.parent)
        try:
            fd = safefile.open_fd(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except safefile.UnsafeFileError as e:  # a planted symlink: never locked, written or truncated through
            raise LockError(str(e)) from None
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_lock(self.path)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockError(
                        f"another {self.role} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is using"
                        f" {self.path.parent}; stop it first, or use another --model_tag / --checkpoint_dir"
                    ) from None
                if on_wait and not told:
                    on_wait(holder)
                    told = True
                time.sleep(0.2)
        previous = _read_lock(self.path)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0
        )
        os.fsync(fd)
        self.fd = fd
        if previous.get("pid") and previous["pid"] != os.getpid():
            return f"took over a stale lock from pid {previous['pid']} (no longer running)"
        return ""

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_lock(path: Path) -> dict:
    try:
        info = json.loads(safefile.read_text(path, limit=4096) or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(directory: Path, role: str = "supervisor") -> dict | None:
    """The live process holding the lock ({pid, host, started, alive}), or None (no lock file, or a stale one)."""
    path = directory / LOCKS[role]
    try:
        fd = safefile.open_fd(path, os.O_RDONLY)
    except OSError:  # none, or not a regular file (never followed)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it
    except BlockingIOError:
        info = _read_lock(path)
        info["alive"] = bool(info.get("pid")) and pid_alive(int(info["pid"]))
        return info
    finally:
        os.close(fd)
