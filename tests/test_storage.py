"""The one resolver (`checkpoint.valid_newest_first`) and the one retention plan (`checkpoint.plan`) over each place a
checkpoint can live: a local dir, an in-memory snapshot slot, a remote (a real fsspec file:// filesystem). The same
files in each place must give the same answer. Real files, in-process, fast."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import Checkpoint, Meta, snapshots
from nanochat.remote import open_remote
from tests.helpers import garble

KINDS = ["local", "slot", "remote"]


def stock(directory: Path, steps: list[int], run: str = "run-a", final: int | None = None) -> None:
    """Committed checkpoints of tiny states at `steps` (the one at `final` marked final)."""
    for step in steps:
        meta = {"run_id": run, "final": step == final}
        checkpoint.write(directory, step, {"w": torch.arange(6.0) + step}, {"m": torch.ones(3) * step}, meta)


def place(kind: str, source: Path, tmp_path: Path) -> checkpoint.CheckpointStorage:
    """The files of `source`, byte for byte, in a storage of `kind`."""
    if kind == "local":
        return checkpoint.LocalDir(source)
    if kind == "slot":
        slot = snapshots.slots(source)[0]
        snapshots.prepare_slot(slot, source)
        for path in source.iterdir():
            shutil.copy2(path, slot / path.name)
        return checkpoint.LocalDir(slot)
    remote = open_remote(f"file://{tmp_path / 'bucket'}")
    remote.makedirs(remote.root)
    for path in source.iterdir():
        remote.fs.put_file(str(path), remote.path(path.name))
    return remote


@pytest.fixture
def damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Steps 4 and 8 of run-a, 6 of run-b; 12 truncated; 16 uncommitted (payload files without a meta)."""
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    d = tmp_path / "ckpt"
    d.mkdir()
    stock(d, [4, 8, 12, 16])
    stock(d, [6], run="run-b")
    model = d / checkpoint.file_name("model", 12)
    model.write_bytes(model.read_bytes()[:-10])
    (d / checkpoint.file_name("meta", 16)).unlink()
    return d


@pytest.mark.parametrize("kind", KINDS)
def test_the_resolver_gives_the_newest_valid_and_says_why_it_skipped_newer_ones(kind, damaged, tmp_path) -> None:
    storage = place(kind, damaged, tmp_path)
    warnings: list[str] = []
    assert [c.step for c in checkpoint.valid_newest_first(storage, warnings.append)] == [8, 6, 4]
    assert warnings[0].startswith("skipping the checkpoint at step 16: no meta file (an ")
    assert warnings[1].startswith("skipping the checkpoint at step 12: model_000012.pt has ")
    assert all(w.endswith("; falling back to an older one") for w in warnings) and len(warnings) == 2

    run_b = lambda c: c.meta["run_id"] == "run-b"  # noqa: E731 - passed over silently, as another run's are
    assert [c.step for c in checkpoint.valid_newest_first(storage, accept=run_b)] == [6]
    assert [c.step for c in checkpoint.valid_newest_first(storage, pytest.fail, step=4)] == [4]  # that step alone
    assert list(checkpoint.valid_newest_first(storage, pytest.fail, step=5)) == []
    assert list(checkpoint.valid_newest_first(storage, step=12)) == []
    if kind == "remote":  # what the uploader, restore and pull ask: the same walk
        assert [s for s, _ in storage.committed("run-a")] == [8, 4] and [s for s, _ in storage.committed()] == [8, 6, 4]
        assert [s for s, _ in storage.committed(step=6)] == [6] and storage.committed("run-a", 6) == []


def test_the_snapshot_slots_resolve_through_the_same_walk(damaged, tmp_path) -> None:
    slot = place("slot", damaged, tmp_path).directory
    assert snapshots.newest(damaged, "run-a") == (slot, checkpoint.inspect(slot, 8))
    assert snapshots.newest(damaged, "run-b")[1].step == 6
    assert snapshots.newest(damaged, "run-c") is None
    assert snapshots.holding(damaged, "run-a", 4) == slot
    assert snapshots.holding(damaged, "run-b", 4) is None and snapshots.holding(damaged, "run-a", 12) is None


def test_the_resolver_checks_checksums_and_the_load_only_where_asked(tmp_path: Path) -> None:
    stock(tmp_path, [4, 8])
    garble(tmp_path / checkpoint.file_name("optim", 8))  # same size, other bytes
    assert checkpoint.find_latest_valid(tmp_path, lambda w: None).step == 4
    assert next(checkpoint.valid_newest_first(tmp_path, pytest.fail, verify=False)).step == 8  # sizes only


def test_the_cache_spares_a_second_verification_until_a_file_changes(tmp_path: Path) -> None:
    stock(tmp_path, [4, 8])
    cache: dict = {}
    assert [c.step for c in checkpoint.valid_newest_first(tmp_path, cache=cache)] == [8, 4] and len(cache) == 2
    optim = tmp_path / checkpoint.file_name("optim", 8)
    st = optim.stat()
    garble(optim)
    os.utime(optim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same identity: the cache vouches for it still
    assert [c.step for c in checkpoint.valid_newest_first(tmp_path, cache=cache)] == [8, 4]
    assert [c.step for c in checkpoint.valid_newest_first(tmp_path)] == [4]  # without the cache: caught
    optim.write_bytes(optim.read_bytes())  # rewritten: a new identity, verified again
    assert [c.step for c in checkpoint.valid_newest_first(tmp_path, cache=cache)] == [4]


def record(step: int, final: bool = False, problem: str = "", committed: bool = True) -> Checkpoint:
    return Checkpoint(step, [], Meta(step=step, files={}, final=final), problem, committed)


@pytest.mark.parametrize(
    "keep, keep_every, doomed",
    [
        (2, 0, [1, 2, 3, 4, 6]),  # 14 and 12 kept (10 damaged takes no slot), debris below 14 goes, 16 stays
        (4, 0, [1, 2, 3, 4]),  # 14, 12, 8 and 6
        (2, 4, [1, 2, 3, 6]),  # 4 is a multiple of keep_every, 8 is final
        (-1, 0, [1, 3]),  # only the debris below the newest valid one
        (0, 0, [1, 2, 3, 4, 6, 12, 14]),  # what a caller allows: the local dirs refuse it (see plan_prune)
    ],
)
def test_the_retention_plan(keep: int, keep_every: int, doomed: list[int]) -> None:
    found = [record(16, committed=False), record(14), record(12), record(10, problem="rotted"), record(8, True),
             record(6), record(4), record(3, committed=False), record(2), record(1, committed=False)]  # fmt: skip
    assert [c.step for c in checkpoint.plan(found, keep, keep_every)] == doomed
    assert checkpoint.plan([record(3, committed=False), record(2, problem="rotted")], 1) == []  # nothing valid


@pytest.mark.parametrize("kind", KINDS)
def test_one_plan_prunes_every_storage_alike(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    d = tmp_path / "ckpt"
    d.mkdir()
    stock(d, [2, 3, 4, 6, 8, 10, 12], final=2)
    (d / checkpoint.file_name("meta", 3)).unlink()  # debris
    garble(d / checkpoint.file_name("model", 12))  # damaged, same size: only a local check sees it
    storage = place(kind, d, tmp_path)
    found = list(checkpoint.checked_newest_first(storage))
    doomed = [c.step for c in checkpoint.plan(found, 2, keep_every=3)]  # 2 is final, 6 a multiple of 3
    assert doomed == ([3, 4, 8] if kind == "remote" else [3, 4])  # a remote checks sizes: 12 takes a slot there
    for step in doomed:
        storage.remove(step, storage.listing()[step])
    assert sorted(storage.listing()) == sorted({2, 3, 4, 6, 8, 10, 12} - set(doomed))
    if kind == "local":
        assert [c.step for c in checkpoint.plan_prune(d, 2, keep_every=3)] == []  # done: the same plan is empty
    if kind == "remote":
        assert storage.plan_prune(2, "run-a", keep_every=3) == {} and storage.plan_prune(2, "run-b") == {}
