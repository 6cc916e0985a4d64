"""Finding checkpoints on disk: the latest marker, and the walk over the valid ones, newest first.

`valid_newest_first` is the one walk behind the resume point and the kept set, so what a run would resume from is
always the first checkpoint pruning keeps. The newest usable checkpoint across disk and in-memory snapshots is
resolve.py's `find_resume_point`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from nanochat import safefile
from nanochat.checkpoint.names import LATEST, Checkpoint, steps_on_disk
from nanochat.checkpoint.verify import inspect


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
    directory: Path, warn: Callable[[str], None] = lambda msg: None, cache: dict | None = None, load_check: bool = True
) -> Iterator[Checkpoint]:
    """The valid checkpoints of a directory, newest first, each fully verified, warning about each invalid one it
    skips: the one walk behind both the resume point (`find_latest_valid`) and the kept set (`plan_prune`), so
    the checkpoint a run resumes from is always the first one pruning keeps. `cache` (a dict the caller keeps)
    remembers verified checkpoints by their files' identity (inode, size, mtime): a trainer verifies each checkpoint
    once (`Saver.verified`), not again at every prune, nor twice at start; a file replaced or rewritten is verified
    again."""
    on_disk = steps_on_disk(directory)
    for step in sorted(on_disk, reverse=True):
        paths = on_disk[step]
        key = tuple((p.name, *_identity(p)) for p in sorted(paths))
        ckpt = cache.get(key) if cache is not None else None
        if ckpt is None:
            ckpt = inspect(directory, step, paths, verify=True, load_check=load_check)
            if cache is not None and ckpt.valid and load_check:  # the cache vouches for the full check only
                cache[key] = ckpt
        if ckpt.valid:
            yield ckpt
        else:
            warn(f"skipping the checkpoint at step {step}: {ckpt.problem}; falling back to an older one")


def _identity(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (None,)
    return st.st_ino, st.st_size, st.st_mtime_ns
