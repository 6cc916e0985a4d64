"""Verifying a checkpoint: is it what its meta vouches for, and does it load without running code.

A checkpoint is valid only if its meta parses (into meta.py's record, kept as `Checkpoint.meta`), names only this
step's files (`vouched_files`), both files match the sizes and checksums it records (xxh3-64; crc32 in metas of
older versions) and both load with `torch.load(weights_only=True)`. `inspect` says which of these fails, as one
line; nothing here deletes anything.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import xxhash

from nanochat.checkpoint.meta import Meta
from nanochat.checkpoint.names import KINDS, Checkpoint, file_name, steps_on_disk
from nanochat.errors import CheckpointError


class MetaError(ValueError):
    """A meta that parses but breaks the rules of what it may vouch for (see `vouched_files`)."""


def vouched_files(meta: Meta, step: int) -> dict[str, dict]:
    """{name: what the meta promises of it (see `_expected`)} for the payload files a meta of `step` lists: the one
    rule on what a meta may name, for local verification and remote copies alike. Only this step's `file_name`s
    (the model, and the optimizer unless weights-only) may be listed, so a tampered meta can never make a reader
    fetch, write or delete a file of its choosing. Raises MetaError for a meta that breaks the rule, and
    KeyError, TypeError, AttributeError or ValueError for a malformed file entry."""
    if meta.step != step:
        raise MetaError(f"records step {meta.step!r}"[:80])
    allowed = {file_name(kind, step) for kind in KINDS}
    files = {}
    for name, entry in meta.files.items():
        if name not in allowed:
            raise MetaError(f"lists {name!r}"[:80] + f", not a file of step {step} (a tampered meta?)")
        files[name] = _expected(entry)
    for kind in ("model",) if meta.weights_only else KINDS:
        if file_name(kind, step) not in files:
            raise MetaError(f"does not list {file_name(kind, step)}")
    return files


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


def inspect(
    directory: Path, step: int, paths: list[Path] | None = None, verify: bool = True, load_check: bool = True
) -> Checkpoint:
    """Check one step's files against its meta. `verify=False` checks sizes only (cheap, for listings);
    `load_check=False` checks checksums but skips the weights_only load, which needs torch (`nanochat-run status`
    without --verify: a second, not seconds)."""
    paths = paths if paths is not None else steps_on_disk(directory).get(step, [])
    ckpt = Checkpoint(step, sorted(paths))
    meta_path = directory / file_name("meta", step)
    if not meta_path.exists():
        ckpt.problem = "no meta file (an uncommitted save, or an interrupted prune)"
        return ckpt
    ckpt.committed = True
    try:
        meta = Meta.parse(json.loads(meta_path.read_text()), meta_path.name)
        # size and checksum of each listed file, checked here so a malformed entry is a problem, not a crash
        files = vouched_files(meta, step)
    except MetaError as e:
        ckpt.problem = f"{meta_path.name} {e}"
        return ckpt
    except CheckpointError as e:  # Meta.parse's one line names the file
        ckpt.problem = str(e)
        return ckpt
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        ckpt.problem = f"{meta_path.name} is unreadable ({type(e).__name__}: {e})"
        return ckpt
    ckpt.meta = meta
    for kind in ("model",) if meta.weights_only else KINDS:
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
    return [inspect(directory, s, paths, verify) for s, paths in sorted(steps_on_disk(directory).items())]
