"""What a checkpoint is on disk: the one place that spells its files' names, and the record of one step's files.

The package's docstring (nanochat/checkpoint/__init__.py) describes the files; the rules on them live beside this
module: commit.py writes them, verify.py checks them, discovery.py and resolve.py find the newest usable one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint.meta import Meta

LATEST = "latest_step.txt"
RUN_ID = ".run_id"
# ASCII digits only, and \Z (not $, which also matches before a trailing newline): a name is exact or not ours
_NAME = re.compile(r"(model|optim|meta)_([0-9]{6,})\.(?:pt|json)")
KINDS = ("model", "optim")  # the payload files a meta vouches for


def file_name(kind: str, step: int) -> str:
    """The one place that spells checkpoint file names."""
    return f"{kind}_{step:06d}.json" if kind == "meta" else f"{kind}_{step:06d}.pt"


def parse_name(name: str) -> tuple[str, int] | None:
    """(kind, step) of a checkpoint file name, exactly as `file_name` spells it; None for any other file (a
    trailing newline, other digits, extra zeros or another suffix make it someone else's file)."""
    m = _NAME.fullmatch(name)
    if not m:
        return None
    kind, step = m.group(1), int(m.group(2))
    return (kind, step) if file_name(kind, step) == name else None


@dataclass
class Checkpoint:
    """What is on disk for one step, and whether it is usable."""

    step: int
    paths: list[Path]
    meta: Meta | None = None  # parsed once, where the meta is read and verified (verify.inspect)
    problem: str = ""  # empty when valid
    committed: bool = False  # a meta file exists (parseable or not)

    @property
    def valid(self) -> bool:
        return self.committed and not self.problem

    @property
    def final(self) -> bool:
        return self.meta is not None and self.meta.final

    @property
    def weights_only(self) -> bool:
        """Its optimizer file was dropped (see `slim`): fine for evaluation, chat and the next phase; a resume from
        it starts the optimizer afresh."""
        return self.meta is not None and self.meta.weights_only

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths if p.exists())


def steps_on_disk(directory: Path) -> dict[int, list[Path]]:
    """{step: its checkpoint files} of a directory (any file `parse_name` accepts; none if it is not a directory)."""
    found: dict[int, list[Path]] = {}
    if directory.is_dir():
        for p in directory.iterdir():
            if parsed := parse_name(p.name):
                found.setdefault(parsed[1], []).append(p)
    return found


def record_path(directory: Path, kind: str, step: int) -> Path:
    """Where a record about the checkpoint at `step` lives (see `commit.write_record`)."""
    return directory / f"{kind}_{step:06d}.json"
