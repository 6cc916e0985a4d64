"""Files with fixed names in folders others may write to (a shared checkpoint dir, a run dir, a base dir), written,
appended to and read without ever following a symlink planted at the name: such a link could make a run overwrite,
or copy into its records, any file its user can reach.

    write_atomic, write_text   through a temp file `.tmp.<name>.<pid>-<start time>` beside the target, created
                               exclusively and never through a symlink (O_CREAT|O_EXCL|O_NOFOLLOW), fsync'ed and
                               renamed over the name (a rename replaces a link there, never what it points at),
                               then the folder fsync'ed
    open_append                a log (events.jsonl, metrics.jsonl, torchrun.log): O_APPEND|O_NOFOLLOW
    read_bytes, read_text      O_NOFOLLOW, with a size cap where the file should be small
    open_read                  the same for a file read in pieces (a log being tailed)

Only regular files are opened: a symlink, a FIFO, a device or a folder at the name raises UnsafeFileError, an
OSError (so every caller's handling of a failed read or write applies) whose message is one line naming the file
and the fix. The folders leading to the name are trusted: a symlinked checkpoint dir is the user's own choice.
Imports nothing slow (no torch): the supervisor's `status` uses it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from nanochat.lifeline import writer_id

TMP_PREFIX = ".tmp."
T = TypeVar("T")


class UnsafeFileError(OSError):
    """A file name that is not a plain regular file (a planted symlink, a FIFO), or one far too big to be what it
    should be: refused, never followed."""

    def __init__(self, path: Path | str, what: str) -> None:
        # strerror says what is wrong (for callers that name the file themselves), str() names the file too
        super().__init__(errno.ELOOP, f"{what}: refused; remove it, then retry", str(path))

    def __str__(self) -> str:  # one line, without OSError's "[Errno 40]" prefix
        return f"{self.filename} is {self.strerror}"


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink (it could point at any file of yours)"
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    return "not a regular file (a FIFO, socket or device)"


def open_fd(path: Path | str, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses anything but a regular file at `path`: O_NOFOLLOW, and O_NONBLOCK so a FIFO planted
    there cannot block the open. Raises UnsafeFileError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            try:
                st = os.lstat(path)
            except OSError:
                raise e from None
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(path, _kind(st.st_mode)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFileError(path, _kind(st.st_mode))
    os.set_blocking(fd, True)
    return fd


# ---- writing -----------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path, mode: int = 0o777) -> None:
    """mkdir -p whose new entries survive a power cut: each created level's parent is fsync'ed."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        fsync_path(d.parent)


def temp_path(path: Path) -> Path:
    """The temp file a write of `path` by this process goes through (`clean_temp` in nanochat/checkpoint/commit.py
    reads the writer back from the name)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{writer_id()}")


def write_atomic(
    path: Path,
    write: Callable[[IO[bytes]], T],
    private: bool = False,
    durable: bool = True,
    check: Callable[[Path], None] | None = None,
) -> T:
    """Replace `path` with what `write(file)` writes, all or nothing; returns what `write` returns. No temp file
    is left on error. `private` makes the file 0600 (else the umask decides); `durable=False` skips the fsyncs
    (a heartbeat: atomic is all it needs); `check(temp path)` may raise to refuse the written file (a download
    that is not what it should be) before it takes the name."""
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)  # our own debris (a retried save): nobody else writes under our pid and start
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600 if private else 0o666
        )
        with open(fd, "wb") as f:
            result = write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return result


def write_text(path: Path, text: str, private: bool = False, durable: bool = True) -> None:
    write_atomic(path, lambda f: f.write(text.encode()), private, durable)


def open_append(path: Path, mode: str = "ab", buffering: int = -1, private: bool = False) -> IO[Any]:
    """Open a log to append to, created if missing; "ab+" also lets the caller read (its last byte)."""
    flags = (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_APPEND | os.O_CREAT
    fd = open_fd(path, flags, 0o600 if private else 0o666)
    try:
        return open(fd, mode, buffering=buffering)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


# ---- reading -----------------------------------------------------------------------------------------------


def open_read(path: Path | str) -> IO[bytes]:
    return open(open_fd(path, os.O_RDONLY), "rb")


def read_bytes(path: Path | str, limit: int | None = None) -> bytes:
    """The file's bytes; more than `limit` of them (a small record that is not what it should be) is refused."""
    with open_read(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UnsafeFileError(path, f"over {limit} bytes, far more than this file ever holds")
    return data


def read_text(path: Path | str, limit: int | None = None, errors: str = "strict") -> str:
    return read_bytes(path, limit).decode("utf-8", errors)
