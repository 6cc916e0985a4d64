"""Never outlive the launcher: the parent-death signal, in a module that imports nothing slow (no torch), so a
process can set it before its first second of imports."""

from __future__ import annotations

import ctypes
import os

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
