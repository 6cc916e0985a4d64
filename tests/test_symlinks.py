"""Files by fixed names in shared folders (nanochat/safefile.py): a symlink planted at any name the trainer or the
supervisor writes or reads is never followed. Each case plants links to a victim file outside the folders, drives
the real code path that writes or reads the name, and checks that the victim is untouched and its contents never
read back as ours. In-process on real files and real symlinks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint, metrics, safefile
from nanochat.checkpoint import LATEST, RUN_ID, CheckpointError, snapshots
from nanochat.common import DistInfo
from nanochat.faults import Fault
from nanochat.locks import LOCKS, DirLock, LockError, lock_holder
from nanochat.remote import open_remote
from nanochat.tokenizer import FILE_NAME, Tokenizer
from nanochat.train_loop import Heartbeat, find_start
from supervisor import plot, procs
from supervisor.records import EventLog, RunDir, append_event, read_events, read_heartbeat
from supervisor.speedrun import Speedrun, load_config
from tests.helpers import save

VICTIM = "7\n"  # parses as a step, a run id and JSON: whatever reads it through a link would take it for ours


def plant(link: Path, victim: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)


def metrics_repair(d: Path, victim: Path) -> None:
    """metrics.jsonl's torn-line repair rewrites it through a temp file (once `metrics.jsonl.tmp`)."""
    (d / metrics.FILE).write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    for name in (f"{metrics.FILE}.tmp", safefile.temp_path(d / metrics.FILE).name):
        plant(d / name, victim)
    log = metrics.MetricsLog(d, True, 1, pytest.fail)
    log.step(2, loss=1.0)
    log.file.close()
    assert not (d / metrics.FILE).is_symlink()
    assert [(r["kind"], r["step"]) for r in metrics.read(d)] == [("step", 1), ("start", 1), ("step", 2)]


def metrics_log(d: Path, victim: Path) -> None:
    """metrics.jsonl itself: not read, not appended to; the trainer warns once and goes on."""
    plant(d / metrics.FILE, victim)
    warnings: list[str] = []
    log = metrics.MetricsLog(d, True, 0, warnings.append)
    log.step(1, loss=1.0)
    log.step(2, loss=1.0)
    assert len(warnings) == 1 and "symlink" in warnings[0] and "training goes on" in warnings[0], warnings
    with pytest.raises(safefile.UnsafeFileError, match="metrics.jsonl is a symlink"):
        metrics.read(d)


def heartbeat(d: Path, victim: Path) -> None:
    """The heartbeat's temp file (once `heartbeat.json.tmp`), and heartbeat.json itself when the supervisor reads it."""
    path = d / "heartbeat.json"
    for name in ("heartbeat.json.tmp", safefile.temp_path(path).name, "heartbeat.json"):
        plant(d / name, victim)
    assert read_heartbeat(path) is None
    Heartbeat(str(path), True, rank=0)(step=3)
    assert not path.is_symlink() and read_heartbeat(path)["step"] == 3


def run_id(d: Path, victim: Path) -> None:
    """.run_id: its target must never become the run's lineage (and so never go into a meta)."""
    plant(d / RUN_ID, victim)
    for read in (checkpoint.run_id, checkpoint.start_lineage):
        with pytest.raises(CheckpointError, match=rf"\{RUN_ID} is a symlink .* remove it"):
            read(d)
    warnings: list[str] = []
    assert checkpoint.find_resume_point(d, warnings.append) is None  # (snapshots of an unknown lineage: none)
    assert len(warnings) == 1 and f"{RUN_ID} is a symlink" in warnings[0]


def latest_marker(d: Path, victim: Path) -> None:
    plant(d / LATEST, victim)
    step, problem = checkpoint.read_latest_marker(d)
    assert step is None and problem.startswith(f"{LATEST} is a symlink"), problem
    checkpoint.mark_latest(d, 4)  # a rename replaces the link, never writes through it
    assert checkpoint.read_latest_marker(d) == (4, "")


def locks(d: Path, victim: Path) -> None:
    for role, name in LOCKS.items():
        plant(d / name, victim)
        with pytest.raises(LockError, match=f"{name} is a symlink"):
            DirLock(d, role).acquire()
        assert lock_holder(d, role) is None


def event_log(d: Path, victim: Path) -> None:
    run = RunDir(d)
    plant(run.events, victim)
    with pytest.raises(OSError, match="events.jsonl is a symlink"):
        append_event(run, "run_start")
    warnings: list[str] = []
    EventLog(run, warnings.append).append("run_start")
    assert len(warnings) == 1 and "symlink" in warnings[0]
    with pytest.raises(safefile.UnsafeFileError):
        read_events(run)


def torchrun_log(d: Path, victim: Path) -> None:
    """An attempt's torchrun.log: refused before torchrun starts."""
    plant(d / "torchrun.log", victim)
    spec = procs.LaunchSpec("nanochat_no_such_module", [], 1, d)
    with pytest.raises(safefile.UnsafeFileError, match="torchrun.log is a symlink"):
        proc = procs.launch(spec, d / "torchrun.log", dict(os.environ))
        proc.kill()  # (only reached where the link was followed)
        proc.wait()


def speedrun_log(d: Path, victim: Path) -> None:
    """A speedrun's plain phase's log (<run dir>/eval.log): refused before the command runs."""
    run = Speedrun("t", 1, True, False, None, d, load_config(None), lambda launch, fresh: 0, display=lambda line: None)
    plant(d / "eval.log", victim)
    with pytest.raises(safefile.UnsafeFileError, match="eval.log is a symlink"):
        run.command("eval", ["-c", "print('through the link')"])


def fault_marker(d: Path, victim: Path) -> None:
    """A fault's `.fault-fired-*` marker, planted before the victim exists: never created through the link."""
    fault = Fault.parse("raise@step:1")
    fault.marker_dir = d
    missing = victim.with_name("created-through-the-link")
    plant(fault.marker, missing)
    fault.at_step(1, 0)  # a marker is there: counts as fired
    assert not missing.exists()


def snapshot_origin(d: Path, victim: Path) -> None:
    """A snapshot folder's `origin`, read by `prune --snapshots`."""
    home = snapshots.slots(d / "ckpt")[0].parent  # (under the test's NANOCHAT_SHM_DIR)
    for folder in (home.parent.parent, home.parent, home):
        folder.mkdir(mode=0o700, exist_ok=True)
    plant(home / "origin", victim)
    assert snapshots.stale() == [(home, "no record of its checkpoint dir (debris)")]


def tokenizer(d: Path, victim: Path) -> None:
    """tokenizer.json: its save's temp file (once `.tokenizer.json.<pid>.tmp`), and a link at the name itself."""
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 40], 300)
    for name in (f".{FILE_NAME}.{os.getpid()}.tmp", safefile.temp_path(d / "tok" / FILE_NAME).name):
        plant(d / "tok" / name, victim)
    tok.save(d / "tok")
    assert Tokenizer.load(d / "tok").encode("the fox") == tok.encode("the fox")
    plant(d / "planted" / FILE_NAME, victim)
    with pytest.raises(safefile.UnsafeFileError, match=f"{FILE_NAME} is a symlink"):
        Tokenizer.load(d / "planted")


def plot_png(d: Path, victim: Path) -> None:
    """`nanochat-run plot`'s default plot.png beside the checkpoints."""
    lines = [{"kind": "step", "step": s, "loss": 3.0 - s / 10, "tok_per_s": 1000.0, "time": s} for s in (1, 2, 3)]
    (d / metrics.FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    plant(d / "plot.png", victim)
    out = plot.make(d, None, None)
    assert out == d / "plot.png" and not out.is_symlink() and out.read_bytes().startswith(b"\x89PNG")


def remote_download(d: Path, victim: Path) -> None:
    """A checkpoint downloaded from the remote goes through `.tmp.<name>.download` files."""
    save(d / "local", 4)
    remote = open_remote(f"file://{d / 'remote'}")
    remote.upload(d / "local", 4)
    for kind in checkpoint.KINDS:
        plant(d / "fresh" / f"{checkpoint.TMP_PREFIX}{checkpoint.file_name(kind, 4)}.download", victim)
    [(step, meta)] = remote.committed()
    assert remote.download(step, d / "fresh", meta).valid


CASES: dict[str, Callable[[Path, Path], None]] = {
    f.__name__: f
    for f in (metrics_repair, metrics_log, heartbeat, run_id, latest_marker, locks, event_log, torchrun_log,
              speedrun_log, fault_marker, snapshot_origin, tokenizer, plot_png, remote_download)
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_symlink_planted_at_a_fixed_name_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    victim = tmp_path / "outside" / "victim"
    victim.parent.mkdir()
    victim.write_text(VICTIM)
    before = victim.stat()
    d = tmp_path / "shared"
    d.mkdir()
    CASES[case](d, victim)
    after = victim.stat()
    assert victim.read_text() == VICTIM and (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]  # nothing created beside it either


def test_a_fifo_or_a_huge_file_at_a_small_files_name_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO at `.run_id` would block a plain open forever; a huge `latest_step.txt` is not read whole."""
    os.mkfifo(tmp_path / RUN_ID)
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.run_id(tmp_path)
    (tmp_path / LATEST).write_text("1" * 100_000)
    step, problem = checkpoint.read_latest_marker(tmp_path)
    assert step is None and "over 65536 bytes" in problem


def test_the_trainer_refuses_a_planted_run_id_and_writes_no_meta(tmp_path: Path) -> None:
    """The trainer's start (find_start, rank 0, resuming): one error naming the link, before any meta is written
    (on main, the victim's contents became the run id in every new meta)."""
    d = tmp_path / "ckpt"
    save(d, 2)
    (d / RUN_ID).unlink(missing_ok=True)
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    plant(d / RUN_ID, victim)
    with pytest.raises(CheckpointError) as info:
        find_start(d, True, DistInfo(0, 0, 1, torch.device("cpu")))
    assert str(info.value) == f"{d / RUN_ID} is a symlink (it could point at any file of yours): refused; remove it," \
        " then retry"  # fmt: skip
    assert victim.read_text() == VICTIM
