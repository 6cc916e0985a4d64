"""Running the trainer in tests: the tiny config, one-shot and background runs, and the checks end-to-end tests
share (tests/test_resume.py, tests/test_crash_safety.py; the fixtures built on them are in conftest.py)."""

from __future__ import annotations

import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from nanochat import checkpoint, compress
from nanochat.checkpoint import LATEST, TMP_PREFIX, file_name
from nanochat.common import EXIT_REFUSED
from nanochat.locks import LOCKS
from nanochat.registry import PHASES

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    "--keep_optim_last_n=-1",  # every checkpoint a full one: a fallback resume stays exact (slimming: test_resume)
    # Synchronous saves, so "killed after the checkpoint at step k" means that checkpoint is on disk. With
    # async saves a crash during the background write falls back one checkpoint further (tested below).
    "--async_save=False",
]
LONG = ["--num_iterations=100000", "--save_every=0"]  # runs until a signal stops it


T = 128  # the tiny base model's context: long enough for most built-in conversations (longer ones are cut)
BASE = ["--depth=1", "--head_dim=32", f"--max_seq_len={T}", "--device_batch_size=4", "--total_batch_size=-1",
        "--num_iterations=40", "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1",
        "--save_every=0"]  # fmt: skip
# 512 tokens per step: 2 micro-batches of 2 x 128 on one rank, one on each of two
CHAT = ["--device_batch_size=2", "--total_batch_size=512", "--num_iterations=12", "--save_every=4",
        "--keep_last_n_checkpoints=-1", "--eval_every=-1", "--eval_tokens=256", "--async_save=False",
        "--task_size=200"]  # fmt: skip


# ---- running the trainer -----------------------------------------------------------------------------------


def command(
    ckpt_dir: Path, args: tuple[str, ...], nproc: int, module: str = "scripts.base_train", tiny: list[str] = TINY
) -> list[str]:
    """A training phase's command line: `tiny` settings first (base training's by default), then `args`."""
    if nproc == 1:
        launcher = [sys.executable, "-m", module]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher += ["-m", module, "--"]
    return [*launcher, *tiny, f"--checkpoint_dir={ckpt_dir}", *args]


def free_port() -> int:
    """A port P with P and P + 1 free (several nodes' supervisors talk at the rendezvous port + 1), only for a port
    that another process must bind itself (torchrun's rendezvous, slurmctld): a port the test can hold is bound by
    the test (the `refused_port` fixture, or a server's port 0). The race between this check and that bind cannot be
    closed, only made small: P is random and below the kernel's ephemeral range, so no outgoing connection or
    port-0 bind on this machine takes it meanwhile; only another test's pick of the same P could."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(10_000, low - 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no two free ports next to each other in 10000-{low}")


def port_from_log(log: Path, proc: subprocess.Popen, pattern: str, timeout: float = 60) -> int:
    """The port a server started with port 0 bound, read from the line of its log that names it (group 1 of `pattern`):
    the kernel picked a free one, so no other process can hold it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text(errors="replace")):
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no port in the server's log (exit code {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


def dead_pid() -> int:
    """A pid that is certainly not a live process now: a child of ours that exited and was reaped. A made-up pid
    (77) can be a live process on the machine that runs the tests."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and whatever it started (torchrun's workers): it runs in a session of its own."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train(
    env: dict, ckpt_dir: Path, *args: str, nproc: int = 1, timeout: float = 180, module: str = "scripts.base_train",
    tiny: list[str] = TINY, **kw,
):  # fmt: skip
    """Run the trainer to the end; returns a CompletedProcess with its output."""
    cmd = command(ckpt_dir, args, nproc, module, tiny)
    popen = dict(env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(cmd, **popen, start_new_session=True, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail(f"the trainer ran over {timeout}s: {' '.join(cmd)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_phase(env: dict, phase: str, d: Path, source: Path, *args: str, nproc: int = 1, tiny=CHAT, **kw):
    """A chat phase (mid, sft, rl) from `source`, to the end."""
    return train(env, d, f"--source_dir={source}", *args, nproc=nproc, module=PHASES[phase].script, tiny=tiny, **kw)


def built_once(tmp_path_factory, name: str, run) -> Path:
    """<basetemp>/<name>/ckpt made by `run(dir)` (a process that must exit 0), once per test process (per
    pytest-xdist worker): a session fixture may be set up again within one process, and must not train again."""
    d = tmp_path_factory.getbasetemp() / name / "ckpt"
    done = d.parent / ".built"
    if not done.exists():
        shutil.rmtree(d.parent, ignore_errors=True)
        d.parent.mkdir(parents=True)
        proc = run(d)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        done.write_text(proc.stdout)
    return d


class Trainer:
    """A trainer running in the background whose output we read line by line, to signal it at the right moment."""

    def __init__(
        self, env: dict, ckpt_dir: Path, *args: str, nproc: int = 1, module: str = "scripts.base_train",
        tiny: list[str] = TINY,
    ) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            command(ckpt_dir, args, nproc, module, tiny),
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
        # (a child that torchrun has forked but not yet exec'd still shows torchrun's command line and session)
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "scripts.base_train" in (c := p.cmdline()) and "torch.distributed.run" not in c]


# ---- checks ------------------------------------------------------------------------------------------------


def steps(d: Path) -> list[int]:
    return [c.step for c in checkpoint.scan(d)]


def temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(f"{TMP_PREFIX}*"))


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file's bytes, except the lock files (each trainer writes its pid into the lock it takes)."""
    locks = set(LOCKS.values())
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name not in locks}


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
        got = compress.load(d / file_name(kind, step))  # either format (a run with a --remote_dir compresses)
        want = compress.load(reference / file_name(kind, step))
        assert_identical(got, want, kind)
    got_meta, want_meta = (checkpoint.inspect(x, step).meta for x in (d, reference))
    assert [r["loader"] for r in got_meta["ranks"]] == [r["loader"] for r in want_meta["ranks"]]
    assert got_meta["smooth_loss"] == want_meta["smooth_loss"]


def one_line_error(proc: subprocess.CompletedProcess, code: int = EXIT_REFUSED, name: str = "base_train") -> str:
    """The run failed the way users should see it fail: one `base_train: error:` line, no traceback, and the exit
    status the supervisor acts on (2: refused, never restarted; 74: a storage error, restarted with backoff)."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{name}: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def crashed(tmp_path_factory, menv, name: str, at: int, nproc: int = 1) -> Path:
    """A run SIGKILLed right after step `at` (before that step's save)."""
    d = tmp_path_factory.mktemp(name) / "ckpt"
    proc = train(menv, d, f"--debug_fault=sigkill@step:{at}", nproc=nproc)
    assert proc.returncode == (-signal.SIGKILL if nproc == 1 else 1), proc.stdout + proc.stderr
    assert f"debug_fault: sigkill at step {at}" in proc.stdout
    assert f"step {at:05d}/00012" in proc.stdout and f"step {at + 1:05d}/" not in proc.stdout
    return d


def copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of a run's checkpoint dir (with its fault marker, so the fault does not fire again)."""
    return Path(shutil.copytree(src, tmp_path / "ckpt"))
