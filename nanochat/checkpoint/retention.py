"""Retention: which checkpoints to keep, and deleting the rest so that a crash never leaves a half-valid one.

`plan` is the one retention plan, for a local dir (`plan_prune`, `prune`) and for remote copies (nanochat/remote.py's
`Remote.prune`): keep the newest `keep` *verified* checkpoints (the same walk as the resume point, discovery.py's
`valid_newest_first`), plus what no retention deletes (`kept_forever`) and every damaged one (the user decides).
`slim` drops the optimizer file of older checkpoints, `make_room` prunes one more before a save that does not fit,
`archive` moves everything aside for a fresh start.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from nanochat.checkpoint.commit import write_text_atomic
from nanochat.checkpoint.discovery import checked_newest_first, valid_newest_first
from nanochat.checkpoint.names import LATEST, RUN_ID, Checkpoint, file_name, steps_on_disk
from nanochat.checkpoint.storage import LocalDir
from nanochat.errors import CheckpointError
from nanochat.safefile import fsync_path


def kept_forever(step: int, final: bool, keep_every: int) -> bool:
    """A checkpoint no retention deletes: the final one, and with keep_every=N > 0 every N-th step's (for
    evaluation across a run, like Orbax's keep period)."""
    return final or keep_every > 0 and step % keep_every == 0


def plan(found: list[Checkpoint], keep: int, keep_every: int = 0) -> list[Checkpoint]:
    """THE retention plan, for local dirs and remote copies alike: which of `found` (every step of one storage, as
    the resolver's walk checked it, newest first) to delete, oldest first.

    Kept: the newest `keep` valid checkpoints (-1: all), so the newest valid one (the resume point) is never
    deleted while keep >= 1, and a newer checkpoint that failed its check takes no keep slot; beyond them the ones
    no retention deletes (`kept_forever`). Damaged ones (committed, not valid) are never deleted: the user decides
    about those. Uncommitted files (no meta) older than the newest valid checkpoint are debris and go too."""
    valid = [c for c in found if c.valid]
    if not valid:
        return []
    kept = len(valid) if keep < 0 else keep
    doomed = [c for c in valid[kept:] if not kept_forever(c.step, c.final, keep_every)]
    doomed += [c for c in found if not c.committed and c.step < valid[0].step]
    return sorted(doomed, key=lambda c: c.step)


def plan_prune(directory: Path, keep: int, cache: dict | None = None, keep_every: int = 0) -> list[Checkpoint]:
    """What pruning a local dir to the newest `keep` valid checkpoints would delete (see `plan`). Verification
    reads each checkpoint (once per `cache`, see `valid_newest_first`); keep=-1 deletes nothing here, not even
    debris, and so reads nothing (a remote's listing is cheap: it drops its debris then too)."""
    if keep == -1:
        return []
    if keep < 1:
        raise CheckpointError(f"cannot keep {keep} checkpoints: keep at least 1 (or -1 for all)")
    return plan(list(checked_newest_first(directory, cache)), keep, keep_every)


def prune(
    directory: Path,
    keep: int,
    hook: Callable[[str], None] | None = None,
    cache: dict | None = None,
    keep_every: int = 0,
) -> list[Path]:
    """Delete what plan_prune names: the meta first, so a crash mid-prune leaves no half-valid checkpoint."""
    return _delete(directory, plan_prune(directory, keep, cache, keep_every), hook)


def slim(directory: Path, keep_full: int, cache: dict | None = None) -> list[Path]:
    """Drop the optimizer file of every valid checkpoint older than the newest `keep_full` ones (-1: none), except a
    final one: the disk budget of a long run, where only the newest checkpoint needs the optimizer state for an
    exact resume. The meta is rewritten first, as weights-only (that is the commit of the change), then the file is
    deleted: a crash between leaves a valid weights-only checkpoint and a stray file the next call removes."""
    if keep_full == -1:
        return []
    removed = []
    for i, c in enumerate(valid_newest_first(directory, cache=cache)):
        optim = directory / file_name("optim", c.step)
        if i < keep_full or c.final:
            continue
        if not c.weights_only:
            files = {name: f for name, f in c.meta.files.items() if name != optim.name}
            meta = replace(c.meta, weights_only=True, files=files)
            write_text_atomic(directory / file_name("meta", c.step), json.dumps(meta.to_dict(), indent=1))
        if optim.exists():
            optim.unlink()
            removed.append(optim)
    if removed:
        fsync_path(directory)
    return removed


def make_room(directory: Path, keep: int, need: int, cache: dict | None = None, keep_every: int = 0) -> list[Path]:
    """Before a save of `need` bytes that does not fit: prune one more than usual (to keep-1, at least 1), so the
    new checkpoint takes the freed slot, but only if that makes room. A save that cannot fit anyway must fail with
    every earlier checkpoint still in place. Returns what was deleted."""
    free = shutil.disk_usage(directory).free
    if free >= need or keep == -1:
        return []
    doomed = plan_prune(directory, max(1, keep - 1), cache, keep_every)
    if free + sum(c.size for c in doomed) < need:
        return []
    return _delete(directory, doomed)


def _delete(directory: Path, doomed: list[Checkpoint], hook: Callable[[str], None] | None = None) -> list[Path]:
    storage = LocalDir(directory, hook)
    removed = [path for ckpt in doomed for path in storage.remove(ckpt.step, ckpt.paths)]
    if removed:
        fsync_path(directory)
    return removed


def archive(directory: Path) -> Path | None:
    """Move every checkpoint file, the latest marker and the run id into a new `archived-<time>/` subfolder (a
    fresh start); nothing is deleted."""
    files = [p for paths in steps_on_disk(directory).values() for p in paths]
    files += [directory / name for name in (LATEST, RUN_ID) if (directory / name).exists()]
    if not files:
        return None
    stamp = time.strftime("archived-%Y%m%d-%H%M%S")
    dest, n = directory / stamp, 1
    while dest.exists():  # two fresh starts within a second must not collide
        dest, n = directory / f"{stamp}-{n}", n + 1
    dest.mkdir()
    for p in files:
        p.rename(dest / p.name)
    fsync_path(directory)
    return dest
