"""In-memory snapshots: checkpoints in shared memory that survive the trainer process but not the machine.

Layout, under a private per-user folder (0700, checked with lstat: never a symlink, never someone else's):

    $NANOCHAT_SHM_DIR (default /dev/shm) /nanochat-snapshots-<uid>/<hash of the checkpoint dir>/
        origin           the checkpoint dir these snapshots belong to
        slot0/, slot1/   written alternately (double buffering); each a checkpoint dir of one checkpoint,
                         files 0600, with the same commit rule and verification as on disk

A snapshot's meta records the run id of its lineage (checkpoint.run_id): only that run ever resumes from it, so
after `rm -rf` of a checkpoint dir a fresh run with the same path starts fresh. Snapshots nobody needs any more
(their checkpoint dir is gone or holds another run, or a newer checkpoint is on disk) are listed by `stale` and
removed by `nanochat-run prune --snapshots`, and at the start of a run whose lineage does not match.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from nanochat.checkpoint.commit import write_text_atomic
from nanochat.checkpoint.discovery import find_latest_valid, valid_newest_first
from nanochat.checkpoint.lineage import run_id
from nanochat.checkpoint.names import Checkpoint
from nanochat.checkpoint.verify import scan
from nanochat.errors import CheckpointError
from nanochat.locks import lock_holder
from nanochat.safefile import make_dir, read_text


def root() -> Path:
    """This user's folder for snapshots: `$NANOCHAT_SHM_DIR` (default /dev/shm) `/nanochat-snapshots-<uid>`."""
    return Path(os.environ.get("NANOCHAT_SHM_DIR", "/dev/shm")) / f"nanochat-snapshots-{os.getuid()}"


def _private(path: Path, create: bool) -> bool:
    """`path` is a real directory owned by us that nobody else can enter (made 0700 if `create`). Anything else
    (a symlink, another owner, group or world access: planted by someone on a shared machine) raises."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        why = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
    elif st.st_uid != os.getuid():
        why = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o077:
        why = f"mode {stat.filemode(st.st_mode)}: others can get in"
    else:
        return True
    raise CheckpointError(
        f"{path} is not a private directory of yours ({why}), so snapshots are not used; remove it, or point"
        " NANOCHAT_SHM_DIR elsewhere"
    )
    return True


def _slot_home(directory: Path) -> Path:
    key = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:16]
    return root() / key


def slots(directory: Path) -> list[Path]:
    """The two in-memory snapshot slots of a checkpoint dir, written alternately (double buffering).

    They live in shared memory under a private per-user folder (`root`), in a subfolder derived from the
    checkpoint dir, so they survive the trainer process (crash, OOM kill, hang kill) but not the machine. Each slot
    is a checkpoint directory of its own, with the same files, commit rule and verification, holding one checkpoint
    whose meta records the run id: only the same lineage ever resumes from it.
    """
    home = _slot_home(directory)
    return [home / "slot0", home / "slot1"]


def prepare_slot(slot: Path, directory: Path) -> None:
    """Create (privately) and empty a snapshot slot before reuse: the meta first, so it is never half valid."""
    home = slot.parent
    make_dir(home.parent.parent)
    for d in (home.parent, home, slot):
        _private(d, create=True)
    if not (home / "origin").exists():  # which checkpoint dir these snapshots belong to (prune --snapshots)
        write_text_atomic(home / "origin", str(directory.resolve()) + "\n", private=True)
    for path in sorted(slot.iterdir(), key=lambda p: not p.name.startswith("meta")):
        path.unlink(missing_ok=True)


def newest(
    directory: Path, run: str | None, verify: bool = True, load_check: bool = True
) -> tuple[Path, Checkpoint] | None:
    """(slot, checkpoint) of the newest valid snapshot of this checkpoint dir written by run `run`, if any."""
    home = _slot_home(directory)
    if run is None or not _private(home.parent, create=False) or not _private(home, create=False):
        return None
    best = None
    for slot in slots(directory):
        ckpt = _of_run(slot, run, verify, verify and load_check)
        if ckpt and (best is None or ckpt.step > best[1].step):
            best = (slot, ckpt)
    return best


def holding(directory: Path, run: str, step: int, verify: bool = True) -> Path | None:
    """The slot on this machine holding a valid snapshot of `step` written by run `run` (several machines: each
    holds its own), or None."""
    try:
        for slot in slots(directory) if newest(directory, run, verify=False) else []:  # (checks the folders)
            if _of_run(slot, run, verify, verify, step):
                return slot
    except (OSError, CheckpointError):  # unreadable shared memory: not held
        pass
    return None


def _of_run(slot: Path, run: str, verify: bool, load_check: bool, step: int | None = None) -> Checkpoint | None:
    """The newest valid checkpoint of one slot (a checkpoint dir of its own: the one resolver's `LocalDir`) that run
    `run` wrote, or the one at `step`; never through a symlinked slot."""
    if slot.is_symlink():
        return None
    mine = lambda c: c.meta.run_id == run  # noqa: E731
    return next(valid_newest_first(slot, verify=verify, load_check=load_check, accept=mine, step=step), None)


def remove(directory: Path) -> bool:
    """Delete this checkpoint dir's snapshots (the run is complete, pruned or restarted from scratch)."""
    return remove_home(_slot_home(directory))


def remove_home(home: Path) -> bool:
    if not home.exists() or home.is_symlink():
        return False
    shutil.rmtree(home, ignore_errors=True)
    return True


def stale() -> list[tuple[Path, str]]:
    """This user's snapshot folders that no run needs, with the reason: their checkpoint dir is gone or holds
    another run now, or they are not newer than its newest valid checkpoint. Folders of a live trainer are kept."""
    top = root()
    try:
        if not _private(top, create=False):
            return []
    except CheckpointError:
        return []
    found = []
    for home in sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink()):
        try:
            origin = Path(read_text(home / "origin", limit=1 << 16).strip())
        except (OSError, UnicodeDecodeError):
            found.append((home, "no record of its checkpoint dir (debris)"))
            continue
        if not origin.is_dir():
            found.append((home, f"{origin} no longer exists"))
        elif lock_holder(origin, "trainer"):
            continue
        elif (why := _unneeded(origin)) is not None:
            found.append((home, why))
    return found


def drop_other_runs(directory: Path, run: str) -> bool:
    """At the start of run `run`: remove this checkpoint dir's snapshots if another run (an earlier lineage of the
    same path, e.g. before an `rm -rf`) wrote them. Returns whether anything was removed."""
    home = _slot_home(directory)
    try:
        if not _private(home, create=False):
            return False
    except CheckpointError:
        return False
    held = [c for s in slots(directory) for c in scan(s) if c.committed]
    if held and all(c.meta is not None and c.meta.run_id == run for c in held):
        return False
    return remove_home(home)


def _unneeded(origin: Path) -> str | None:
    disk = find_latest_valid(origin, warn=lambda msg: None)
    run = run_id(origin, disk)
    held = [c for s in slots(origin) for c in scan(s) if c.valid]
    if not held:
        return "holds no valid snapshot"
    if not any(c.meta.run_id == run for c in held):
        return f"written by another run than the one in {origin} now"
    if not (snap := newest(origin, run)):
        return "holds no valid snapshot of the current run"
    if disk and disk.step >= snap[1].step:
        return f"not newer than the checkpoint at step {disk.step} in {origin}"
    return None
