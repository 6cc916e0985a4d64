"""The errors a user acts on, at the bottom of the layering so that every storage module can raise them: the
checkpoint package (nanochat/checkpoint/) and the directory locks (nanochat/locks.py) both build on this module.
The trainer turns them into one `error:` line and an exit status, 2 (refused) or 74 (storage): see `run_and_exit`
in nanochat/train_loop.py.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message is one line and names the fix."""


class StorageError(CheckpointError):
    """Reading or writing the storage failed (disk full, I/O error, stale NFS handle): a restart may succeed."""
