"""Checkpoints: the only module that knows their file names, how they are committed, verified and pruned.

A checkpoint at step N is three files in one directory, plus a marker:

    model_00000N.pt      model weights (torch.save of the state dict)
    optim_00000N.pt      AdamW moments and Muon momentum. The optimizer state is replicated on every rank
                         (see nanochat/optim.py), so rank 0 writes one file; there are no per-rank parts.
    meta_00000N.json     step, configs, metrics, every rank's data-loader position and RNG state, stop reason,
                         and the size and xxh3-64 checksum of the two files above. Written last: it is the
                         commit marker.
    latest_step.txt      the newest committed step, replaced atomically after the meta.

    .run_id              the run's lineage: a random id made at a fresh start and recorded in every meta, so
                         an in-memory snapshot is only ever resumed into the run that wrote it
    .trainer.lock, .nanochat-run.lock   the writer's and the supervisor's locks (nanochat/locks.py)

Every file is written to `.tmp.<name>.<pid>` in the same directory, flushed, fsync'ed and renamed, then the
directory is fsync'ed. So a crash at any instant leaves either a committed checkpoint or debris that is not one:
a temp file (removed at the next start unless its writer is still alive) or files without a meta (an uncommitted
save, overwritten when the run reaches that step again). A checkpoint is valid only if its meta parses, both files
match the sizes and checksums it records (xxh3-64, ~25 GB/s on one core: verifying costs little next to reading)
and both load with `torch.load(weights_only=True)` (a checkpoint can never run code). `find_resume_point` is the
one answer to "the newest usable checkpoint" for the trainer, the saver, the supervisor, `status` and `prune`: it
takes the newest valid one and says why it skipped any newer ones. A damaged checkpoint is never deleted or
overwritten silently (it is renamed to `*.damaged` with a warning before a new save takes its step), and pruning
keeps the newest `keep` *verified* checkpoints.

In-memory snapshots use the same files and rules in shared memory (nanochat/snapshots.py: `slots`, `newest`,
`remove`, `stale`); the directory's locks (`DirLock`, `LockError`, `lock_holder`) are nanochat/locks.py. Saving
from the trainer (when, where, in the background) is nanochat/saver.py.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from nanochat import safefile
from nanochat.lifeline import writer_alive, writer_id
from nanochat.safefile import TMP_PREFIX, fsync_path, make_dir  # noqa: F401 - this module's names since long

if TYPE_CHECKING:
    import torch

LATEST = "latest_step.txt"
RUN_ID = ".run_id"
# ASCII digits only, and \Z (not $, which also matches before a trailing newline): a name is exact or not ours
_NAME = re.compile(r"(model|optim|meta)_([0-9]{6,})\.(?:pt|json)")
_TMP_WRITER = re.compile(r"\.([0-9]+)(?:-([0-9]+))?\Z")  # .<pid>-<process start time>
KINDS = ("model", "optim")  # the payload files a meta vouches for
_TORCH_CRC_LOCK = threading.Lock()


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message is one line and names the fix."""


class StorageError(CheckpointError):
    """Reading or writing the storage failed (disk full, I/O error, stale NFS handle): a restart may succeed."""


def file_name(kind: str, step: int) -> str:
    """The one place that spells checkpoint file names."""
    return f"{kind}_{step:06d}.json" if kind == "meta" else f"{kind}_{step:06d}.pt"


def parse_name(name: str) -> tuple[str, int] | None:
    """(kind, step) of a checkpoint file name, exactly as `file_name` spells it; None for any other file (a
    trailing newline, other digits, extra zeros or another suffix make it someone else's file)."""
    m = _NAME.fullmatch(name)
    if not m:
        return None
    kind, step = m.group(1), int(m.group(2))
    return (kind, step) if file_name(kind, step) == name else None


class MetaError(ValueError):
    """A meta that parses but breaks the rules of what it may vouch for (see `vouched_files`)."""


def vouched_files(meta: dict, step: int) -> dict[str, dict]:
    """{name: what the meta promises of it (see `_expected`)} for the payload files a meta of `step` lists: the one
    rule on what a meta may name, for local verification and remote copies alike. Only this step's `file_name`s
    (the model, and the optimizer unless weights-only) may be listed, so a tampered meta can never make a reader
    fetch, write or delete a file of its choosing. Raises MetaError for a meta that breaks the rule, and
    KeyError, TypeError, AttributeError or ValueError for a malformed one."""
    if meta["step"] != step:
        raise MetaError(f"records step {meta['step']!r}"[:80])
    allowed = {file_name(kind, step) for kind in KINDS}
    files = {}
    for name, entry in meta["files"].items():
        if name not in allowed:
            raise MetaError(f"lists {name!r}"[:80] + f", not a file of step {step} (a tampered meta?)")
        files[name] = _expected(entry)
    for kind in ("model",) if meta.get("weights_only") else KINDS:
        if file_name(kind, step) not in files:
            raise MetaError(f"does not list {file_name(kind, step)}")
    return files


@dataclass
class Checkpoint:
    """What is on disk for one step, and whether it is usable."""

    step: int
    paths: list[Path]
    meta: dict | None = None
    problem: str = ""  # empty when valid
    committed: bool = False  # a meta file exists (parseable or not)

    @property
    def valid(self) -> bool:
        return self.committed and not self.problem

    @property
    def final(self) -> bool:
        return bool(self.meta and self.meta.get("final"))

    @property
    def weights_only(self) -> bool:
        """Its optimizer file was dropped (see `slim`): fine for evaluation, chat and the next phase; a resume from
        it starts the optimizer afresh."""
        return bool(self.meta and self.meta.get("weights_only"))

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths if p.exists())


# ----------------------------------------------------------------------------------------------------------------
# durable writes


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
        except OSError as e:  # torch.save reports it as a bare RuntimeError; keep it for _write_atomic
            self.error = e
            raise
        if self.on_first_write is not None:  # the file is now partly written: a crash here is "mid-write"
            self.f.flush()
            hook, self.on_first_write = self.on_first_write, None
            hook()
        return n

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(
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


def file_digest(path: Path, algo: str = "xxh3_64", chunk: int = 1 << 24) -> str:
    """A file's checksum as the meta records it: xxh3-64 (hex), or crc32 (an int, in metas of older versions)."""
    h, crc = xxhash.xxh3_64(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            if algo == "crc32":
                crc = zlib.crc32(view[:n], crc)
            else:
                h.update(view[:n])
    return str(crc) if algo == "crc32" else h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# reading the directory


def _steps_on_disk(directory: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    if directory.is_dir():
        for p in directory.iterdir():
            if parsed := parse_name(p.name):
                found.setdefault(parsed[1], []).append(p)
    return found


def inspect(
    directory: Path, step: int, paths: list[Path] | None = None, verify: bool = True, load_check: bool = True
) -> Checkpoint:
    """Check one step's files against its meta. `verify=False` checks sizes only (cheap, for listings);
    `load_check=False` checks checksums but skips the weights_only load, which needs torch (`nanochat-run status`
    without --verify: a second, not seconds)."""
    paths = paths if paths is not None else _steps_on_disk(directory).get(step, [])
    ckpt = Checkpoint(step, sorted(paths))
    meta_path = directory / file_name("meta", step)
    if not meta_path.exists():
        ckpt.problem = "no meta file (an uncommitted save, or an interrupted prune)"
        return ckpt
    ckpt.committed = True
    try:
        meta = json.loads(meta_path.read_text())
        # size and checksum of each listed file, checked here so a malformed entry is a problem, not a crash
        files = vouched_files(meta, step)
    except MetaError as e:
        ckpt.problem = f"{meta_path.name} {e}"
        return ckpt
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        ckpt.problem = f"{meta_path.name} is unreadable ({type(e).__name__}: {e})"
        return ckpt
    ckpt.meta = meta
    for kind in ("model",) if meta.get("weights_only") else KINDS:
        name = file_name(kind, step)
        path = directory / name
        if not path.exists():
            ckpt.problem = f"{name} is missing"
        elif problem := check_file(path, files[name], verify, verify and load_check):
            ckpt.problem = f"{name} {problem}"
        if ckpt.problem:
            break
    return ckpt


def _unsafe(path: Path) -> str:
    """Why `path` does not load as a plain state dict with weights_only=True ('' if it does). Memory-mapped, so
    only the pickle is read: a forged meta that vouches for a file with code in it is caught here, not at load.
    A compressed file never unpickles anything: its layout (index, frame sizes, declared sizes) is checked
    instead, so that loading it cannot fail on anything but its frames' bytes."""
    from nanochat import compress

    if compress.codec_of(path) == "zstd":
        try:
            compress.read_index(path)
        except (compress.CompressedFileError, OSError) as e:
            return f"is not a valid compressed checkpoint file ({e})"
        return ""
    import torch

    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError from the zip reader, OSError, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"does not load safely ({type(e).__name__}: {first})"
    return ""


def check_file(path: Path, want: dict, verify: bool = True, load_check: bool = False) -> str:
    """'' if the file has the size (and with `verify` the checksum) its meta entry promises, and with
    `load_check` loads safely (see `_unsafe`), else what is wrong."""
    want = _expected(want) if "algo" not in want else want
    if path.stat().st_size != want["size"]:
        return f"has {path.stat().st_size} bytes, meta says {want['size']} (truncated?)"
    if verify and file_digest(path, want["algo"]) != want["digest"]:
        return "fails its checksum (corrupted)"
    return _unsafe(path) if load_check else ""


def _expected(entry: dict) -> dict:
    """What a meta's file entry promises: size, checksum algorithm and value (crc32 before xxh3-64 came in)."""
    algo = "xxh3_64" if "xxh3_64" in entry else "crc32"
    return {
        "size": int(entry["size"]),
        "algo": algo,
        "digest": str(entry[algo] if algo == "xxh3_64" else int(entry[algo])),
    }


def scan(directory: Path, verify: bool = False) -> list[Checkpoint]:
    """Every step that has checkpoint files, oldest first."""
    return [inspect(directory, s, paths, verify) for s, paths in sorted(_steps_on_disk(directory).items())]


def read_latest_marker(directory: Path) -> tuple[int | None, str]:
    """(step, problem) from latest_step.txt; problem is empty when the marker is fine."""
    try:
        text = safefile.read_text(directory / LATEST, limit=1 << 16, errors="replace").strip()
    except FileNotFoundError:
        return None, f"{LATEST} is missing"
    except safefile.UnsafeFileError as e:  # a planted symlink, a FIFO: refused, never followed
        return None, f"{LATEST} is {e.strerror}"
    if not (text.isascii() and text.isdigit()):  # isdigit() alone accepts "²", which int() refuses
        return None, f"{LATEST} holds {text[:40]!r}, not a step number"
    return int(text), ""


def find_latest_valid(
    directory: Path, warn: Callable[[str], None] = print, load_check: bool = True
) -> Checkpoint | None:
    """The newest valid checkpoint on disk (fully verified); warns about each newer one it had to skip, and why."""
    on_disk = _steps_on_disk(directory)
    if not on_disk:
        return None
    marker, problem = read_latest_marker(directory)
    if problem:
        warn(f"{directory}: {problem}; looking for the newest valid checkpoint instead")
    elif marker not in on_disk:
        warn(f"{directory}: {LATEST} points at step {marker}, which has no files; using the newest valid checkpoint")
    return next(valid_newest_first(directory, warn, load_check=load_check), None)


def valid_newest_first(
    directory: Path, warn: Callable[[str], None] = lambda msg: None, cache: dict | None = None, load_check: bool = True
) -> Iterator[Checkpoint]:
    """The valid checkpoints of a directory, newest first, each fully verified, warning about each invalid one it
    skips: the one walk behind both the resume point (`find_latest_valid`) and the kept set (`plan_prune`), so
    the checkpoint a run resumes from is always the first one pruning keeps. `cache` (a dict the caller keeps)
    remembers verified checkpoints by their files' identity (inode, size, mtime): a saver verifies each checkpoint
    once, not at every prune; a file replaced or rewritten is verified again."""
    on_disk = _steps_on_disk(directory)
    for step in sorted(on_disk, reverse=True):
        paths = on_disk[step]
        key = tuple((p.name, *_identity(p)) for p in sorted(paths))
        ckpt = cache.get(key) if cache is not None else None
        if ckpt is None:
            ckpt = inspect(directory, step, paths, verify=True, load_check=load_check)
            if cache is not None and ckpt.valid and load_check:  # the cache vouches for the full check only
                cache[key] = ckpt
        if ckpt.valid:
            yield ckpt
        else:
            warn(f"skipping the checkpoint at step {step}: {ckpt.problem}; falling back to an older one")


def _identity(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (None,)
    return st.st_ino, st.st_size, st.st_mtime_ns


def find_resume_point(
    directory: Path, warn: Callable[[str], None] = print, snapshots: bool = True, load_check: bool = True
) -> tuple[Path, Checkpoint] | None:
    """THE newest usable checkpoint, as (where, checkpoint): the newest valid one on disk, or a newer valid
    in-memory snapshot of the same run (`snapshots`). The trainer resumes from it; the supervisor judges progress
    and completion by it; `status` and `prune` report and keep it (`load_check`: see `inspect`)."""
    from nanochat import snapshots as shm  # snapshots.py builds on this module

    disk = find_latest_valid(directory, warn, load_check)
    snap = None
    try:
        snap = shm.newest(directory, run_id(directory, disk), load_check=load_check) if snapshots else None
    except CheckpointError as e:  # a planted or shared snapshot folder: never trusted
        warn(str(e))
    if snap and (disk is None or snap[1].step > disk.step):
        return snap
    return (directory, disk) if disk else None


def load(
    directory: Path, ckpt: Checkpoint, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
) -> tuple[dict, dict | None]:
    """(model state, optimizer state) of a verified checkpoint, never unpickling code; the optimizer state is None
    for a weights-only checkpoint. `model`, the module the weights are for, bounds what a compressed file may
    declare (see `_limits`)."""
    if ckpt.weights_only:
        return _load(directory, ckpt, device, ("model",), model)[0], None
    states = _load(directory, ckpt, device, KINDS, model)
    return states[0], states[1]


def load_model(
    directory: Path, ckpt: Checkpoint, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
) -> dict:
    """The weights alone (a derived phase starts from them with an optimizer of its own); `model` as for `load`."""
    return _load(directory, ckpt, device, ("model",), model)[0]


# The most raw bytes a payload file may hold per weight of the model: 8 (any dtype up to 64 bits: a checkpoint
# saved in fp32 loads into bf16 weights), and for the optimizer four such states per weight (AdamW's two moments,
# Muon's momentum, with room to spare).
BYTES_PER_WEIGHT = {"model": 8, "optim": 32}


def _limits(model: torch.nn.Module | None) -> dict[str, int | None]:
    """The most raw bytes each payload file may declare for `model` (None: unknown, only the file's own size
    bounds it): a compressed file cannot make a resume allocate more than the run's model and optimizer need."""
    if model is None:
        return {kind: None for kind in KINDS}
    weights = sum(t.numel() for t in model.state_dict().values())
    return {kind: per * weights + (1 << 20) for kind, per in BYTES_PER_WEIGHT.items()}


def _load(directory: Path, ckpt: Checkpoint, device, kinds, model=None) -> list[dict]:
    import torch

    from nanochat import compress

    states, limits = [], _limits(model)
    on_cpu = torch.device(device).type == "cpu"
    for kind in kinds:
        # Memory-mapped, except the optimizer state on CPU: the optimizer keeps those very tensors, and a mapping
        # would pin the file (disk or shared memory, even once pruned) for the rest of the run.
        mmap = not (on_cpu and kind == "optim")
        path = directory / file_name(kind, ckpt.step)
        try:  # plain torch.load(weights_only=True) if uncompressed
            state = compress.load(path, threads=0, mmap=mmap, max_raw=limits[kind])
        except compress.CompressedFileError as e:
            raise CheckpointError(f"{path} cannot be read ({e}); resume falls back to an older checkpoint") from e
        except OSError as e:
            raise StorageError(f"reading {path} failed ({e.strerror or e}); check the storage, then resume") from e
        if torch.device(device).type != "cpu":
            state = _to_device(state, device)
        states.append(state)
    return states


def _to_device(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# pruning and cleanup


def kept_forever(step: int, final: bool, keep_every: int) -> bool:
    """A checkpoint no retention deletes: the final one, and with keep_every=N > 0 every N-th step's (for
    evaluation across a run, like Orbax's keep period)."""
    return final or keep_every > 0 and step % keep_every == 0


def plan_prune(directory: Path, keep: int, cache: dict | None = None, keep_every: int = 0) -> list[Checkpoint]:
    """What pruning to the newest `keep` valid checkpoints would delete (keep=-1: nothing).

    The kept set is made of *verified* checkpoints, newest first: a newer checkpoint whose bytes rotted at the same
    size takes no keep slot, so the newest verified checkpoint is never deleted. Never deleted either: a final
    checkpoint, one whose step is a multiple of `keep_every` (> 0), or a damaged one (the user decides about
    those). Uncommitted files (no meta) older than the newest kept checkpoint are debris and go too. Verification
    reads each checkpoint (once per `cache`, see `valid_newest_first`).
    """
    if keep == -1:
        return []
    if keep < 1:
        raise CheckpointError(f"cannot keep {keep} checkpoints: keep at least 1 (or -1 for all)")
    kept: list[Checkpoint] = []
    doomed: list[Checkpoint] = []
    for c in valid_newest_first(directory, cache=cache):
        if len(kept) < keep:
            kept.append(c)
        elif not kept_forever(c.step, c.final, keep_every):
            doomed.append(c)
    if not kept:
        return []
    doomed += [c for c in scan(directory, verify=False) if not c.committed and c.step < kept[0].step]
    return sorted(doomed, key=lambda c: c.step)


def prune(
    directory: Path,
    keep: int,
    hook: Callable[[str], None] | None = None,
    cache: dict | None = None,
    keep_every: int = 0,
) -> list[Path]:
    """Delete what plan_prune names: the meta first, so a crash mid-prune leaves no half-valid checkpoint."""
    return _delete(directory, plan_prune(directory, keep, cache, keep_every), hook)


def slim(directory: Path, keep_full: int, cache: dict | None = None) -> list[Path]:
    """Drop the optimizer file of every valid checkpoint older than the newest `keep_full` ones (-1: none), except a
    final one: the disk budget of a long run, where only the newest checkpoint needs the optimizer state for an
    exact resume. The meta is rewritten first, as weights-only (that is the commit of the change), then the file is
    deleted: a crash between leaves a valid weights-only checkpoint and a stray file the next call removes."""
    if keep_full == -1:
        return []
    removed = []
    for i, c in enumerate(valid_newest_first(directory, cache=cache)):
        optim = directory / file_name("optim", c.step)
        if i < keep_full or c.final:
            continue
        if not c.weights_only:
            files = {name: f for name, f in c.meta["files"].items() if name != optim.name}
            meta = {**c.meta, "weights_only": True, "files": files}
            write_text_atomic(directory / file_name("meta", c.step), json.dumps(meta, indent=1))
        if optim.exists():
            optim.unlink()
            removed.append(optim)
    if removed:
        fsync_path(directory)
    return removed


def make_room(directory: Path, keep: int, need: int, cache: dict | None = None, keep_every: int = 0) -> list[Path]:
    """Before a save of `need` bytes that does not fit: prune one more than usual (to keep-1, at least 1), so the
    new checkpoint takes the freed slot, but only if that makes room. A save that cannot fit anyway must fail with
    every earlier checkpoint still in place. Returns what was deleted."""
    free = shutil.disk_usage(directory).free
    if free >= need or keep == -1:
        return []
    doomed = plan_prune(directory, max(1, keep - 1), cache, keep_every)
    if free + sum(c.size for c in doomed) < need:
        return []
    return _delete(directory, doomed)


def _delete(directory: Path, doomed: list[Checkpoint], hook: Callable[[str], None] | None = None) -> list[Path]:
    removed = []
    for ckpt in doomed:
        meta = directory / file_name("meta", ckpt.step)
        for path in sorted(ckpt.paths, key=lambda p: p != meta):
            path.unlink(missing_ok=True)
            removed.append(path)
            if hook:
                hook("prune")
    if removed:
        fsync_path(directory)
    return removed


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


def archive(directory: Path) -> Path | None:
    """Move every checkpoint file, the latest marker and the run id into a new `archived-<time>/` subfolder (a
    fresh start); nothing is deleted."""
    files = [p for paths in _steps_on_disk(directory).values() for p in paths]
    files += [directory / name for name in (LATEST, RUN_ID) if (directory / name).exists()]
    if not files:
        return None
    stamp = time.strftime("archived-%Y%m%d-%H%M%S")
    dest, n = directory / stamp, 1
    while dest.exists():  # two fresh starts within a second must not collide
        dest, n = directory / f"{stamp}-{n}", n + 1
    dest.mkdir()
    for p in files:
        p.rename(dest / p.name)
    fsync_path(directory)
    return dest


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


# ----------------------------------------------------------------------------------------------------------------
# writing


def write(
    directory: Path,
    step: int,
    model_state: dict,
    optim_state: dict | None,
    meta: dict,
    fault: Callable[[str], None] = lambda phase: None,
    private: bool = False,
    codec: str = "none",
    threads: int = 1,
) -> None:
    """Write and commit one checkpoint: both payload files, then the meta that vouches for them (the commit).
    `codec` "zstd" compresses them losslessly on `threads` threads (nanochat/compress.py); loading needs no flag.

    Does not touch latest_step.txt or prune (see `mark_latest`, `prune`); nanochat/saver.py does the ordering.
    `optim_state` None writes a weights-only checkpoint (no optimizer file; e.g. an average of checkpoints).
    """
    files = {}
    states = (("model", model_state),) + ((("optim", optim_state),) if optim_state is not None else ())
    if optim_state is None:
        meta = {**meta, "weights_only": True}
    for kind, state in states:
        name = file_name(kind, step)
        info: dict = {}  # a compressed file's codec, level and raw size (none: nothing, as in every older meta)
        if codec == "none":
            write = lambda w, s=state: _torch_save(s, w)  # noqa: E731
        else:
            from nanochat import compress  # imports torch and numpy: only when compressing

            write = lambda w, s=state, i=info: i.update(compress.dump(s, w, codec, threads=threads))  # noqa: E731
        size, digest = _write_atomic(directory / name, write, lambda k=kind: fault(k), private)
        files[name] = {"size": size, "xxh3_64": digest, **info}
    meta = {**meta, "step": step, "files": files, "saved_at": time.time()}
    fault("meta")
    write_text_atomic(directory / file_name("meta", step), json.dumps(meta, indent=1), private)  # the commit point


def write_record(directory: Path, kind: str, step: int, record: dict) -> Path:
    """A JSON record about the checkpoint at `step` (e.g. chat_eval's scores), beside it as <kind>_<step>.json,
    written atomically. Not a part of the checkpoint: it vouches for nothing, and pruning leaves it."""
    path = record_path(directory, kind, step)
    write_text_atomic(path, json.dumps(record, indent=1))
    return path


def record_path(directory: Path, kind: str, step: int) -> Path:
    return directory / f"{kind}_{step:06d}.json"


def mark_latest(directory: Path, step: int) -> None:
    write_text_atomic(directory / LATEST, f"{step}\n")


def update_meta(directory: Path, step: int, **fields) -> None:
    """Add metrics to a committed meta (e.g. the final validation bpb, measured after the save), atomically."""
    path = directory / file_name("meta", step)
    meta = json.loads(path.read_text())
    meta.update(fields)
    write_text_atomic(path, json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# lineage


def source_record(directory: Path, ckpt: Checkpoint) -> dict:
    """What a derived phase records of the checkpoint it started from: phase, directory, step, model checksum."""
    model = ckpt.meta["files"][file_name("model", ckpt.step)]
    return {"phase": ckpt.meta.get("phase", "base_train"), "dir": str(directory.resolve()), "step": ckpt.step,
            "model_xxh3_64": model.get("xxh3_64")}  # fmt: skip


def source_changed(record: dict) -> str:
    """'' if the checkpoint `record` describes is still there as it was, else what happened to it."""
    if not record:
        return ""
    meta_path = Path(record["dir"]) / file_name("meta", record["step"])
    try:
        files = json.loads(meta_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "is gone or unreadable"
    if files.get(file_name("model", record["step"]), {}).get("xxh3_64") != record.get("model_xxh3_64"):
        return "was replaced by another model"
    return ""


def run_id(directory: Path, disk: Checkpoint | None = None) -> str | None:
    """The run id of this directory's lineage: `.run_id`, else the one the newest valid checkpoint records."""
    try:
        text = safefile.read_text(directory / RUN_ID, limit=4096).strip()
        if text:
            return text
    except safefile.UnsafeFileError as e:  # a planted symlink: its target must never become this run's lineage
        raise CheckpointError(str(e)) from None
    except (OSError, UnicodeDecodeError):
        pass
    return (disk.meta or {}).get("run_id") if disk else None


def start_lineage(directory: Path, disk: Checkpoint | None = None) -> str:
    """Make sure `.run_id` exists: keep the directory's lineage, or begin a new one (a fresh start)."""
    rid = run_id(directory, disk) or uuid.uuid4().hex[:16]
    if not (directory / RUN_ID).exists():
        write_text_atomic(directory / RUN_ID, rid + "\n")
    return rid
