"""Where checkpoints can live, as one small interface: a local dir here, each in-memory snapshot slot (a local dir in
shared memory, snapshots.py), and a remote URL (nanochat/remote.py's `Remote`).

The one resolver (discovery.py's `valid_newest_first`) and the one retention plan (retention.py's `plan`) work over
a `CheckpointStorage`, so a fix to "which checkpoint" or "what to keep" lands once for all three places.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nanochat.checkpoint.names import Checkpoint, file_name, steps_on_disk
from nanochat.checkpoint.verify import inspect


class CheckpointStorage(Protocol):
    """A place that holds checkpoints under the names of names.py and the commit rule (a step is committed when
    its meta exists). `files` is whatever the place lists for one step (paths here, names and sizes remotely):
    a caller passes it back unchanged, so each step is listed once per walk."""

    @property
    def location(self) -> str:
        """Where it is, for messages."""
        ...

    def listing(self) -> dict[int, Any]:
        """{step: its files} of every step with any checkpoint file, committed or not."""
        ...

    def check(self, step: int, files: Any, verify: bool, load_check: bool) -> Checkpoint:
        """One step checked as far as this place can: the meta and the sizes it records always, the checksums
        with `verify` and the safe load with `load_check` where the bytes are at hand."""
        ...

    def identity(self, step: int, files: Any) -> Hashable | None:
        """A key that changes whenever the step's files do (for a cache of verified checkpoints); None: never
        cached."""
        ...

    def remove(self, step: int, files: Any) -> list:
        """Delete one step's files, the meta first, so that an interrupted removal never leaves a half-valid
        checkpoint. Returns what was deleted."""
        ...


@dataclass
class LocalDir:
    """A checkpoint dir on a local (or mounted) filesystem; also each in-memory snapshot slot. `fault`: a test hook
    called after each file a removal deletes."""

    directory: Path
    fault: Any = None  # Callable[[str], None] | None

    @property
    def location(self) -> str:
        return str(self.directory)

    def listing(self) -> dict[int, list[Path]]:
        return steps_on_disk(self.directory)

    def check(self, step: int, files: list[Path], verify: bool, load_check: bool) -> Checkpoint:
        return inspect(self.directory, step, files, verify=verify, load_check=load_check)

    def identity(self, step: int, files: list[Path]) -> Hashable:
        return tuple((p.name, *_identity(p)) for p in sorted(files))

    def remove(self, step: int, files: list[Path]) -> list[Path]:
        """(The caller fsyncs the folder once, after its last removal.)"""
        meta = self.directory / file_name("meta", step)
        removed = []
        for path in sorted(files, key=lambda p: p != meta):
            path.unlink(missing_ok=True)
            removed.append(path)
            if self.fault:
                self.fault("prune")
        return removed


def _identity(path: Path) -> tuple:
    """(inode, size, mtime): a file replaced or rewritten is a new one."""
    try:
        st = path.stat()
    except OSError:
        return (None,)
    return st.st_ino, st.st_size, st.st_mtime_ns
