"""Launching torchrun in its own session, signalling and reaping its tree, and reading processes' state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from nanochat import node_dirs, redact, safefile
from nanochat.lifeline import die_with_parent

ATTEMPT_ENV = "NANOCHAT_ATTEMPT_ID"  # set for torchrun, inherited by every process of the attempt
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch.compile's caches (Triton's under it: triton/<device>)


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
    local_addr: str | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run"]
        if self.nnodes == "1" and not self.rdzv_endpoint:
            cmd.append("--standalone")
        else:
            cmd += [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
            cmd += [f"--rdzv-id={self.rdzv_id or 'nanochat'}"]
            if self.node_rank is not None:
                cmd.append(f"--node-rank={self.node_rank}")
            if self.local_addr:
                cmd.append(f"--local-addr={self.local_addr}")
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


def launch(spec: LaunchSpec, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start torchrun in a new session (the terminal's Ctrl+C reaches only us), output into a fresh `log_path`."""
    with safefile.open_append(log_path) as log:  # never through a link planted at the name
        return subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with(os.getpid()),
        )


def _die_with(parent: int):
    """preexec_fn: torchrun dies with us (if we died before it was armed, the fork race, it exits at once).

    SIGKILL, not SIGTERM: a SIGTERMed torchrun relays the signal to its workers and SIGKILLs them 30 s later, which
    would cut a longer save short. A SIGKILLed torchrun just goes; its workers then get their own parent-death
    SIGTERM, save at the current step and exit, taking as long as the save needs (and holding the trainer lock,
    so the next supervisor waits for them)."""

    def arm() -> None:
        if not die_with_parent(signal.SIGKILL, parent):
            os._exit(1)

    return arm


def environ_for(attempt_id: str, dir_per_node: bool = False, extra: dict[str, str] | None = None,
                compile_cache: Path | None = None) -> dict[str, str]:  # fmt: skip
    """Our environment for torchrun, tagged with the attempt id: every process of the attempt inherits the tag, so
    /proc/<pid>/environ finds them all, even workers orphaned by a dead torchrun. `dir_per_node`: the nodes
    share no checkpoint dir; the trainer keeps a copy on each (nanochat/node_dirs.py). `extra`: the phase's own
    (a --remote_dir's real URL, kept off the command line: nanochat/redact.py). `compile_cache`: where
    torch.compile keeps what it built (Inductor's FX graphs, AOTAutograd's, Triton's kernels: all under
    TORCHINDUCTOR_CACHE_DIR), unless the user chose a place: in the run dir, every attempt after the first starts
    warm, on another machine too when the run dir is shared."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if compile_cache is not None:
        env.setdefault(COMPILE_CACHE_ENV, str(compile_cache))
    env[ATTEMPT_ENV] = attempt_id
    for ours in (node_dirs.ENV, redact.ENV):  # ours to set, never inherited
        env.pop(ours, None)
    if dir_per_node:
        env[node_dirs.ENV] = "1"
    return {**env, **(extra or {})}


def attempt_processes(attempt_id: str) -> list[psutil.Process]:
    """Every live process (not a zombie) started with this attempt id in its environment."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(ATTEMPT_ENV) == attempt_id and alive(p):
                found.append(p)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
    return found


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


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


def kill_tree(child: subprocess.Popen, extra: list[psutil.Process], sig: int, timeout: float = 5.0) -> None:
    """Signal `child` (our torchrun), its descendants and `extra`; wait on one deadline, then SIGKILL the rest.

    Our own child is waited for through Popen only: psutil's wait would reap it, and Popen would then report
    exit status 0 for a process we killed.
    """
    others = [p for p in tree(child.pid) if p.pid != child.pid]
    others += [p for p in extra if p.pid not in {o.pid for o in others} and p.pid != child.pid]
    if child.poll() is None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
    send(others, sig)
    deadline = time.monotonic() + timeout
    _, left = psutil.wait_procs(others, timeout=timeout)
    if wait_exit(child, max(0.0, deadline - time.monotonic())) is None:
        child.kill()
        wait_exit(child, timeout)
    if left:
        send(left, signal.SIGKILL)
        psutil.wait_procs(left, timeout=timeout)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """proc's exit status, or None if it is still running after `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def zombie_status(pid: int) -> int | None:
    """The exit status of a dead process its parent has not reaped yet, Popen-style (negative: the signal),
    from /proc/<pid>/stat; None if it is not a zombie or cannot be read. Nothing is reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if len(fields) < 50 or fields[0] != "Z":
        return None
    status = int(fields[49])  # field 52 of proc(5): exit_code, as waitpid(2) reports it
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def signal_name(code: int) -> str:
    """SIGKILL for -9 (a Popen status) or 137 (a shell-style 128+n status)."""
    try:
        return signal.Signals(-code if code < 0 else code - 128).name
    except ValueError:
        return f"signal {abs(code)}"


@dataclass
class TreeSample:
    rss: int  # bytes, the whole tree
    cpu_percent: float
    num_procs: int


def sample(procs: list[psutil.Process], cache: dict[int, psutil.Process]) -> TreeSample:
    """RSS and CPU of these processes. `cache` keeps Process objects so cpu_percent has an interval to measure."""
    rss, cpu, n = 0, 0.0, 0
    for p in procs:
        proc = cache.setdefault(p.pid, p)
        try:
            rss += proc.memory_info().rss
            cpu += proc.cpu_percent(None)
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return TreeSample(rss, cpu, n)
