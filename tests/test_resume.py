"""End to end: the trainer as users run it, one process or two under torchrun, with real signals, real files and
faults injected through --debug_fault. Nothing of the code under test is mocked.

Every run is tiny (depth 1, 12 steps of 128 tokens). Most tests start from a copy of a few module-level runs: an
uninterrupted reference and runs SIGKILLed after their checkpoints, so resumed runs can be compared bit for bit.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import LATEST, TMP_PREFIX, file_name
from nanochat.dataset import data_dir, train_val_shards
from nanochat.tokenizer import tokenizer_dir
from scripts.base_train import TrainConfig
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# 128 tokens per step works for 1 rank (2 micro-batches) and 2 ranks (1 each), so runs can change world size
TINY = [
    "--depth=1",
    "--head_dim=32",
    "--max_seq_len=32",
    "--device_batch_size=2",
    "--total_batch_size=128",
    "--num_iterations=12",
    "--eval_every=-1",
    "--eval_tokens=256",
    "--sample_every=-1",
    "--save_every=4",
    "--keep_last_n_checkpoints=-1",
    # Synchronous saves, so "killed after the checkpoint at step k" means that checkpoint is on disk. With
    # async saves a crash during the background write falls back one checkpoint further (tested below).
    "--async_save=False",
]
LONG = ["--num_iterations=100000", "--save_every=0"]  # runs until a signal stops it


# ---- running the trainer -----------------------------------------------------------------------------------


def command(ckpt_dir: Path, args: tuple[str, ...], nproc: int) -> list[str]:
    if nproc == 1:
        launcher = [sys.executable, "-m", "scripts.base_train"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher += ["-m", "scripts.base_train", "--"]
    return [*launcher, *TINY, f"--checkpoint_dir={ckpt_dir}", *args]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and whatever it started (torchrun's workers): it runs in a session of its own."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train(env: dict, ckpt_dir: Path, *args: str, nproc: int = 1, timeout: float = 180, **kw):
    """Run the trainer to the end; returns a CompletedProcess with its output."""
    cmd = command(ckpt_dir, args, nproc)
    popen = dict(env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(cmd, **popen, start_new_session=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail(f"the trainer ran over {timeout}s: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Trainer:
    """A trainer running in the background whose output we read line by line, to signal it at the right moment."""

    def __init__(self, env: dict, ckpt_dir: Path, *args: str, nproc: int = 1) -> None:
        self.proc = subprocess.Popen(
            command(ckpt_dir, args, nproc),
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[str, str]] = []  # (stream, line), in the order we read them
        self._queue: queue.Queue = queue.Queue()
        self._open = 2
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream) -> None:
        for line in stream:
            self._queue.put((name, line))
        self._queue.put((name, None))

    def _next(self, deadline: float) -> tuple[str, str] | None:
        while self._open:
            try:
                name, line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self._open -= 1
                continue
            self.lines.append((name, line))
            return name, line
        return None

    def wait_for(self, pattern: str, stream: str = "stdout", timeout: float = 90) -> re.Match:
        """Read until a line of `stream` matches; fails with the output so far if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self._next(deadline)
            if got is None:
                break
            if got[0] == stream and (m := re.search(pattern, got[1])):
                return m
        kill_group(self.proc)
        pytest.fail(f"no {stream} line matched {pattern!r}; output so far:\n{self.output}")

    def finish(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while self._next(deadline) is not None:
            pass
        return self.proc.wait(timeout=max(1, deadline - time.monotonic()))

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    @property
    def stdout(self) -> str:
        return "".join(line for name, line in self.lines if name == "stdout")

    def workers(self) -> list[psutil.Process]:
        """The trainer processes torchrun started (its children running scripts.base_train)."""
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "scripts.base_train" in p.cmdline()]


@pytest.fixture
def start(menv: dict):
    """start(ckpt_dir, *args, nproc=1) -> a running Trainer, killed at teardown if a test left it running."""
    started: list[Trainer] = []

    def start(ckpt_dir: Path, *args: str, nproc: int = 1) -> Trainer:
        started.append(Trainer(menv, ckpt_dir, *args, nproc=nproc))
        return started[-1]

    yield start
    for t in started:
        if t.proc.poll() is None:
            kill_group(t.proc)


# ---- checks ------------------------------------------------------------------------------------------------


def steps(d: Path) -> list[int]:
    return [c.step for c in checkpoint.scan(d)]


def temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(f"{TMP_PREFIX}*"))


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def step_lines(out: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+)/\d+ ", out, re.M)]


def assert_finished(
    proc: subprocess.CompletedProcess, d: Path, step: int = 12, world: int = 1
) -> checkpoint.Checkpoint:
    """The run exited 0 and left a valid final checkpoint at `step`, the marker on it and no temp file."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert f"done: {step} steps" in proc.stdout
    ckpt = checkpoint.find_latest_valid(d, pytest.fail)
    assert ckpt.step == step and ckpt.final and ckpt.meta["stop_reason"] == "completed"
    assert ckpt.meta["world_size"] == world and len(ckpt.meta["ranks"]) == world
    assert (d / LATEST).read_text() == f"{step}\n"
    assert temp_files(d) == []
    return ckpt


def assert_identical(a, b, where: str = "") -> None:
    """Nested state dicts equal: every tensor bit for bit (dtype, shape, values), everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_final_state(d: Path, reference: Path, step: int = 12) -> None:
    for kind in ("model", "optim"):
        got = torch.load(d / file_name(kind, step), weights_only=True)
        want = torch.load(reference / file_name(kind, step), weights_only=True)
        assert_identical(got, want, kind)
    got_meta, want_meta = (checkpoint.inspect(x, step).meta for x in (d, reference))
    assert [r["loader"] for r in got_meta["ranks"]] == [r["loader"] for r in want_meta["ranks"]]
    assert got_meta["smooth_loss"] == want_meta["smooth_loss"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The run failed the way users should see it fail: exit 2 and one `base_train: error:` line, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("base_train: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---- the runs most tests start from ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def menv(base_dir: Path) -> dict[str, str]:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_1(tmp_path_factory, menv) -> tuple[Path, subprocess.CompletedProcess]:
    """One process, uninterrupted: checkpoints at 4, 8 and the final 12."""
    d = tmp_path_factory.mktemp("reference_1") / "ckpt"
    proc = train(menv, d)
    assert_finished(proc, d)
    return d, proc


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory, menv) -> Path:
    d = tmp_path_factory.mktemp("reference_2") / "ckpt"
    assert_finished(train(menv, d, nproc=2), d, world=2)
    return d


def crashed(tmp_path_factory, menv, name: str, at: int, nproc: int = 1) -> Path:
    """A run SIGKILLed right after step `at` (before that step's save)."""
    d = tmp_path_factory.mktemp(name) / "ckpt"
    proc = train(menv, d, f"--debug_fault=sigkill@step:{at}", nproc=nproc)
    assert proc.returncode == (-signal.SIGKILL if nproc == 1 else 1), proc.stdout + proc.stderr
    assert f"debug_fault: sigkill at step {at}" in proc.stdout
    assert f"step {at:05d}/00012" in proc.stdout and f"step {at + 1:05d}/" not in proc.stdout
    return d


@pytest.fixture(scope="module")
def crashed_1(tmp_path_factory, menv) -> Path:
    """One process, killed at step 10: checkpoints 4 and 8."""
    d = crashed(tmp_path_factory, menv, "crashed_1", 10)
    assert steps(d) == [4, 8] and (d / LATEST).read_text() == "8\n"
    return d


@pytest.fixture(scope="module")
def crashed_1_at_5(tmp_path_factory, menv) -> Path:
    """One process, killed at step 5: checkpoint 4 only."""
    d = crashed(tmp_path_factory, menv, "crashed_1_at_5", 5)
    assert steps(d) == [4]
    return d


@pytest.fixture(scope="module")
def crashed_2(tmp_path_factory, menv) -> Path:
    """Two processes under torchrun, rank 0 killed at step 10: checkpoints 4 and 8."""
    d = crashed(tmp_path_factory, menv, "crashed_2", 10, nproc=2)
    assert steps(d) == [4, 8]
    return d


def copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of a run's checkpoint dir (with its fault marker, so the fault does not fire again)."""
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


# ---- what a checkpoint holds, cadence and pruning ----------------------------------------------------------


def test_meta_records_everything_a_resume_needs(reference_1) -> None:
    d, proc = reference_1
    meta = checkpoint.inspect(d, 12).meta
    assert meta["step"] == 12 and meta["num_iterations"] == 12 and meta["final"] is True
    assert meta["model_config"] == {
        "sequence_len": 32,
        "vocab_size": 512,
        "n_layer": 1,
        "n_head": 2,
        "n_kv_head": 2,
        "n_embd": 64,
    }
    train_config = meta["train_config"]
    assert train_config["depth"] == 1 and train_config["save_every"] == 4 and train_config["checkpoint_dir"] == str(d)
    assert set(train_config) == {f.name for f in dataclasses.fields(TrainConfig)}  # all, not just the overrides
    assert meta["world_size"] == 1 and meta["total_batch_size"] == 128 and meta["tokens_seen"] == 12 * 128
    assert meta["val_bpb"] > 0 and meta["val_bpb_step"] == 12  # measured after the save, added to the meta
    assert meta["smooth_loss"] > 0 and meta["train_loss"] > 0 and meta["train_time"] > 0
    assert meta["stop_reason"] == "completed" and meta["saved_at"] >= meta["started_at"] > 0
    (rank,) = meta["ranks"]
    assert rank["loader"]["split"] == "train" and rank["loader"]["world_size"] == 1 and rank["rng"]["cpu"]
    for kind in ("model", "optim"):
        path = d / file_name(kind, 12)
        assert meta["files"][path.name] == {"size": path.stat().st_size, "xxh3_64": checkpoint.file_digest(path)}
    assert checkpoint.inspect(d, 4).meta["stop_reason"] == "periodic"


@pytest.mark.parametrize(
    "save_every, keep, on_disk, saves",
    [
        (4, -1, [4, 8, 12], [4, 8, 12]),  # the reference run
        (4, 2, [8, 12], [4, 8, 12]),
        (4, 1, [12], [4, 8, 12]),
        (0, 3, [12], [12]),  # 0 = only the final checkpoint
    ],
)
def test_save_cadence_and_pruning(reference_1, tmp_path, menv, save_every, keep, on_disk, saves) -> None:
    if (save_every, keep) == (4, -1):
        d, proc = reference_1
    else:
        d = tmp_path / "ckpt"
        proc = train(menv, d, f"--save_every={save_every}", f"--keep_last_n_checkpoints={keep}")
    assert_finished(proc, d)
    assert [int(s) for s in re.findall(r"^step (\d+) \| sav(?:ed|ing) checkpoint", proc.stdout, re.M)] == saves
    assert steps(d) == on_disk
    assert all(c.valid for c in checkpoint.scan(d, verify=True))
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [LATEST, *(file_name(k, s) for s in on_disk for k in ("model", "optim", "meta"))]
    )


def test_final_checkpoint_is_never_pruned(reference_1, tmp_path, menv) -> None:
    d = copy(reference_1[0], tmp_path)
    proc = train(menv, d, "--num_iterations=20", "--keep_last_n_checkpoints=1")
    assert "resume: --num_iterations changed from 12 to 20" in proc.stdout
    assert "resume: --keep_last_n_checkpoints changed from -1 to 1" in proc.stdout
    assert_finished(proc, d, step=20)
    assert steps(d) == [12, 20] and checkpoint.inspect(d, 12).final  # 4, 8 and 16 pruned, the old final kept


# ---- exact resume ------------------------------------------------------------------------------------------


def test_exact_resume_after_sigkill_one_process(reference_1, crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    proc = train(menv, d, "--debug_fault=sigkill@step:10")  # the same command again: the fault fired already
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])


def test_exact_resume_after_sigkill_two_processes(reference_2, crashed_2, tmp_path, menv) -> None:
    d = copy(crashed_2, tmp_path)
    proc = train(menv, d, "--debug_fault=sigkill@step:10", nproc=2)
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    assert "weights identical on all 2 ranks" in proc.stdout
    assert_finished(proc, d, world=2)
    assert_same_final_state(d, reference_2)


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2)])
def test_world_size_change_resumes_and_finishes(crashed_1, crashed_2, tmp_path, menv, old, new) -> None:
    d = copy(crashed_2 if old == 2 else crashed_1, tmp_path)
    proc = train(menv, d, nproc=new)
    assert (
        f"resumed from step 8 in {d} at a new geometry ({old} -> {new} ranks): weights, optimizer and schedule are"
        " exact; the data order continues approximately"
    ) in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    ckpt = assert_finished(proc, d, world=new)
    assert [r["loader"]["rank"] for r in ckpt.meta["ranks"]] == list(range(new))
    # the optimizer state came along: Adam's step counts 8 restored steps plus 4 new ones
    optim = torch.load(d / "optim_000012.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["adamw"]["state"].values()} == {12.0}
    assert optim["muon"]["state"]  # the momentum buffers


# ---- signals -----------------------------------------------------------------------------------------------


def check_signal_checkpoint(t: Trainer, d: Path, sig: signal.Signals) -> int:
    """The checkpoint is at the exact step the `stopped by` line names, valid, with the signal as reason."""
    m = re.search(rf"^stopped by {sig.name} at step (\d+); run again to resume$", t.stdout, re.M)
    assert m, t.output
    step = int(m.group(1))
    assert step >= 3 and step_lines(t.stdout)[-1] == step
    assert f"step {step:05d} | saved checkpoint to {d} (signal:{sig.name})" in t.stdout
    ckpt = checkpoint.find_latest_valid(d, pytest.fail)
    assert ckpt.step == step and ckpt.meta["stop_reason"] == f"signal:{sig.name}" and not ckpt.final
    assert steps(d) == [step] and (d / LATEST).read_text() == f"{step}\n" and temp_files(d) == []
    return step


def check_resume_after_signal(menv: dict, d: Path, step: int, nproc: int) -> None:
    proc = train(menv, d, f"--num_iterations={step + 2}", "--save_every=0", nproc=nproc)
    assert f"resumed from step {step} in {d}" in proc.stdout
    assert f"resume: --num_iterations changed from 100000 to {step + 2}" in proc.stdout
    assert step_lines(proc.stdout) == [step + 1, step + 2]
    assert_finished(proc, d, step=step + 2, world=nproc)


def test_sigint_saves_at_the_exact_step_and_resume_continues(tmp_path, menv, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG)
    t.wait_for(r"^step 00003/")
    t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 130
    assert "got SIGINT: will save a checkpoint after the current step and exit" in t.stdout
    assert "Traceback" not in t.output and "KeyboardInterrupt" not in t.output
    step = check_signal_checkpoint(t, d, signal.SIGINT)
    check_resume_after_signal(menv, d, step, nproc=1)


def test_sigusr1_dumps_all_thread_stacks_then_sigterm_saves_at_the_exact_step(tmp_path, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG)
    t.wait_for(r"^step 00002/")
    t.proc.send_signal(signal.SIGUSR1)
    t.wait_for(r"^(Current thread|Thread) 0x[0-9a-f]+", stream="stderr")
    t.wait_for(r'^  File ".*base_train\.py", line \d+ in main', stream="stderr")
    for _ in range(3):  # still training
        t.wait_for(r"^step \d+/")
    assert t.proc.poll() is None
    t.proc.send_signal(signal.SIGTERM)
    assert t.finish() == 143
    assert "got SIGTERM: will save a checkpoint after the current step and exit" in t.stdout
    assert "Traceback" not in t.output
    check_signal_checkpoint(t, d, signal.SIGTERM)  # resuming from it: see the SIGINT test (the same code path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_both_torchrun_workers(tmp_path, menv, start, sig) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG, nproc=2)
    t.wait_for(r"^step 00003/")
    workers = t.workers()
    assert len(workers) == 2
    for w in workers:
        w.send_signal(sig)
    assert t.finish() != 0  # torchrun reports the workers' non-zero exit
    assert t.stdout.count(f"got {sig.name}: will save a checkpoint") == 2  # each rank got it
    # torchrun's failure report lists each worker that exited: with the signal's exit code (the first one is the
    # root cause; the other may already be gone or be stopped by torchrun's SIGTERM, after our signal's save)
    codes = {int(pid): int(code) for code, pid in re.findall(r"exitcode\s*: (-?\d+) \(pid: (\d+)\)", t.output)}
    assert codes and set(codes) <= {w.pid for w in workers}, t.output
    assert set(codes.values()) == {128 + sig}, t.output
    step = check_signal_checkpoint(t, d, sig)
    if sig == signal.SIGTERM:  # resuming is the same after either signal; once is enough for the time it takes
        check_resume_after_signal(menv, d, step, nproc=2)


def test_second_signal_during_the_save_does_not_corrupt_it(tmp_path, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG, "--debug_fault=sleep@save:3")
    t.wait_for(r"^step 00003/")
    t.proc.send_signal(signal.SIGTERM)
    t.wait_for(r"^debug_fault: sleeping 3s inside the save")  # the model file is half written now
    t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 128 + signal.SIGTERM  # the first signal decides
    assert "got SIGINT again: already stopping, the checkpoint is being saved" in t.stdout
    step = check_signal_checkpoint(t, d, signal.SIGTERM)
    model, optim = checkpoint.load(d, checkpoint.find_latest_valid(d, pytest.fail))
    assert model and optim["adamw"]["state"] and float(optim["adamw"]["state"][0]["step"]) == step


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
    assert [re.sub(r"\.\d+$", "", name) for name in temps] == [f"{TMP_PREFIX}{phase}_000008.pt"] * half_written
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
    slots = [sorted(p.name for p in slot.iterdir()) for slot in checkpoint.snapshot_slots(d)]
    assert {"meta_000004.json", "meta_000006.json"} <= {n for names in slots for n in names}  # double-buffered
    proc = train(env, d, *args)
    assert "resume: the in-memory snapshot at step 6" in proc.stdout and f"resumed from step 6 in {d}" in proc.stdout
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])
    assert not checkpoint.snapshot_slots(d)[0].parent.exists()  # dropped once the final checkpoint is durable


def test_kill_in_the_middle_of_a_snapshot_falls_back_to_the_other_slot(reference_1, tmp_path, menv, monkeypatch):
    """Double buffering: a SIGKILL while the snapshot of step 6 is being written leaves the one of step 4 whole,
    and a disk save at the same step as a snapshot snapshots first (the crash costs at most K steps)."""
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    env = {**menv, "NANOCHAT_SHM_DIR": str(tmp_path / "shm")}
    d = tmp_path / "ckpt"
    proc = train(env, d, "--save_every=4", "--snapshot_every=2", "--debug_fault=sigkill@step:5")
    assert proc.returncode == -signal.SIGKILL
    assert re.search(r"step 00004 \| saved checkpoint to .* and snapshot in shared memory", proc.stdout)
    assert checkpoint.newest_snapshot(d)[1].step == 4 and checkpoint.find_latest_valid(d).step == 4
    proc = train(env, d, "--save_every=100", "--snapshot_every=2", "--debug_fault=sigkill@save:snapshot")
    assert proc.returncode == -signal.SIGKILL and "debug_fault: sigkill at save phase snapshot" in proc.stdout
    assert "step 00006 | saving snapshot" not in proc.stdout  # killed inside the write of step 6
    assert checkpoint.newest_snapshot(d)[1].step == 4
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
    assert checkpoint.newest_snapshot(d)[1].step == 3  # older than the disk checkpoint at 4
    proc = train(env, d, "--snapshot_every=3", "--save_every=4", "--num_iterations=6", "--debug_fault=sigkill@step:6")
    assert f"resumed from step 4 in {d}" in proc.stdout and "in-memory snapshot" not in proc.stdout
    assert proc.returncode == -signal.SIGKILL  # a new fault spec: it fires at step 6, after no new snapshot
    proc = train(env, d, "--resume=False", "--num_iterations=2")
    assert "dropped the in-memory snapshots of the previous run" in proc.stdout


# ---- damaged files -----------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 101):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


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
        assert re.search(r"step 8 had a damaged checkpoint \(.+\); kept it as \*\.[\d-]+\.damaged", proc.stderr)
        renamed = {p.name.split(".")[0]: p.read_bytes() for p in d.glob("*.damaged")}
        assert renamed == {name.split(".")[0]: data for name, data in damaged.items()}
        assert steps(d) == [4, 8, 12] and checkpoint.inspect(d, 8).valid


# ---- what may and may not change on resume -----------------------------------------------------------------


def _other_vocab(d: Path) -> None:
    path = d / "meta_000008.json"
    meta = json.loads(path.read_text())
    meta["model_config"]["vocab_size"] = 1024  # as if trained with another tokenizer
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "args, edit, mismatch",
    [
        (["--depth=2"], None, "depth 1, this run asks for 2"),
        (["--head_dim=48"], None, "model width 64, this run asks for 96"),
        ([], _other_vocab, "vocab size 1024, this run asks for 512"),
    ],
)
def test_incompatible_checkpoint_is_refused(crashed_1, tmp_path, menv, args, edit, mismatch) -> None:
    d = copy(crashed_1, tmp_path)
    if edit:
        edit(d)
    before = snapshot(d)
    error = one_line_error(train(menv, d, *args))
    assert error == (
        f"base_train: error: the checkpoint at step 8 in {d} has {mismatch}; use --resume=False to start fresh or"
        " pick another --model_tag"
    )
    assert snapshot(d) == before


def test_allowed_changes_are_logged_and_the_run_finishes(crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    changes = {
        "num_iterations": (12, 14),
        "eval_every": (-1, 7),
        "device_batch_size": (2, 1),  # total_batch_size unchanged: 4 accumulation steps instead of 2
        "matrix_lr": (0.02, 0.03),
        "embedding_lr": (0.2, 0.1),
    }
    proc = train(menv, d, *(f"--{k}={new}" for k, (_, new) in changes.items()))
    for key, (old, new) in changes.items():
        assert f"resume: --{key} changed from {old!r} to {new!r}" in proc.stdout
    assert "resume: --depth" not in proc.stdout  # unchanged settings are not reported
    assert "batch: 128 tokens/step = 1x32 x 1 ranks x 4 accumulation steps" in proc.stdout
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert re.findall(r"^step (\d+) \| validation bpb", proc.stdout, re.M) == ["00014"]  # 7 is before the resume
    ckpt = assert_finished(proc, d, step=14)
    assert ckpt.meta["train_config"]["matrix_lr"] == 0.03 and ckpt.meta["tokens_seen"] == 14 * 128


def test_resume_false_archives_the_old_checkpoints_and_starts_fresh(reference_1, crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    before = {name: data for name, data in snapshot(d).items() if not name.startswith(".fault-fired")}
    proc = train(menv, d, "--resume=False")
    m = re.search(
        rf"^--resume=False: starting fresh; moved the existing checkpoints to ({d}/archived-[\d-]+)", proc.stdout, re.M
    )
    assert m and "(nothing deleted)" in proc.stdout, proc.stdout
    archived = Path(m.group(1))
    assert snapshot(archived) == before  # every file, byte for byte
    assert "resumed from" not in proc.stdout and step_lines(proc.stdout)[0] == 1
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])  # a fresh run of the same config


# ---- eval comes after the save -----------------------------------------------------------------------------


def test_eval_runs_after_the_save_and_is_not_repeated_on_resume(base_dir, tmp_path, menv) -> None:
    # A private base dir whose validation shard is garbage: training reads only the train shards, so the run
    # crashes in its first eval, at step 4, right after the save of step 4.
    base = tmp_path / "base"
    shutil.copytree(data_dir(base_dir), data_dir(base))
    shutil.copytree(tokenizer_dir(base_dir), tokenizer_dir(base))
    val = train_val_shards(data_dir(base))[1]
    good = val.read_bytes()
    val.write_bytes(b"not a parquet file" * 100)
    env = {**menv, "NANOCHAT_BASE_DIR": str(base)}
    d = tmp_path / "ckpt"
    proc = train(env, d, "--eval_every=4")
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # a crash, not a handled error
    assert "step 00004 | saved checkpoint" in proc.stdout and "validation bpb" not in proc.stdout
    assert step_lines(proc.stdout)[-1] == 4
    assert checkpoint.find_latest_valid(d, pytest.fail).step == 4  # the crash after the save kept it

    val.write_bytes(good)
    proc = train(env, d, "--eval_every=4")
    assert f"resumed from step 4 in {d}" in proc.stdout
    evals = re.findall(r"^step (\d+) \| validation bpb", proc.stdout, re.M)
    assert evals == ["00008", "00012"]  # not step 4 again
    assert proc.stdout.index("step 00008 | saved checkpoint") < proc.stdout.index("step 00008 | validation bpb")
    ckpt = assert_finished(proc, d)
    assert ckpt.meta["val_bpb_step"] == 12


# ---- disk full ---------------------------------------------------------------------------------------------


def test_pre_save_space_check_fails_cleanly_on_a_small_filesystem(small_fs, menv) -> None:
    d = small_fs("4m") / "ckpt"  # room for two ~1.2 MB checkpoints; the check wants ~2.3 MB free for a third
    proc = train(menv, d)
    error = one_line_error(proc)
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
    assert t.finish() == 2
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
    error = one_line_error(train(menv, d, preexec_fn=_limit_file_size))
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
