"""End to end: crashes in the middle of a save, in-memory snapshots, damaged files and full disks. Real trainer
processes, real SIGKILLs, real files (and real small filesystems where the machine lets us mount them); faults
come through --debug_fault. The runs they start from are the session fixtures in conftest.py.
"""

from __future__ import annotations

import errno
import json
import re
import resource
import signal
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import LATEST, TMP_PREFIX, file_name, snapshots
from nanochat.common import EXIT_STORAGE
from tests.runs import (
    assert_finished,
    assert_same_final_state,
    copy,
    one_line_error,
    snapshot,
    step_lines,
    steps,
    temp_files,
    train,
)

pytestmark = pytest.mark.slow


# ---- crashes in the middle of a save -----------------------------------------------------------------------

# SIGKILL in each phase of the save at step 8 -> (files of step 8 left, a half-written temp file left, resumes at)
SAVE_PHASES = {
    "model": ([], True, 4),
    "optim": (["model"], True, 4),
    "meta": (["model", "optim"], False, 4),  # not committed: the meta is the commit point
    "latest": (["model", "optim", "meta"], False, 8),  # committed, the marker still says 4
    "prune": (["model", "optim", "meta"], False, 8),  # committed, killed while deleting step 4
}


@pytest.mark.parametrize("phase", list(SAVE_PHASES))
def test_sigkill_at_every_save_phase(reference_1, crashed_1_at_5, tmp_path, menv, phase) -> None:
    left, half_written, resumes_at = SAVE_PHASES[phase]
    d = copy(crashed_1_at_5, tmp_path)
    args = (f"--debug_fault=sigkill@save:{phase}", "--keep_last_n_checkpoints=1")
    proc = train(menv, d, *args)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert f"debug_fault: sigkill at save phase {phase}" in proc.stdout
    assert [k for k in ("model", "optim", "meta") if (d / file_name(k, 8)).exists()] == left
    temps = temp_files(d)
    assert [re.sub(r"\.\d+(-\d+)?$", "", name) for name in temps] == [f"{TMP_PREFIX}{phase}_000008.pt"] * half_written
    assert (d / LATEST).read_text() == ("8\n" if phase == "prune" else "4\n")
    if phase == "prune":  # the meta went first: step 4 is no longer a checkpoint, only files left to delete
        assert not (d / "meta_000004.json").exists() and (d / "model_000004.pt").exists()

    proc = train(menv, d, *args)  # the same command again: the fault fired already
    assert f"resumed from step {resumes_at} in {d}" in proc.stdout
    for name in temps:
        assert f"WARNING: removed {name}, left by a save that crashed" in proc.stderr
    skipped = "skipping the checkpoint at step 8: no meta file (an uncommitted save, or an interrupted prune)"
    assert (skipped in proc.stderr) == bool(left and resumes_at == 4)
    assert "skipping" not in proc.stderr or resumes_at == 4
    assert_finished(proc, d)
    assert steps(d) == [12]  # keep 1: everything older, the uncommitted files included, is gone
    assert_same_final_state(d, reference_1[0])


def test_async_save_crash_anywhere_still_resumes_bit_exact(reference_1, tmp_path, menv) -> None:
    """With background writes a SIGKILL may land while a write is in flight: that checkpoint is not committed,
    the previous one is used, and the end result is still bit-identical to the uninterrupted run."""
    d = tmp_path / "ckpt"
    args = ("--async_save=True", "--save_every=2", "--debug_fault=sigkill@step:9")
    proc = train(menv, d, *args)
    assert proc.returncode == -signal.SIGKILL
    assert "saving checkpoint to" in proc.stdout and "in the background; blocked" in proc.stdout
    proc = train(menv, d, *args)
    assert re.search(r"resumed from step (6|8) in ", proc.stdout), proc.stdout
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_snapshot_loses_at_most_k_steps_and_resumes_bit_exact(reference_1, tmp_path, menv, monkeypatch, mode) -> None:
    """snapshot_every=2 and no disk save before the crash at step 7: the restart takes the snapshot at 6.

    With background writes too: the snapshot of step 6 is committed before step 7 counts as done."""
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))  # a private stand-in for /dev/shm
    env = {**menv, "NANOCHAT_SHM_DIR": str(tmp_path / "shm")}
    d = tmp_path / "ckpt"
    args = (f"--async_save={mode == 'async'}", "--save_every=100", "--snapshot_every=2", "--debug_fault=sigkill@step:7")
    proc = train(env, d, *args)
    assert proc.returncode == -signal.SIGKILL
    done = "saving snapshot in shared memory in the background" if mode == "async" else "saved snapshot in shared"
    assert f"step 00006 | {done}" in proc.stdout
    assert not list(d.glob("meta_*.json"))  # nothing on disk: only the snapshots can save us
    slots = [sorted(p.name for p in slot.iterdir()) for slot in snapshots.slots(d)]
    assert {"meta_000004.json", "meta_000006.json"} <= {n for names in slots for n in names}  # double-buffered
    proc = train(env, d, *args)
    assert "resume: the in-memory snapshot at step 6" in proc.stdout and f"resumed from step 6 in {d}" in proc.stdout
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])
    assert not snapshots.slots(d)[0].parent.exists()  # dropped once the final checkpoint is durable


def test_kill_in_the_middle_of_a_snapshot_falls_back_to_the_other_slot(reference_1, tmp_path, menv, monkeypatch):
    """Double buffering: a SIGKILL while the snapshot of step 6 is being written leaves the one of step 4 whole,
    and a disk save at the same step as a snapshot snapshots first (the crash costs at most K steps)."""
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    env = {**menv, "NANOCHAT_SHM_DIR": str(tmp_path / "shm")}
    d = tmp_path / "ckpt"
    proc = train(env, d, "--save_every=4", "--snapshot_every=2", "--debug_fault=sigkill@step:5")
    assert proc.returncode == -signal.SIGKILL
    assert re.search(r"step 00004 \| saved checkpoint to .* and snapshot in shared memory", proc.stdout)
    assert snapshots.newest(d, checkpoint.run_id(d))[1].step == 4 and checkpoint.find_latest_valid(d).step == 4
    proc = train(env, d, "--save_every=100", "--snapshot_every=2", "--debug_fault=sigkill@save:snapshot")
    assert proc.returncode == -signal.SIGKILL and "debug_fault: sigkill at save phase snapshot" in proc.stdout
    assert "step 00006 | saving snapshot" not in proc.stdout  # killed inside the write of step 6
    assert snapshots.newest(d, checkpoint.run_id(d))[1].step == 4
    proc = train(env, d, "--save_every=100", "--snapshot_every=2")
    assert f"resumed from step 4 in {d}" in proc.stdout  # 6 - 4 = K steps lost, not more
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])


def test_snapshot_older_than_the_disk_checkpoint_is_ignored_and_resume_false_drops_it(
    tmp_path, menv, monkeypatch
) -> None:
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    env = {**menv, "NANOCHAT_SHM_DIR": str(tmp_path / "shm")}
    d = tmp_path / "ckpt"
    proc = train(env, d, "--snapshot_every=3", "--save_every=4", "--debug_fault=sigkill@step:5")
    assert proc.returncode == -signal.SIGKILL
    assert snapshots.newest(d, checkpoint.run_id(d))[1].step == 3  # older than the disk checkpoint at 4
    proc = train(env, d, "--snapshot_every=3", "--save_every=4", "--num_iterations=6", "--debug_fault=sigkill@step:6")
    assert f"resumed from step 4 in {d}" in proc.stdout and "in-memory snapshot" not in proc.stdout
    assert proc.returncode == -signal.SIGKILL  # a new fault spec: it fires at step 6, after no new snapshot
    proc = train(env, d, "--resume=False", "--num_iterations=2")
    assert "dropped in-memory snapshots left by an earlier run of this checkpoint dir" in proc.stdout


# ---- damaged files -----------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 101):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _forge(path: Path) -> None:
    """Replace a checkpoint file by one that weights_only refuses, and make the meta vouch for it (size, xxh3)."""
    torch.save({"weights": torch.zeros(3), "object": Path("/")}, path)
    meta_path = path.with_name(file_name("meta", int(path.stem.split("_")[1])))
    meta = json.loads(meta_path.read_text())
    meta["files"][path.name] = {"size": path.stat().st_size, "xxh3_64": checkpoint.file_digest(path)}
    meta_path.write_text(json.dumps(meta))


MARKER_GARBAGE = r"latest_step.txt holds .*garbage.*, not a step number; looking for the newest valid checkpoint"
MARKER_NOWHERE = r"latest_step.txt points at step 99, which has no files; using the newest valid checkpoint"
NOT_RESAVED = ("--save_every=0", "--keep_last_n_checkpoints=1")  # the resumed run never saves step 8 again

# damage to the newest checkpoint (step 8), some with a bad marker too -> (warnings, in order; resume args)
DAMAGE = {
    "truncated model, garbage marker": (
        lambda d: _truncate(d / "model_000008.pt") or (d / LATEST).write_bytes(b"\x00\xffgarbage"),
        [MARKER_GARBAGE, r"skipping the checkpoint at step 8: model_000008.pt has \d+ bytes, meta says \d+ \(trunc"],
        (),
    ),
    "garbage optim": (
        lambda d: _garble(d / "optim_000008.pt"),
        [r"skipping the checkpoint at step 8: optim_000008.pt fails its checksum \(corrupted\)"],
        NOT_RESAVED,
    ),
    "deleted model, marker pointing nowhere": (
        lambda d: (d / "model_000008.pt").unlink() or (d / LATEST).write_text("99\n"),
        [MARKER_NOWHERE, r"skipping the checkpoint at step 8: model_000008.pt is missing"],
        (),
    ),
    "forged meta over a file that does not load safely": (
        lambda d: _forge(d / "model_000008.pt"),
        [r"skipping the checkpoint at step 8: model_000008.pt does not load safely \(UnpicklingError"],
        NOT_RESAVED,
    ),
    "broken JSON meta": (
        lambda d: (d / "meta_000008.json").write_text((d / "meta_000008.json").read_text()[:200]),
        [r"skipping the checkpoint at step 8: meta_000008.json is unreadable \(JSONDecodeError"],
        NOT_RESAVED,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(reference_1, crashed_1, tmp_path, menv, damage) -> None:
    do, warnings, args = DAMAGE[damage]
    d = copy(crashed_1, tmp_path)
    do(d)
    damaged = {name: data for name, data in snapshot(d).items() if "000008" in name}
    proc = train(menv, d, *args)
    logged = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: ")]
    assert [i for i, w in enumerate(warnings) if re.search(w, logged[i])] == list(range(len(warnings))), logged
    assert "falling back to an older one" in logged[len(warnings) - 1]
    assert f"resumed from step 4 in {d}" in proc.stdout and step_lines(proc.stdout)[0] == 5
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])
    if args == NOT_RESAVED:  # the damaged files stay as they are, not even pruned, for the user to look at
        assert "damaged" not in proc.stderr and not list(d.glob("*.damaged"))
        assert {name: data for name, data in snapshot(d).items() if name in damaged} == damaged
        assert steps(d) == [8, 12]  # 4 pruned (keep 1)
    else:  # re-saving step 8 set the damaged files aside first, and said so
        assert re.search(r"step 8 already had a checkpoint \(.+\); kept its files as \*\.[\d-]+\.damaged", proc.stderr)
        renamed = {p.name.split(".")[0]: p.read_bytes() for p in d.glob("*.damaged")}
        assert renamed == {name.split(".")[0]: data for name, data in damaged.items()}
        assert steps(d) == [4, 8, 12] and checkpoint.inspect(d, 8).valid


# ---- disk full ---------------------------------------------------------------------------------------------


def test_pre_save_space_check_fails_cleanly_on_a_small_filesystem(small_fs, menv) -> None:
    d = small_fs("4m") / "ckpt"  # room for two ~1.2 MB checkpoints; the check wants ~2.3 MB free for a third
    proc = train(menv, d)
    error = one_line_error(proc, EXIT_STORAGE)
    assert re.fullmatch(
        rf"base_train: error: not enough disk space in {d} for the next checkpoint: need ~[\d.]+ MB, [\d.]+ MB"
        r" free; free space, lower --keep_last_n_checkpoints, or set --checkpoint_dir",
        error,
    ), error
    assert steps(d) == [4, 8] and all(c.valid for c in checkpoint.scan(d, verify=True))
    assert (d / LATEST).read_text() == "8\n" and temp_files(d) == []


def test_disk_filling_up_during_a_save(crashed_1, small_fs, start) -> None:
    fs = small_fs("8m")
    d = copy(crashed_1, fs)
    t = start(d, "--debug_fault=sleep@save:2")
    t.wait_for(r"^debug_fault: sleeping 2s inside the save")  # the space check passed, the model file is open
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:  # someone else fills the disk
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
    assert t.finish() == EXIT_STORAGE
    errors = [line for _, line in t.lines if line.startswith("base_train: error:")]
    assert errors == [
        f"base_train: error: saving step 12 to {d} failed (No space left on device); earlier checkpoints are"
        " intact: free disk space or fix the directory, then resume\n"
    ], t.output
    assert "Traceback" not in t.output
    assert steps(d) == [4, 8] and all(c.valid for c in checkpoint.scan(d, verify=True))
    assert (d / LATEST).read_text() == "8\n" and temp_files(d) == []

    # resuming once there is room again: see the file-size test below (the same code path)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))  # the model file fits, the optim file not


def test_file_size_limit_during_a_save(reference_1, crashed_1, tmp_path, menv) -> None:
    """Works without root (where a tmpfs cannot be mounted): a write fails with EFBIG in the middle of the save."""
    d = copy(crashed_1, tmp_path)
    error = one_line_error(train(menv, d, preexec_fn=_limit_file_size), EXIT_STORAGE)
    assert error == (
        f"base_train: error: saving step 12 to {d} failed (File too large); earlier checkpoints are intact:"
        " free disk space or fix the directory, then resume"
    )
    assert steps(d) == [4, 8, 12] and not checkpoint.inspect(d, 12).committed  # model_12 written, never committed
    assert checkpoint.find_latest_valid(d, lambda w: None).step == 8
    assert (d / LATEST).read_text() == "8\n" and temp_files(d) == []
    proc = train(menv, d)
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])
