"""Writing a checkpoint: durable files, then the meta that vouches for them (the commit), then the latest marker.

Every file goes through nanochat/safefile.py (a temp file created exclusively, fsync, rename, fsync of the folder);
the payload files are hashed as their bytes go out, so the meta's sizes and checksums cost no second read. What is
left when a write is cut short (temp files, files without a meta) is debris: `clean_temp` removes it, and a save
that finds a committed checkpoint at its own step sets it aside first (`set_aside`), never overwriting it.
When to save and in which thread is nanochat/saver.py's business.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import xxhash

from nanochat import safefile
from nanochat.checkpoint.meta import Meta
from nanochat.checkpoint.names import LATEST, file_name, record_path
from nanochat.checkpoint.verify import inspect
from nanochat.lifeline import writer_alive, writer_id
from nanochat.safefile import TMP_PREFIX

_TMP_WRITER = re.compile(r"\.([0-9]+)(?:-([0-9]+))?\Z")  # .<pid>-<process start time>
_TORCH_CRC_LOCK = threading.Lock()


class _HashingWriter:
    """A file wrapper that computes size and checksum as bytes go out (no second read), with a fault hook."""

    def __init__(self, f, on_first_write: Callable[[], None] | None = None):
        self.f, self.hash, self.size, self.on_first_write = f, xxhash.xxh3_64(), 0, on_first_write
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        try:
            n = self.f.write(data)
        except OSError as e:  # torch.save reports it as a bare RuntimeError; keep it for write_atomic
            self.error = e
            raise
        if self.on_first_write is not None:  # the file is now partly written: a crash here is "mid-write"
            self.f.flush()
            hook, self.on_first_write = self.on_first_write, None
            hook()
        return n

    def flush(self) -> None:
        self.f.flush()


def write_atomic(
    path: Path,
    write: Callable[[_HashingWriter], None],
    mid_write: Callable[[], None] | None = None,
    private: bool = False,
):
    """Write through a temp file, fsync, rename (nanochat/safefile.py: created exclusively, never through a
    symlink; `private` makes it 0600, for snapshots in shared memory). Returns (size, xxh3-64 hex digest)."""
    writers: list[_HashingWriter] = []

    def hashed(f) -> tuple[int, str]:
        writers.append(_HashingWriter(f, mid_write))
        write(writers[0])
        return writers[0].size, writers[0].hash.hexdigest()

    try:
        return safefile.write_atomic(path, hashed, private)
    except BaseException as e:
        if writers and writers[0].error is not None and not isinstance(e, OSError):
            # a full disk inside torch.save surfaces as RuntimeError("unexpected pos ..."): re-raise the OSError
            # (ENOSPC, EFBIG, EIO) so the caller can say what happened instead of crashing with a traceback
            raise writers[0].error from e
        raise


def _torch_save(state: dict, f: _HashingWriter) -> None:
    """torch.save without torch's own per-record CRC32: our checksum covers the whole file at ~7x the speed
    (torch's CRC32 was about half of a plain torch.save + fsync, see scripts/bench_writer.py). The option is
    process-wide (torch >= 2.6); it is restored at once and only changes what is written, not what loads."""
    import torch  # here, not at the top: listing and verifying checkpoints must not cost seconds of import

    set_crc = getattr(torch.serialization, "set_crc32_options", None)
    if set_crc is None:
        torch.save(state, f)
        return
    with _TORCH_CRC_LOCK:  # two savers in one process must not restore each other's setting
        before = torch.serialization.get_crc32_options()
        set_crc(False)
        try:
            torch.save(state, f)
        finally:
            set_crc(before)


def write_text_atomic(path: Path, text: str, private: bool = False) -> None:
    safefile.write_text(path, text, private)


def write(
    directory: Path,
    step: int,
    model_state: dict,
    optim_state: dict | None,
    meta: Meta | dict,
    fault: Callable[[str], None] = lambda phase: None,
    private: bool = False,
    codec: str = "none",
    threads: int = 1,
) -> None:
    """Write and commit one checkpoint: both payload files, then the meta that vouches for them (the commit).
    `codec` "zstd" compresses them losslessly on `threads` threads (nanochat/compress.py); loading needs no flag.

    Does not touch latest_step.txt or prune (see `mark_latest`, `prune`); nanochat/saver.py does the ordering.
    `optim_state` None writes a weights-only checkpoint (no optimizer file; e.g. an average of checkpoints).
    `meta` is the writer's record (a dict is parsed first: a malformed one fails before any file is written);
    the step, the files and the time are added here.
    """
    if not isinstance(meta, Meta):
        meta = Meta.parse(meta, "the meta to write", committed=False)
    files = {}
    states = (("model", model_state),) + ((("optim", optim_state),) if optim_state is not None else ())
    if optim_state is None:
        meta = replace(meta, weights_only=True)
    for kind, state in states:
        name = file_name(kind, step)
        info: dict = {}  # a compressed file's codec, level and raw size (none: nothing, as in every older meta)
        if codec == "none":
            write = lambda w, s=state: _torch_save(s, w)  # noqa: E731
        else:
            from nanochat import compress  # imports torch and numpy: only when compressing

            write = lambda w, s=state, i=info: i.update(compress.dump(s, w, codec, threads=threads))  # noqa: E731
        size, digest = write_atomic(directory / name, write, lambda k=kind: fault(k), private)
        files[name] = {"size": size, "xxh3_64": digest, **info}
    meta = replace(meta, step=step, files=files, saved_at=time.time())
    fault("meta")
    text = json.dumps(meta.to_dict(), indent=1)
    write_text_atomic(directory / file_name("meta", step), text, private)  # the commit point


def write_record(directory: Path, kind: str, step: int, record: dict) -> Path:
    """A JSON record about the checkpoint at `step` (e.g. chat_eval's scores), beside it as <kind>_<step>.json,
    written atomically. Not a part of the checkpoint: it vouches for nothing, and pruning leaves it."""
    path = record_path(directory, kind, step)
    write_text_atomic(path, json.dumps(record, indent=1))
    return path


def mark_latest(directory: Path, step: int) -> None:
    write_text_atomic(directory / LATEST, f"{step}\n")


def update_meta(directory: Path, step: int, **fields) -> None:
    """Add metrics to a committed meta (e.g. the final validation bpb, measured after the save), atomically.
    `fields` are spelled as in the file (`val_bpb=..., val_bpb_step=...`); every other key is kept."""
    path = directory / file_name("meta", step)
    meta = Meta.parse(json.loads(path.read_text()), path.name).with_fields(**fields)
    write_text_atomic(path, json.dumps(meta.to_dict(), indent=1))


def set_aside(directory: Path, step: int, warn: Callable[[str], None]) -> None:
    """Before a save takes a step that already has a committed checkpoint, rename its files out of the way: to
    `*.damaged` if it is invalid (evidence for the user), to `*.replaced` if it is valid (a fallback made the run
    save this step again). Uncommitted debris is simply overwritten."""
    ckpt = inspect(directory, step)
    if not ckpt.committed:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = "replaced" if ckpt.valid else "damaged"
    for p in ckpt.paths:
        p.rename(p.with_name(f"{p.name}.{stamp}.{what}"))
    why = "a valid one, saved again now" if ckpt.valid else ckpt.problem
    warn(f"step {step} already had a checkpoint ({why}); kept its files as *.{stamp}.{what}")


def clean_temp(directory: Path) -> tuple[list[Path], list[Path]]:
    """Remove temp files left by crashed saves: (removed, kept). A temp file whose writer is still alive is kept
    (a save in flight). Call while holding the trainer lock, which already keeps any other trainer out: this is
    the second line. The writer is named by pid and process start time, so a reused pid (a restarted container)
    does not keep a dead writer's debris forever."""
    removed, kept = [], []
    for p in sorted(directory.glob(f"{TMP_PREFIX}*")) if directory.is_dir() else []:
        m = _TMP_WRITER.search(p.name)
        if not p.is_file():
            continue
        if m and m.group(0)[1:] != writer_id() and writer_alive(int(m.group(1)), m.group(2)):
            kept.append(p)
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed, kept
