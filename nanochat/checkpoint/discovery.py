"""Finding checkpoints: the one walk over the valid ones of any storage, newest first, and the latest marker.

`valid_newest_first` is the one resolver behind the resume point, the kept set, snapshots and remote copies, so
what a run would resume from is always the first checkpoint pruning keeps. The newest usable checkpoint across
disk and in-memory snapshots is resolve.py's `find_resume_point`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from nanochat import safefile
from nanochat.checkpoint.names import LATEST, Checkpoint, steps_on_disk
from nanochat.checkpoint.storage import CheckpointStorage, LocalDir


def read_latest_marker(directory: Path) -> tuple[int | None, str]:
    """(step, problem) from latest_step.txt; problem is empty when the marker is fine."""
    try:
        text = safefile.read_text(directory / LATEST, limit=1 << 16, errors="replace").strip()
    except FileNotFoundError:
        return None, f"{LATEST} is missing"
    except safefile.UnsafeFileError as e:  # a planted symlink, a FIFO: refused, never followed
        return None, f"{LATEST} is {e.strerror}"
    if not (text.isascii() and text.isdigit()):  # isdigit() alone accepts "²", which int() refuses
        return None, f"{LATEST} holds {text[:40]!r}, not a step number"
    return int(text), ""


def find_latest_valid(
    directory: Path, warn: Callable[[str], None] = print, load_check: bool = True, cache: dict | None = None
) -> Checkpoint | None:
    """The newest valid checkpoint on disk (fully verified, once per `cache`: see `valid_newest_first`); warns about
    each newer one it had to skip, and why."""
    on_disk = steps_on_disk(directory)
    if not on_disk:
        return None
    marker, problem = read_latest_marker(directory)
    if problem:
        warn(f"{directory}: {problem}; looking for the newest valid checkpoint instead")
    elif marker not in on_disk:
        warn(f"{directory}: {LATEST} points at step {marker}, which has no files; using the newest valid checkpoint")
    return next(valid_newest_first(directory, warn, cache, load_check), None)


def valid_newest_first(
    where: Path | CheckpointStorage,
    warn: Callable[[str], None] = lambda msg: None,
    cache: dict | None = None,
    load_check: bool = True,
    verify: bool = True,
    accept: Callable[[Checkpoint], bool] | None = None,
    step: int | None = None,
) -> Iterator[Checkpoint]:
    """THE resolver: the valid checkpoints of a storage (a Path is a local dir), newest first, warning about each
    invalid one it skips, with the reason. The one walk behind the resume point (`find_latest_valid`,
    `find_resume_point`), the kept set (retention.py's `plan`), snapshots, the remote's committed copies and every
    "newest" a tool asks for, so the checkpoint a run resumes from is always the first one pruning keeps.

    `verify=False` checks sizes only, `load_check=False` skips the safe load (see `inspect`); `accept` passes over
    valid checkpoints silently (another run's, a non-final one); `step` looks at that step alone. `cache` (a dict
    the caller keeps) remembers fully verified checkpoints by their files' identity (`identity`): a trainer verifies
    each checkpoint once (`Saver.verified`), not again at every prune, nor twice at start; a file replaced or
    rewritten is verified again."""
    for ckpt in checked_newest_first(where, cache, verify, load_check, step):
        if not ckpt.valid:
            warn(f"skipping the checkpoint at step {ckpt.step}: {ckpt.problem}; falling back to an older one")
        elif accept is None or accept(ckpt):
            yield ckpt


def checked_newest_first(
    where: Path | CheckpointStorage,
    cache: dict | None = None,
    verify: bool = True,
    load_check: bool = True,
    step: int | None = None,
) -> Iterator[Checkpoint]:
    """Every step of a storage with checkpoint files, checked, newest first, valid or not (see
    `valid_newest_first`)."""
    storage = LocalDir(where) if isinstance(where, Path) else where
    listing = storage.listing()
    for s in sorted(listing, reverse=True) if step is None else [step] if step in listing else []:
        key = storage.identity(s, listing[s]) if cache is not None else None
        ckpt = cache.get(key) if key is not None else None
        if ckpt is None:
            ckpt = storage.check(s, listing[s], verify, load_check)
            if key is not None and ckpt.valid and verify and load_check:  # the cache vouches for the full check
                cache[key] = ckpt
        yield ckpt
