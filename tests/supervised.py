"""Helpers for the supervisor's end-to-end tests (test_supervisor_e2e.py, test_supervisor_chaos.py): a real
`nanochat-run train` process driving real torchrun with 2 gloo workers on a tiny model, what it leaves on disk,
and the check that nothing it started outlives it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint
from supervisor import memory, procs
from supervisor.records import RunDir, read_events, read_heartbeat

REPO_ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("nanochat-run")
NANOCHAT_RUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "supervisor.cli"]
TINY = ["--head_dim=32", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--eval_every=-1",
        "--eval_tokens=512", "--sample_every=-1"]  # fmt: skip


def make_env(base_dir: Path) -> dict[str, str]:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def leftovers(marker: str) -> list[psutil.Process]:
    """Live processes (not zombies: those are dead, only not yet reaped) whose command line mentions `marker`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def describe(ps: list[psutil.Process]) -> list[str]:
    out = []
    for p in ps:
        try:
            out.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            continue
    return out


def kill_leftovers(marker: str) -> None:
    ps = leftovers(marker)
    procs.send(ps, signal.SIGKILL)
    psutil.wait_procs(ps, timeout=10)


class Run:
    """One `nanochat-run train` process and what it leaves on disk."""

    def __init__(self, cmd: list[str], ckpt: Path, env: dict[str, str], preexec_fn: Callable | None = None,
                 out_dir: Path | None = None):  # fmt: skip
        self.cmd, self.ckpt, self.run_dir = cmd, ckpt, RunDir(ckpt.with_name(ckpt.name + ".run"))
        self.out_path = (out_dir or ckpt.parent) / f"{ckpt.name}.supervisor-{time.time_ns()}.out"
        self.started = time.time()
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         cwd=REPO_ROOT, preexec_fn=preexec_fn)  # fmt: skip
        self.code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout: float = 180) -> int:
        try:
            self.code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit within {timeout}s; its output:\n{self.output[-4000:]}")
        return self.code

    def finish(self, expect: int, timeout: float = 180) -> str:
        """Wait for the exit, check its code and that nothing it started is left; returns its output."""
        code = self.wait(timeout)
        assert code == expect, f"exit {code}, expected {expect}; output:\n{self.output[-6000:]}"
        assert_no_orphans(self.ckpt)
        return self.output

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_events(self.run_dir) if kind is None or e["event"] == kind]

    def own(self, kind: str) -> list[dict]:
        """This invocation's events of a kind (the run dir may hold earlier invocations' too)."""
        return [e for e in self.events(kind) if e["time"] >= self.started]

    def classes(self) -> list[str]:
        return [e["class"] for e in self.events("attempt_end")]

    def heartbeat(self) -> dict:
        hb = read_heartbeat(self.run_dir.heartbeat) or {}
        return hb if hb.get("time", 0) >= self.started else {}

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"the supervisor exited ({self.proc.returncode}) before {what}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s; output:\n{self.output[-4000:]}")
            time.sleep(0.1)

    def wait_for_step(self, step: int, timeout: float = 90) -> dict:
        self.wait_for(f"step {step}", lambda: (self.heartbeat().get("step") or 0) >= step, timeout)
        return self.heartbeat()

    def attempt_log(self, n: int) -> str:
        return (self.run_dir.attempt(n) / "torchrun.log").read_text(errors="replace")


def assert_no_orphans(ckpt: Path) -> None:
    """Nothing that names this test's checkpoint dir (torchrun, the workers: scripts.base_train) may survive."""
    left = leftovers(str(ckpt))
    assert not left, "processes left behind by the supervisor:\n" + "\n".join(describe(left))


def train_cmd(ckpt: Path, *sup_args: str, iters: int = 30, save_every: int = 5, trainer: tuple = ()) -> list[str]:
    return [*NANOCHAT_RUN, "train", "--depth", "1", "--num-iterations", str(iters), "--save-every", str(save_every),
            "--checkpoint-dir", str(ckpt), "--nproc-per-node", "2", "--backoff", "0", *sup_args,
            "--", *TINY, *trainer]  # fmt: skip


def supervisor_runs(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    """For a `supervise` fixture: supervise(*supervisor args, ckpt=..., iters=..., save_every=..., trainer=(...),
    preexec_fn=..., out_dir=...) -> Run; every run and whatever it started is killed at teardown."""
    runs: list[Run] = []

    def start(*sup_args: str, ckpt: Path | None = None, preexec_fn: Callable | None = None,
              out_dir: Path | None = None, **kw) -> Run:  # fmt: skip
        ckpt = ckpt or tmp_path / "ckpt"
        run = Run(train_cmd(ckpt, *sup_args, **kw), ckpt, env, preexec_fn, out_dir)
        runs.append(run)
        return run

    yield start
    for run in runs:  # a failed test must not leave a training run behind for the next one
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        kill_leftovers(str(run.ckpt))


def newest(ckpt: Path) -> checkpoint.Checkpoint:
    valid = [c for c in checkpoint.scan(ckpt, verify=True) if c.valid]
    assert valid, f"no valid checkpoint in {ckpt}"
    return valid[-1]


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*NANOCHAT_RUN, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=timeout)  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nanochat-run: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def last_value(cmd: list[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{key}=")]
    assert values, f"--{key} not in {cmd}"
    return values[-1]  # the trainer's parser lets the last one win


def torchrun_of(run: Run, timeout: float = 60) -> psutil.Process:
    """The supervisor's torchrun child (the current attempt's)."""
    found: list[psutil.Process] = []

    def ready() -> bool:
        found[:] = [c for c in psutil.Process(run.pid).children() if "torch.distributed.run" in " ".join(c.cmdline())]
        return bool(found)

    run.wait_for("torchrun", ready, timeout)
    return found[0]


def workers_of(torchrun: psutil.Process) -> list[psutil.Process]:
    """torchrun's worker children that have exec'd (RANK in their environment)."""
    found = []
    for child in torchrun.children():
        try:
            if "RANK" in child.environ():
                found.append(child)
        except psutil.Error:
            continue
    return found


def memory_cgroup_of(tmp_path: Path, limit: int) -> Iterator[Path]:
    """For a fixture: a fresh v1 memory cgroup under ours, limited to `limit` bytes; killed empty and removed
    afterwards. Join it in a child with `join_cgroup(cg)` as its preexec_fn."""
    mine = memory.memory_cgroup()
    if mine is None or mine[1] != 1:
        pytest.skip(f"needs a cgroup v1 memory controller; this process is in {mine}")
    cg = mine[0] / f"nanochat-e2e-{tmp_path.name}-{secrets.token_hex(4)}"  # new: another's is never touched
    try:
        cg.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup at {cg}: {e}")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as e:
        cg.rmdir()
        pytest.skip(f"cannot limit the memory cgroup at {cg}: {e}")
    yield cg
    for _ in range(50):
        pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except OSError:
            time.sleep(0.2)


def join_cgroup(cg: Path) -> Callable[[], None]:
    """A preexec_fn that moves the child into the memory cgroup `cg` before exec: all it starts inherits it."""
    procs_file = str(cg / "cgroup.procs")

    def join() -> None:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))

    return join
