"""The checkpoint module on real files, in-process: names, atomic commit, verification, fallback, pruning, archive,
clean-up, safe loading and the Saver's disk-space handling. End-to-end crash and resume tests are in test_resume.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch
import xxhash

from nanochat import checkpoint
from nanochat.checkpoint import LATEST, TMP_PREFIX, CheckpointError, file_name
from nanochat.lifeline import writer_id
from nanochat.saver import Saver
from tests.helpers import FORGED, forged, garble, save, states
from tests.runs import dead_pid

# ---- helpers -----------------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory, recursively, with its bytes: to prove nothing was deleted or changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_on_disk(directory: Path) -> list[int]:
    return [c.step for c in checkpoint.scan(directory)]


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(f"{TMP_PREFIX}*"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_meta(directory: Path, step: int, edit) -> None:
    path = directory / file_name("meta", step)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---- names and the saved layout ----------------------------------------------------------------------------


def test_file_names_and_scan_ignore_everything_else(tmp_path: Path) -> None:
    assert file_name("model", 7) == "model_000007.pt"
    assert file_name("optim", 7) == "optim_000007.pt"
    assert file_name("meta", 7) == "meta_000007.json"
    assert file_name("model", 1234567) == "model_1234567.pt"  # more than 6 digits still sorts by number
    save(tmp_path, 3)
    save(tmp_path, 1234567)
    for name in ("model_12.pt", "notes.txt", f"{TMP_PREFIX}model_000009.pt.42", "model_000005.pt.x.damaged"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    ckpts = checkpoint.scan(tmp_path, verify=True)
    assert [c.step for c in ckpts] == [3, 1234567] and all(c.valid for c in ckpts)
    assert [p.name for p in ckpts[1].paths] == ["meta_1234567.json", "model_1234567.pt", "optim_1234567.pt"]
    assert (tmp_path / LATEST).read_text() == "1234567\n"


@pytest.mark.parametrize(
    "name",
    [
        "model_000001.pt\n",  # `$` matches before a trailing newline
        "model_\u0660\u0660\u0660\u0660\u0660\u0661.pt",  # Arabic-Indic digits: `\\d` and int() take them as 1
        "model_\uff10\uff10\uff10\uff10\uff10\uff11.pt",  # fullwidth digits
        "model_0000001.pt",  # not how file_name spells step 1
        "model_000001.json",  # another kind's suffix
        "meta_000001.pt",
        "model_000001.pt.damaged",
        "x_model_000001.pt",
    ],
)
def test_names_are_exact_ascii(tmp_path: Path, name: str) -> None:
    """Only the names file_name spells are checkpoint files: anything else is someone else's, never listed,
    verified, pruned, archived or fetched as part of a checkpoint."""
    assert checkpoint.parse_name(name) is None
    assert checkpoint.parse_name("model_000001.pt") == ("model", 1)
    save(tmp_path, 1)
    (tmp_path / name).write_bytes(b"mine")
    assert [p.name for c in checkpoint.scan(tmp_path) for p in c.paths] == [
        "meta_000001.json", "model_000001.pt", "optim_000001.pt"]  # fmt: skip
    save(tmp_path, 2, keep=1)
    assert steps_on_disk(tmp_path) == [2] and (tmp_path / name).read_bytes() == b"mine"


def test_checkpoints_of_the_crc32_era_still_verify(tmp_path: Path) -> None:
    """Metas written before xxh3-64 record a CRC32: a run spanning the upgrade must still resume from them."""
    save(tmp_path, 5)
    meta_path = tmp_path / "meta_000005.json"
    meta = json.loads(meta_path.read_text())
    for name in meta["files"]:
        meta["files"][name] = {"size": meta["files"][name]["size"], "crc32": zlib.crc32((tmp_path / name).read_bytes())}
    meta_path.write_text(json.dumps(meta))
    assert checkpoint.inspect(tmp_path, 5, verify=True).valid
    garble(tmp_path / "optim_000005.pt")
    assert "fails its checksum" in checkpoint.inspect(tmp_path, 5, verify=True).problem


def test_a_failed_background_write_does_not_cost_the_final_save(tmp_path: Path) -> None:
    """A periodic write that failed in the background is superseded by a final (waited) save that succeeds: the run
    completes (no error raised: the trainer exits 0), and the failure is a warning recorded in the final meta."""
    warnings: list[str] = []
    saver = Saver(tmp_path, keep=-1, warn=warnings.append, log=lambda m: None, async_save=True)
    model, optim = states(1)
    saver.save(2, {**model, "bad": lambda: None}, optim, {}, {}, wait=False)  # cannot be pickled, in the writer
    saver.save(4, model, optim, {"final": True}, {}, wait=True)
    saver.finish()
    assert [c.step for c in checkpoint.scan(tmp_path) if c.valid] == [4]
    final = checkpoint.find_latest_valid(tmp_path, pytest.fail)
    assert final.step == 4 and final.final
    assert len(warnings) == 1 and "an earlier background save failed" in warnings[0] and "pickle" in warnings[0]
    assert final.meta["warnings"] == [warnings[0].removesuffix("; saving step 4 anyway")]


def test_a_failed_background_write_stops_the_next_periodic_save_as_a_storage_error(tmp_path: Path) -> None:
    """Without a later final save, the background failure is raised at the next periodic save: the trainer exits 74
    (a restart may help); an OSError becomes a StorageError that names the step and the directory."""
    saver = Saver(tmp_path / "gone", keep=-1, warn=pytest.fail, log=lambda m: None, async_save=True)
    model, optim = states(1)
    (tmp_path / "gone").write_text("a file where the checkpoint dir should be")
    saver.save(2, model, optim, {}, {}, wait=False)
    with pytest.raises(checkpoint.StorageError, match=r"saving step 2 to .*gone failed"):
        saver.save(4, model, optim, {}, {}, wait=False)


def test_save_writes_model_optim_meta_and_marker_and_loads_back(tmp_path: Path) -> None:
    save(tmp_path, 5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LATEST, "meta_000005.json", "model_000005.pt", "optim_000005.pt"]
    meta = json.loads((tmp_path / "meta_000005.json").read_text())
    assert meta["step"] == 5 and meta["stop_reason"] == "periodic" and meta["saved_at"] > 0
    assert meta["ranks"] == [{"loader": {"offset": 5}}]  # every rank's state (one rank here)
    for kind in ("model", "optim"):
        path = tmp_path / file_name(kind, 5)
        entry = meta["files"][path.name]
        assert entry == {"size": path.stat().st_size, "xxh3_64": xxhash.xxh3_64_hexdigest(path.read_bytes())}
    ckpt = checkpoint.find_latest_valid(tmp_path, warn=pytest.fail)
    model, optim = checkpoint.load(tmp_path, ckpt)
    want_model, want_optim = states(5)
    assert all(torch.equal(model[k], want_model[k]) for k in want_model)
    assert torch.equal(optim["adamw"]["state"][0]["exp_avg"], want_optim["adamw"]["state"][0]["exp_avg"])


def test_update_meta_adds_fields_atomically(tmp_path: Path) -> None:
    save(tmp_path, 2, final=True)
    checkpoint.update_meta(tmp_path, 2, val_bpb=1.25, val_bpb_step=2)
    ckpt = checkpoint.inspect(tmp_path, 2)
    assert ckpt.valid and ckpt.final and ckpt.meta["val_bpb"] == 1.25
    assert temp_files(tmp_path) == []


# ---- atomic writes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_write_leaves_no_temp_file_on_error(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "model_000001.pt"
    target.write_bytes(b"the old content")

    def write(w) -> None:
        w.write(b"x" * 100_000)  # partly written...
        raise error  # ...then the writer fails (or the user hits Ctrl-C)

    with pytest.raises(type(error)):
        checkpoint.commit.write_atomic(target, write)
    assert target.read_bytes() == b"the old content"
    assert temp_files(tmp_path) == []
    checkpoint.write_text_atomic(target, "new")
    assert target.read_text() == "new" and temp_files(tmp_path) == []


def test_atomic_write_on_a_full_disk_raises_enospc_and_cleans_up(small_fs) -> None:
    fs = small_fs("256k")
    target = fs / LATEST
    checkpoint.write_text_atomic(target, "4\n")
    with pytest.raises(OSError) as info:
        checkpoint.write_text_atomic(target, "9" * 1_000_000)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "4\n" and temp_files(fs) == []


# ---- verification ------------------------------------------------------------------------------------------


def _no_size(meta: dict) -> None:
    del meta["files"]["model_000004.pt"]["size"]


def _unlisted(meta: dict) -> None:
    del meta["files"]["model_000004.pt"]


def _listing(name: str, data: bytes = b"alias ls='rm -rf ~'\n"):
    """An edit that makes the meta vouch for one more file, `name`, with that file's true size and checksum."""

    def edit(meta: dict) -> None:
        meta["files"][name] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}

    return edit


DAMAGE = {
    "truncated model": (lambda d: truncate(d / "model_000004.pt"), r"model_000004.pt has \d+ bytes, meta says \d+"),
    "garbage optim": (lambda d: garble(d / "optim_000004.pt"), "optim_000004.pt fails its checksum"),
    "missing model": (lambda d: (d / "model_000004.pt").unlink(), "model_000004.pt is missing"),
    "bad JSON meta": (
        lambda d: (d / "meta_000004.json").write_text('{"step": 4, "files": {'),
        r"meta_000004.json is unreadable \(JSONDecodeError",
    ),
    "binary garbage meta": (
        lambda d: (d / "meta_000004.json").write_bytes(b"\xff\xfe\x00garbage"),
        r"meta_000004.json is unreadable \(UnicodeDecodeError",
    ),
    "meta entry without size": (lambda d: edit_meta(d, 4, _no_size), r"meta_000004.json is unreadable \(KeyError"),
    "meta not listing a file": (lambda d: edit_meta(d, 4, _unlisted), "meta_000004.json does not list model_000004"),
    "meta of another step": (lambda d: edit_meta(d, 4, lambda m: m.update(step=5)), "records step 5"),
    "meta listing a file of its choosing": (
        lambda d: edit_meta(d, 4, _listing(".bashrc")),
        r"meta_000004.json lists '\.bashrc', not a file of step 4",
    ),
    "meta listing another step's file": (
        lambda d: edit_meta(d, 4, _listing("model_000008.pt")),
        r"meta_000004.json lists 'model_000008.pt', not a file of step 4",
    ),
    "meta listing a path": (
        lambda d: edit_meta(d, 4, _listing("../model_000004.pt")),
        r"meta_000004.json lists '\.\./model_000004.pt', not a file of step 4",
    ),
    "files not a dict": (
        lambda d: edit_meta(d, 4, lambda m: m.update(files=[])),
        r"meta_000004.json is unreadable \(AttributeError",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_inspect_names_the_problem(tmp_path: Path, damage: str) -> None:
    save(tmp_path, 4)
    assert checkpoint.inspect(tmp_path, 4).valid
    do, message = DAMAGE[damage]
    do(tmp_path)
    ckpt = checkpoint.inspect(tmp_path, 4)
    assert not ckpt.valid and ckpt.committed
    assert ckpt.problem and len(ckpt.problem.splitlines()) == 1
    assert re.search(message, ckpt.problem), ckpt.problem


def test_inspect_without_meta_is_uncommitted_and_sizes_only_misses_a_flipped_byte(tmp_path: Path) -> None:
    save(tmp_path, 4)
    garble(tmp_path / "model_000004.pt")
    assert checkpoint.inspect(tmp_path, 4, verify=False).valid  # the cheap listing checks sizes only
    assert "checksum" in checkpoint.inspect(tmp_path, 4, verify=True).problem
    (tmp_path / "meta_000004.json").unlink()
    ckpt = checkpoint.inspect(tmp_path, 4)
    assert not ckpt.committed and not ckpt.valid and "no meta file" in ckpt.problem


@pytest.mark.parametrize(
    "content, step, problem",
    [
        (None, None, "latest_step.txt is missing"),
        (b"12\n", 12, ""),
        (b"  7 \n", 7, ""),
        (b"", None, "not a step number"),
        (b"garbage", None, "holds 'garbage', not a step number"),
        (b"-3", None, "not a step number"),
        (b"\x00\xff\xfe\x80", None, "not a step number"),
        (b"\xc2\xb2", None, "not a step number"),  # UTF-8 for superscript two: isdigit() but not int()-able
        (b"1" * 5000 + b"x", None, "not a step number"),
    ],
)
def test_read_latest_marker(tmp_path: Path, content: bytes | None, step: int | None, problem: str) -> None:
    if content is not None:
        (tmp_path / LATEST).write_bytes(content)
    got_step, got_problem = checkpoint.read_latest_marker(tmp_path)
    assert got_step == step
    assert (problem in got_problem) if problem else got_problem == ""
    assert len(got_problem) < 200  # a garbage file does not flood the log


# ---- fallback ----------------------------------------------------------------------------------------------


def test_find_latest_valid_falls_back_warns_and_deletes_nothing(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        save(tmp_path, step)
    truncate(tmp_path / "model_000012.pt")
    garble(tmp_path / "optim_000008.pt")
    before = snapshot(tmp_path)
    warnings: list[str] = []
    ckpt = checkpoint.find_latest_valid(tmp_path, warnings.append)
    assert ckpt.step == 4 and ckpt.valid and ckpt.meta["step"] == 4
    assert len(warnings) == 2
    assert "step 12" in warnings[0] and "truncated" in warnings[0] and "falling back" in warnings[0]
    assert "step 8" in warnings[1] and "checksum" in warnings[1]
    assert snapshot(tmp_path) == before  # nothing deleted, renamed or rewritten


@pytest.mark.parametrize(
    "marker, message",
    [
        (b"oops", "latest_step.txt holds 'oops', not a step number; looking for the newest valid checkpoint"),
        (b"99\n", "latest_step.txt points at step 99, which has no files"),
        (None, "latest_step.txt is missing"),
    ],
)
def test_find_latest_valid_with_a_bad_marker(tmp_path: Path, marker: bytes | None, message: str) -> None:
    for step in (4, 8):
        save(tmp_path, step)
    if marker is None:
        (tmp_path / LATEST).unlink()
    else:
        (tmp_path / LATEST).write_bytes(marker)
    before = snapshot(tmp_path)
    warnings: list[str] = []
    assert checkpoint.find_latest_valid(tmp_path, warnings.append).step == 8
    assert len(warnings) == 1 and message in warnings[0]
    assert snapshot(tmp_path) == before


def test_find_latest_valid_with_nothing_usable(tmp_path: Path) -> None:
    warnings: list[str] = []
    assert checkpoint.find_latest_valid(tmp_path / "missing", warnings.append) is None
    assert checkpoint.find_latest_valid(tmp_path, warnings.append) is None
    assert warnings == []
    save(tmp_path, 4)
    (tmp_path / "optim_000004.pt").unlink()
    assert checkpoint.find_latest_valid(tmp_path, warnings.append) is None
    assert len(warnings) == 1 and "optim_000004.pt is missing" in warnings[0]
    assert (tmp_path / "model_000004.pt").exists() and (tmp_path / "meta_000004.json").exists()


# ---- pruning -----------------------------------------------------------------------------------------------


@pytest.fixture
def prunable(tmp_path: Path) -> Path:
    """2 valid, 3 uncommitted debris, 4 final, 6 valid, 7 damaged (checksum), 8 damaged (size), 10, 12 valid,
    14 uncommitted (newer than the newest valid: a save that may still be retried)."""
    for step in (2, 3, 4, 6, 7, 8, 10, 12, 14):
        save(tmp_path, step, final=step == 4)
    for step in (3, 14):
        (tmp_path / file_name("meta", step)).unlink()
    garble(tmp_path / "model_000007.pt")
    truncate(tmp_path / "optim_000008.pt")
    return tmp_path


@pytest.mark.parametrize(
    "keep, deleted",
    [
        (1, [2, 3, 6, 10]),  # newest valid only (+ the final, the damaged and newer debris)
        (2, [2, 3, 6]),
        # the kept set is verified: the checksum-damaged 7 (same size, only its checksum tells) takes no slot, so
        # the three kept are 12, 10 and 6; 7 itself is kept too (damaged: the user decides)
        (3, [2, 3]),
        (6, [3]),  # six valid ones, the final among them: only the older debris goes
        (-1, []),  # keep everything
    ],
)
def test_plan_prune_and_prune(prunable: Path, keep: int, deleted: list[int]) -> None:
    planned = checkpoint.plan_prune(prunable, keep)
    assert [c.step for c in planned] == deleted
    removed = checkpoint.prune(prunable, keep)
    assert sorted({checkpoint.names._NAME.match(p.name).group(2) for p in removed}) == [f"{s:06d}" for s in deleted]
    assert steps_on_disk(prunable) == [s for s in (2, 3, 4, 6, 7, 8, 10, 12, 14) if s not in deleted]
    assert checkpoint.inspect(prunable, 4).final and checkpoint.inspect(prunable, 12).valid  # never pruned
    assert (prunable / "model_000007.pt").exists() and (prunable / "optim_000008.pt").exists()  # damaged: kept


def test_keep_every_keeps_the_multiples_on_top_of_the_newest(tmp_path: Path) -> None:
    for step in range(2, 21, 2):
        save(tmp_path, step)
    assert [c.step for c in checkpoint.plan_prune(tmp_path, 2, keep_every=6)] == [2, 4, 8, 10, 14, 16]
    save(tmp_path, 22, keep=2, keep_every=6)  # the saver prunes by the same rule after its commit
    assert steps_on_disk(tmp_path) == [6, 12, 18, 20, 22]


def test_a_rotted_newest_checkpoint_never_costs_the_valid_ones(tmp_path: Path) -> None:
    """The hostile-review case: keep=1, the newest checkpoint (30) rots at the same size, resume falls back to 20.
    The next save (25) must keep 25, the newest *verified* checkpoint, not prune it and 20 for the corrupt 30."""
    for step in (20, 30):
        save(tmp_path, step)
    garble(tmp_path / "model_000030.pt")
    assert checkpoint.find_resume_point(tmp_path, lambda w: None)[1].step == 20
    assert [c.step for c in checkpoint.plan_prune(tmp_path, 1)] == []  # 20 is the newest verified: kept
    save(tmp_path, 25, keep=1)  # prunes after the commit, as the trainer's saver does
    assert steps_on_disk(tmp_path) == [25, 30]
    point = checkpoint.find_resume_point(tmp_path, lambda w: None)
    assert point[1].step == 25 and point[1].valid
    assert (tmp_path / "model_000030.pt").exists()  # the damaged one is the user's to look at


def test_a_checkpoint_that_checksums_but_does_not_load_safely_is_skipped(tmp_path: Path) -> None:
    """A forged meta with matching checksums over a file that weights_only refuses (a pickled object): invalid
    like any damaged checkpoint, skipped with a warning; resume falls back and prune never counts it."""
    for step in (4, 8):
        save(tmp_path, step)
    path = tmp_path / "model_000008.pt"
    torch.save({"w": torch.zeros(2), "evil": Path("/tmp")}, path)  # an object weights_only does not allow
    edit_meta(tmp_path, 8, lambda m: m["files"][path.name].update(size=path.stat().st_size,
                                                                 xxh3_64=checkpoint.file_digest(path)))  # fmt: skip
    bad = checkpoint.inspect(tmp_path, 8)
    assert not bad.valid and "model_000008.pt does not load safely (UnpicklingError" in bad.problem
    assert checkpoint.inspect(tmp_path, 8, verify=False).valid  # sizes alone cannot tell
    warnings: list[str] = []
    assert checkpoint.find_resume_point(tmp_path, warnings.append)[1].step == 4
    assert len(warnings) == 1 and "skipping the checkpoint at step 8" in warnings[0] and "load safely" in warnings[0]
    assert checkpoint.plan_prune(tmp_path, 1) == []


@pytest.mark.parametrize("kind", FORGED)
def test_a_forged_compressed_file_is_invalid_and_resume_falls_back(tmp_path: Path, kind: str) -> None:
    """A compressed payload whose index declares a wrapping shape, a decompression bomb, or is truncated or
    garbled, vouched for by a forged meta (right size and checksum): invalid at verification, like any damaged
    checkpoint, so resume falls back to the older one instead of failing at load at every restart."""
    for step in (4, 8):
        save(tmp_path, step, codec="zstd")
    path = tmp_path / "model_000008.pt"
    path.write_bytes(forged(kind))
    edit_meta(tmp_path, 8, lambda m: m["files"][path.name].update(size=path.stat().st_size,
                                                                 xxh3_64=checkpoint.file_digest(path)))  # fmt: skip
    assert checkpoint.inspect(tmp_path, 8, verify=False).valid  # sizes alone cannot tell
    warnings: list[str] = []
    where, point = checkpoint.find_resume_point(tmp_path, warnings.append)
    assert point.step == 4 and checkpoint.load(where, point)[0]["wte.weight"].shape == (256, 8)
    assert len(warnings) == 1 and "skipping the checkpoint at step 8: model_000008.pt is not a valid compressed" \
        in warnings[0], warnings  # fmt: skip
    with pytest.raises(CheckpointError, match="model_000008.pt cannot be read"):  # and loading it anyway is refused
        checkpoint.load(tmp_path, checkpoint.inspect(tmp_path, 8, verify=False))


def test_prune_refuses_keep_zero(prunable: Path) -> None:
    with pytest.raises(CheckpointError, match="keep at least 1"):
        checkpoint.plan_prune(prunable, 0)


def test_prune_deletes_the_meta_first(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save(tmp_path, step)
    names = {p.name for p in tmp_path.iterdir()}
    deleted: list[str] = []

    def hook(phase: str) -> None:  # runs after every deletion: the state a crash at that instant would leave
        assert phase == "prune"
        now = {p.name for p in tmp_path.iterdir()}
        deleted.extend(sorted(names - now - set(deleted)))
        for step in (2, 4):
            if any(not (tmp_path / file_name(kind, step)).exists() for kind in ("model", "optim", "meta")):
                assert not checkpoint.inspect(tmp_path, step).committed  # half-deleted is never "valid"

    checkpoint.prune(tmp_path, 1, hook)
    assert deleted == [
        *("meta_000002.json", "model_000002.pt", "optim_000002.pt"),
        *("meta_000004.json", "model_000004.pt", "optim_000004.pt"),
    ]
    assert steps_on_disk(tmp_path) == [6]


# ---- archive and clean-up ----------------------------------------------------------------------------------


def test_archive_moves_every_checkpoint_file_and_deletes_nothing(tmp_path: Path) -> None:
    assert checkpoint.archive(tmp_path) is None  # nothing to archive
    for step in (2, 4):
        save(tmp_path, step)
    (tmp_path / "model_000006.pt").write_bytes(b"debris")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    dest = checkpoint.archive(tmp_path)
    assert dest.parent == tmp_path and dest.name.startswith("archived-")
    moved = {name: data for name, data in before.items() if name != "notes.txt"}
    assert {f"{dest.name}/{name}": data for name, data in moved.items()} == {
        name: data for name, data in snapshot(tmp_path).items() if name.startswith(dest.name)
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, "notes.txt"])
    assert checkpoint.find_latest_valid(tmp_path, pytest.fail) is None  # a fresh start sees no checkpoint


def test_archive_twice_in_the_same_second_does_not_collide(tmp_path: Path) -> None:
    now = time.time()
    for t in (now, now + 1):  # the names archive() may pick this second or the next are taken already
        (tmp_path / time.strftime("archived-%Y%m%d-%H%M%S", time.localtime(t))).mkdir(exist_ok=True)
    save(tmp_path, 2)
    first = checkpoint.archive(tmp_path)
    save(tmp_path, 2)
    second = checkpoint.archive(tmp_path)
    assert first != second and first.name.endswith("-1") and second.name[-2:] in ("-1", "-2")
    for dest in (first, second):
        assert checkpoint.inspect(dest, 2).valid


def test_clean_temp_removes_only_temp_files_of_dead_writers(tmp_path: Path) -> None:
    assert checkpoint.clean_temp(tmp_path / "missing") == ([], [])
    save(tmp_path, 4)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        debris = [
            tmp_path / f"{TMP_PREFIX}model_000008.pt.{writer_id(dead.pid)}",
            tmp_path / f"{TMP_PREFIX}{LATEST}.{dead.pid}",
            tmp_path / f"{TMP_PREFIX}meta_000008.json.{alive.pid}-1",  # a reused pid: another process started then
        ]
        in_flight = tmp_path / f"{TMP_PREFIX}optim_000008.pt.{writer_id(alive.pid)}"  # being written
        for p in [*debris, in_flight]:
            p.write_bytes(b"half a file")
        (tmp_path / "notes.txt").write_text("mine")
        keep = {name: data for name, data in snapshot(tmp_path).items() if name not in {p.name for p in debris}}
        assert checkpoint.clean_temp(tmp_path) == (sorted(debris), [in_flight])
        assert snapshot(tmp_path) == keep
        alive.kill()
    assert checkpoint.clean_temp(tmp_path) == ([in_flight], [])


def test_saver_start_removes_temp_debris_with_a_warning(tmp_path: Path) -> None:
    debris = f"{TMP_PREFIX}optim_000008.pt.{dead_pid()}"  # its writer is surely gone (a made-up pid may be alive)
    (tmp_path / debris).write_bytes(b"half")
    warnings: list[str] = []
    Saver(tmp_path, warn=warnings.append).start()
    assert temp_files(tmp_path) == []
    assert warnings == [f"removed {debris}, left by a save that crashed"]


def test_a_temp_name_is_exact_too(tmp_path: Path) -> None:
    """A name that ends in a live pid plus a newline (or in other digits) is not a save in flight: debris."""
    odd = [f"{TMP_PREFIX}model_000008.pt.{os.getpid()}\n", f"{TMP_PREFIX}model_000008.pt.\u0661"]
    for name in odd:
        (tmp_path / name).write_bytes(b"half")
    assert checkpoint.clean_temp(tmp_path) == (sorted(tmp_path / name for name in odd), [])


def test_resaving_a_damaged_step_keeps_the_damaged_files_and_says_so(tmp_path: Path) -> None:
    save(tmp_path, 4)
    truncate(tmp_path / "model_000004.pt")
    damaged = snapshot(tmp_path)
    warnings = save(tmp_path, 4)
    assert len(warnings) == 1 and "step 4 already had a checkpoint (model_000004.pt has" in warnings[0]
    assert ".damaged" in warnings[0]
    assert checkpoint.inspect(tmp_path, 4).valid
    kept = {p.name.split(".")[0]: p.read_bytes() for p in tmp_path.glob("*.damaged")}
    assert kept == {name.split(".")[0]: data for name, data in damaged.items() if name != LATEST}
    # uncommitted debris at a step is simply overwritten, without a warning
    (tmp_path / "meta_000004.json").unlink()
    assert save(tmp_path, 4) == [] and checkpoint.inspect(tmp_path, 4).valid


# ---- loading never runs code -------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls os.mkdir(target): a stand-in for any code a hostile checkpoint could run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_load_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    sentinel = tmp_path / "payload-ran"
    ckpt_dir = tmp_path / "ckpt"
    model, optim = states(1)
    # written through the real Saver, so the meta vouches for the hostile file with the right size and checksum
    Saver(ckpt_dir, warn=pytest.fail, log=lambda m: None).save(
        3, {**model, "evil": Payload(str(sentinel))}, optim, {}, {}
    )
    warnings: list[str] = []
    assert checkpoint.find_latest_valid(ckpt_dir, warnings.append) is None  # verification loads it safely: refused
    assert "model_000003.pt does not load safely (UnpicklingError" in warnings[0]
    ckpt = checkpoint.inspect(ckpt_dir, 3, verify=False)
    assert ckpt.step == 3 and ckpt.valid  # sizes (and checksums) match: only safe loading tells
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        checkpoint.load(ckpt_dir, ckpt)
    assert not sentinel.exists()
    # the file really is hostile: an unrestricted load runs the payload
    torch.load(ckpt_dir / "model_000003.pt", weights_only=False)
    assert sentinel.is_dir()


# ---- disk space --------------------------------------------------------------------------------------------


def huge(nbytes: int) -> torch.Tensor:
    """A tensor that claims nbytes but stores 4 bytes (and saves as a few hundred): a size estimate's worst case."""
    return torch.zeros(1).expand(nbytes // 4)


def test_ensure_space_passes_when_it_fits(tmp_path: Path) -> None:
    save(tmp_path, 2)
    before = snapshot(tmp_path)
    Saver(tmp_path, keep=1, warn=pytest.fail).ensure_space(tmp_path, *states(4))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("keep", [-1, 1, 3])
def test_ensure_space_refuses_a_save_that_cannot_fit_and_deletes_nothing(tmp_path: Path, keep: int) -> None:
    for step in (2, 4, 6):
        save(tmp_path, step)
    before = snapshot(tmp_path)
    warnings: list[str] = []
    saver = Saver(tmp_path, keep=keep, warn=warnings.append, log=lambda m: None)
    with pytest.raises(CheckpointError) as info:
        saver.save(8, {"w": huge(1 << 55)}, {}, {"final": False}, {})  # 32 PiB: no disk anywhere has that
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"not enough disk space in {tmp_path}" in message
    assert "--keep_last_n_checkpoints" in message and "--checkpoint_dir" in message
    assert warnings == [] and snapshot(tmp_path) == before  # pruning could not help, so nothing was pruned
    with pytest.raises(CheckpointError, match="not enough disk space"):
        saver.save(8, {"w": huge(1 << 55)}, {}, {}, {})
    assert snapshot(tmp_path) == before  # no file of step 8, no temp file, marker unchanged


def test_ensure_space_prunes_early_when_that_makes_room(small_fs) -> None:
    fs = small_fs("4m")
    for step in (2, 4, 6):
        save(fs, step, rows=8192)  # ~0.4 MB per checkpoint
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    oldest = checkpoint.inspect(fs, 2).size
    # the estimate is 1.05 * nbytes + 1 MiB: make it need half of the oldest checkpoint more than is free now
    nbytes = int((free + oldest / 2 - (1 << 20)) / 1.05)
    warnings: list[str] = []
    saver = Saver(fs, keep=3, warn=warnings.append, log=lambda m: None)
    saver.save(8, {"w": huge(nbytes)}, {}, {"final": False}, {})
    assert warnings and all("low disk space: pruned" in w and "000002" in w for w in warnings)
    assert steps_on_disk(fs) == [4, 6, 8] and checkpoint.inspect(fs, 8).valid


def test_a_write_that_fills_the_disk_fails_cleanly(small_fs) -> None:
    fs = small_fs("2m")
    save(fs, 2)
    before = snapshot(fs)
    # torch.save writes a view's whole storage, which the estimate does not count: the pre-check passes and
    # the disk fills in the middle of the write, inside torch.save
    view = torch.zeros(1 << 20)[:1]
    warnings: list[str] = []
    saver = Saver(fs, keep=-1, warn=warnings.append, log=lambda m: None)
    with pytest.raises(CheckpointError) as info:
        saver.save(4, {"w": view}, {}, {}, {})
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"saving step 4 to {fs} failed (No space left on device)" in message
    assert "earlier checkpoints are intact" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert snapshot(fs) == before and temp_files(fs) == []
    assert checkpoint.find_latest_valid(fs, pytest.fail).step == 2


def test_a_compressed_file_may_not_declare_more_than_the_model_needs(tmp_path: Path) -> None:
    """Where the model is known (a resume, a chat), it bounds what a compressed file may declare: a state far
    larger than the model (here zeros, which zstd shrinks ~10000x, so the file's own size allows them) is refused
    before it is allocated, as a CheckpointError; the real one loads."""
    model = torch.nn.Linear(16, 16)
    too_big = {"weight": torch.zeros(1 << 20), "bias": torch.zeros(16)}  # 4 MiB, for a model of 272 weights
    checkpoint.write(tmp_path, 4, model.state_dict(), {"m": torch.zeros(16)}, {}, codec="zstd")
    checkpoint.write(tmp_path, 8, too_big, {"m": torch.zeros(16)}, {}, codec="zstd")
    ckpt = checkpoint.inspect(tmp_path, 8)
    assert ckpt.valid and checkpoint.load(tmp_path, ckpt)[0]["weight"].shape == (1 << 20,)  # no model: no bound
    with pytest.raises(CheckpointError, match=r"model_000008\.pt cannot be read .*declares over 4194304 bytes"):
        checkpoint.load(tmp_path, ckpt, model=model)
    with pytest.raises(CheckpointError, match="declares over"):
        checkpoint.load_model(tmp_path, ckpt, model=model)
    state, optim = checkpoint.load(tmp_path, checkpoint.inspect(tmp_path, 4), model=model)
    model.load_state_dict(state)
    assert optim["m"].shape == (16,)
