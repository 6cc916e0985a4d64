"""THE newest usable checkpoint of a checkpoint dir: the newest valid one on disk or a newer in-memory snapshot.

It sits above both (discovery.py for the disk, snapshots.py for shared memory), so neither imports the other back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nanochat.checkpoint.discovery import find_latest_valid
from nanochat.checkpoint.lineage import run_id
from nanochat.checkpoint.names import Checkpoint
from nanochat.checkpoint.snapshots import newest as newest_snapshot
from nanochat.errors import CheckpointError


def find_resume_point(
    directory: Path,
    warn: Callable[[str], None] = print,
    snapshots: bool = True,
    load_check: bool = True,
    cache: dict | None = None,
) -> tuple[Path, Checkpoint] | None:
    """THE newest usable checkpoint, as (where, checkpoint): the newest valid one on disk, or a newer valid
    in-memory snapshot of the same run (`snapshots`). The trainer resumes from it; the supervisor judges progress
    and completion by it; `status` and `prune` report and keep it (`load_check`: see `inspect`; `cache`: see
    `valid_newest_first`)."""
    disk = find_latest_valid(directory, warn, load_check, cache)
    snap = None
    try:
        snap = newest_snapshot(directory, run_id(directory, disk), load_check=load_check) if snapshots else None
    except CheckpointError as e:  # a planted or shared snapshot folder: never trusted
        warn(str(e))
    if snap and (disk is None or snap[1].step > disk.step):
        return snap
    return (directory, disk) if disk else None
