"""Launching torchrun in its own session, finding its workers, signalling and reaping the whole tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from nanochat.common import set_parent_death_signal


@dataclass(frozen=True)
class LaunchSpec:
    """Everything torchrun needs for one attempt."""

    script: str  # python module run by each worker, e.g. scripts.base_train
    trainer_args: list[str]
    nproc_per_node: int
    log_dir: Path
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        if self.nnodes == "1" and not self.rdzv_endpoint:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
            cmd += [f"--rdzv-id={self.rdzv_id or 'nanochat'}"]
            if self.node_rank is not None:
                cmd.append(f"--node-rank={self.node_rank}")
        cmd += [
            f"--nproc-per-node={self.nproc_per_node}",
            "--max-restarts=0",  # restarts are the supervisor's job
            "--monitor-interval=0.1",  # torchrun notices a dead worker within 0.1 s and stops the rest
            f"--log-dir={self.log_dir}",
            "--redirects=3",  # per-rank stdout/stderr files ...
            "--tee=3",  # ... and also on torchrun's own output (our attempt log)
            "-m",
            self.script,
            "--",
            *self.trainer_args,
        ]
        return cmd


def launch(spec: LaunchSpec, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start torchrun in a new session (the terminal's Ctrl+C reaches only us), output into `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
        )


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def workers(pid: int, script: str) -> list[psutil.Process]:
    """torchrun's worker processes: its children running `script`."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if script in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def send(procs: list[psutil.Process], sig: int) -> int:
    """Signal each process (psutil checks the pid was not reused); returns how many were reached."""
    reached = 0
    for p in procs:
        try:
            p.send_signal(sig)
            reached += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return reached


def kill_tree(pid: int, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Signal the whole tree, wait on one deadline, then SIGKILL whatever is left. Gone already is fine."""
    procs = tree(pid)
    if not procs:
        return
    send(procs, sig)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        send(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=timeout)


@dataclass
class TreeSample:
    rss: int  # bytes, the whole tree
    cpu_percent: float
    num_procs: int


def sample(pid: int, cache: dict[int, psutil.Process]) -> TreeSample:
    """RSS and CPU of the tree. `cache` keeps Process objects so cpu_percent has an interval to measure over."""
    rss, cpu, n = 0, 0.0, 0
    for p in tree(pid):
        proc = cache.setdefault(p.pid, p)
        try:
            rss += proc.memory_info().rss
            cpu += proc.cpu_percent(None)
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return TreeSample(rss, cpu, n)


def memory_limit() -> int:
    """The memory this supervisor's processes may use: the memory cgroup's limit if set, else physical RAM."""
    limit = psutil.virtual_memory().total
    cg = memory_cgroup()
    if cg:
        name = "memory.max" if cg[1] == 2 else "memory.limit_in_bytes"
        try:
            text = (cg[0] / name).read_text().strip()
            if text.isdigit():
                limit = min(limit, int(text))
        except OSError:
            pass
    return limit


def memory_cgroup(pid: int | str = "self") -> tuple[Path, int] | None:
    """(directory, cgroup version) of the memory cgroup of `pid`, v1 or v2."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1: a hierarchy of its own
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::"):  # v2: the unified hierarchy
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/"), 2
    return None


def oom_kill_counts(pid: int | str = "self") -> dict[str, int]:
    """The kernel's OOM-kill counters that can be read here: the memory cgroup of `pid` and the whole host."""
    sources = [("host", Path("/proc/vmstat"))]
    cg = memory_cgroup(pid)
    if cg:
        sources.append(("cgroup", cg[0] / ("memory.events" if cg[1] == 2 else "memory.oom_control")))
    counts = {}
    for name, path in sources:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    counts[name] = int(value)
        except (OSError, ValueError):
            continue
    return counts


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """proc's exit status, or None if it is still running after `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def pid_alive(pid: int) -> bool:
    return psutil.pid_exists(pid)


def environ_for_workers() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
