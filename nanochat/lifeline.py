"""Processes: never outlive the launcher (the parent-death signal), and tell who is alive (a pid, and a pid with
its start time, which a reused pid does not share). Imports nothing slow (no torch), so a process can arm the
signal before its first second of imports."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent: int | None = None) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies. Returns False if the parent (pid `parent`,
    default: the parent as of this call) is already gone by the time the signal is armed: it would never come, so
    the caller should exit. Always True off Linux (best effort)."""
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return True
    return os.getppid() == parent


def orphaned() -> bool:
    """Already reparented to init: the launcher died before this process could arm the signal (its first few
    milliseconds). Init itself can be the launcher (torchrun as a container's pid 1): then this is not orphaned."""
    if os.getppid() != 1:
        return False
    try:
        return b"torch" not in open("/proc/1/cmdline", "rb").read()
    except OSError:
        return False


def writer_id(pid: int | None = None) -> str:
    """`<pid>-<start time>` of a process (the start time in clock ticks since boot, from /proc; the pid alone where
    there is no /proc): what a temp file's name says about who is writing it."""
    pid = os.getpid() if pid is None else pid
    start = start_time(pid)
    return f"{pid}-{start}" if start is not None else str(pid)


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22, counted after the command name


def started_at(pid: int | None = None) -> float:
    """The wall time a process started (default: this one), to a clock tick: its start in ticks since boot against
    the boot clock now. psutil's create_time adds the boot time Linux gives in whole seconds, so it reads up to a
    second early: too coarse for a ledger of seconds. Where there is no /proc, psutil's it is (psutil.Error if the
    process is gone)."""
    start = start_time(os.getpid() if pid is None else pid)
    if start is None:
        import psutil  # not at the top: this module is imported before anything slow

        return psutil.Process(pid).create_time()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(start) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def writer_alive(pid: int, start: str | None) -> bool:
    if not pid_alive(pid):
        return False
    return start is None or start_time(pid) in (None, start)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
