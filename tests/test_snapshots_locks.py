"""In-memory snapshots on a shared machine (a private per-user folder, run lineage, stale ones) and the locks that
keep one trainer and one supervisor per checkpoint dir. In-process on real files; the lock holder is a real
second process."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanochat import checkpoint
from nanochat.checkpoint import CheckpointError, snapshots
from nanochat.locks import LOCKS, DirLock, LockError, lock_holder
from nanochat.saver import Saver
from tests.helpers import garble, save, states


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private stand-in for /dev/shm."""
    where = tmp_path / "shm"
    where.mkdir()
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(where))
    return where


def snap(directory: Path, step: int, run: str) -> None:
    """Write an in-memory snapshot of `directory` at `step` for run `run`, through the real Saver."""
    saver = Saver(directory, keep=-1, warn=pytest.fail, log=lambda m: None, run_id=run)
    model, optim = states(step)
    saver.save(step, model, optim, {"run_id": run, "final": False}, {}, disk=False, memory=True)


# ---- a private folder: nobody else can read, plant or redirect snapshots ------------------------------------


def test_snapshots_are_private_to_their_user(shm: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    snap(d, 3, "run-a")
    root = snapshots.root()
    assert root == shm / f"nanochat-snapshots-{os.getuid()}"
    for folder in (root, snapshots.slots(d)[0].parent, *(s for s in snapshots.slots(d) if s.exists())):
        assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700, folder
    files = [p for s in snapshots.slots(d) if s.exists() for p in s.iterdir()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert snapshots.newest(d, "run-a")[1].step == 3


@pytest.mark.parametrize("plant", ["symlink", "world-writable", "other-owner"])
def test_a_planted_snapshot_folder_is_refused_and_nothing_is_deleted(shm: Path, tmp_path: Path, plant: str) -> None:
    """Someone creates our per-user folder first (or a symlink to a victim dir): we neither write into it, read
    snapshots from it, nor delete anything through it; the snapshot fails with a warning, training goes on."""
    if plant == "other-owner" and os.getuid() != 0:
        pytest.skip("needs root to give the folder another owner")
    d, victim = tmp_path / "ckpt", tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    root = snapshots.root()
    if plant == "symlink":
        root.symlink_to(victim)
    else:
        root.mkdir(mode=0o777)
        os.chmod(root, 0o777 if plant == "world-writable" else 0o700)
        if plant == "other-owner":
            os.chown(root, 65534, 65534)
    warnings: list[str] = []
    saver = Saver(d, keep=-1, warn=warnings.append, log=lambda m: None, run_id="run-a")
    model, optim = states(1)
    saver.save(1, model, optim, {"run_id": "run-a"}, {}, disk=True, memory=True)
    assert saver.snapshots_off and len(warnings) == 1
    assert "in-memory snapshot failed" in warnings[0] and "is not a private directory of yours" in warnings[0]
    assert checkpoint.inspect(d, 1).valid  # the disk checkpoint is saved all the same
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    seen: list[str] = []
    assert checkpoint.find_resume_point(d, seen.append)[1].step == 1  # a planted folder is never read
    assert any("is not a private directory of yours" in w for w in seen)
    assert snapshots.stale() == []  # and never listed for deletion
    assert not snapshots.remove(d) or plant != "symlink"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


# ---- lineage: a snapshot belongs to the run that wrote it ---------------------------------------------------


def test_a_fresh_run_at_the_same_path_never_resumes_an_old_runs_snapshot(shm: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    old = checkpoint.start_lineage(d)
    snap(d, 6, old)
    assert checkpoint.find_resume_point(d, pytest.fail)[1].step == 6  # the same run resumes from it
    shutil.rmtree(d)  # the user deletes the run's checkpoints
    d.mkdir()
    assert checkpoint.find_resume_point(d, pytest.fail) is None  # no lineage on disk: the snapshot is not ours
    new = checkpoint.start_lineage(d)
    assert new != old and checkpoint.run_id(d) == new
    assert checkpoint.find_resume_point(d, pytest.fail) is None
    assert snapshots.drop_other_runs(d, new)  # what the trainer does at start: the old snapshot goes
    assert not snapshots.slots(d)[0].parent.exists()


def test_the_lineage_survives_in_the_metas(shm: Path, tmp_path: Path) -> None:
    """Without `.run_id` (deleted, or a directory from before it existed) the newest valid meta names the run."""
    d = tmp_path / "ckpt"
    d.mkdir()
    rid = checkpoint.start_lineage(d)
    Saver(d, keep=-1, warn=pytest.fail, log=lambda m: None).save(4, *states(4), {"run_id": rid}, {})
    snap(d, 6, rid)
    (d / checkpoint.RUN_ID).unlink()
    assert checkpoint.find_resume_point(d, pytest.fail)[1].step == 6
    assert checkpoint.start_lineage(d, checkpoint.find_latest_valid(d)) == rid
    assert not snapshots.drop_other_runs(d, rid)


def test_resume_false_archives_the_lineage(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    rid = checkpoint.start_lineage(d)
    save(d, 2)
    dest = checkpoint.archive(d)
    assert (dest / checkpoint.RUN_ID).read_text().strip() == rid and checkpoint.run_id(d) is None
    assert checkpoint.start_lineage(d) != rid


def test_stale_snapshots_are_listed_with_their_reason(shm: Path, tmp_path: Path) -> None:
    gone, other, older, needed, live = (tmp_path / name for name in ("gone", "other", "older", "needed", "live"))
    for d in (gone, other, older, needed, live):
        d.mkdir()
        rid = checkpoint.start_lineage(d)
        snap(d, 6, rid)
    shutil.rmtree(gone)
    (other / checkpoint.RUN_ID).write_text("someone-else\n")  # the dir holds another run now
    Saver(older, keep=-1, warn=pytest.fail, log=lambda m: None).save(8, *states(8), {}, {})  # disk is newer
    lock = DirLock(live, "trainer")
    lock.acquire()
    (live / checkpoint.RUN_ID).write_text("someone-else\n")  # stale-looking, but a trainer holds the dir
    try:
        found = {home: why for home, why in snapshots.stale()}
    finally:
        lock.release()
    home = lambda d: snapshots.slots(d)[0].parent  # noqa: E731
    assert set(found) == {home(gone), home(other), home(older)}
    assert "no longer exists" in found[home(gone)]
    assert "written by another run" in found[home(other)]
    assert "not newer than the checkpoint at step 8" in found[home(older)]
    for h in found:
        assert snapshots.remove_home(h)
    assert home(needed).exists() and home(live).exists()


# ---- set aside, never silently replaced ---------------------------------------------------------------------


def test_resaving_a_valid_step_keeps_the_old_files_as_replaced(tmp_path: Path) -> None:
    save(tmp_path, 4)
    warnings = save(tmp_path, 4)
    assert len(warnings) == 1 and "step 4 already had a checkpoint (a valid one, saved again now)" in warnings[0]
    assert len(list(tmp_path.glob("*.replaced"))) == 3 and checkpoint.inspect(tmp_path, 4).valid
    garble(tmp_path / "model_000004.pt")
    assert "damaged" in save(tmp_path, 4)[0] and len(list(tmp_path.glob("*.damaged"))) == 3


def test_make_dir_creates_every_missing_level(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    checkpoint.make_dir(target)
    assert target.is_dir()
    checkpoint.make_dir(target)  # exists already: fine


# ---- locks --------------------------------------------------------------------------------------------------


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the trainer lock of tmp_path/ckpt until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from nanochat.locks import DirLock
        DirLock(Path({str(tmp_path / "ckpt")!r}), "trainer").acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_trainer_waits_for_the_lock_then_names_the_holder(tmp_path: Path, holder) -> None:
    told: list[dict] = []
    with pytest.raises(LockError, match=rf"another trainer \(pid {holder.pid} on .*\) is using .*ckpt"):
        DirLock(tmp_path / "ckpt", "trainer").acquire(wait=0.5, on_wait=told.append)
    assert [t["pid"] for t in told] == [holder.pid]  # told once, while waiting
    info = lock_holder(tmp_path / "ckpt", "trainer")
    assert info["pid"] == holder.pid and info["alive"]
    assert lock_holder(tmp_path / "ckpt", "supervisor") is None  # the two roles are separate locks
    holder.kill()
    holder.wait()
    lock = DirLock(tmp_path / "ckpt", "trainer")
    assert lock.acquire() == f"took over a stale lock from pid {holder.pid} (no longer running)"
    lock.release()
    assert (tmp_path / "ckpt" / LOCKS["trainer"]).read_text() == ""


def test_the_saver_holds_the_trainer_lock_and_refuses_when_it_stays_taken(tmp_path: Path, holder) -> None:
    """A trainer (Saver.start) whose directory stays locked fails with a one-line CheckpointError (exit 2)."""
    logs: list[str] = []
    saver = Saver(tmp_path / "ckpt", warn=pytest.fail, log=logs.append, lock_wait=0.3)
    with pytest.raises(CheckpointError, match=rf"another trainer \(pid {holder.pid} "):
        saver.start()
    assert len(logs) == 1 and f"waiting up to 0.3s for pid {holder.pid}" in logs[0]
