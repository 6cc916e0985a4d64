"""Lossless compression of checkpoint payload files (model_*.pt, optim_*.pt): codec "zstd", or "none" (torch.save).

A "zstd" file is our own container, written from the state dict (torch.save's zip does not say which dtype a
storage holds, and we must know it to compress well):  MAGIC | zstd frames | JSON index | u64 index size | MAGIC

- Each tensor's bytes are cut into chunks of CHUNK_BYTES (the unit of parallel work), and a chunk into its byte
  planes (byte 0 of every element, then byte 1, ...), one zstd frame with a checksum per plane. The sign and
  exponent planes of floats have few distinct values and shrink; the low mantissa planes are noise, stored nearly
  as is. Interleaved, every byte looks like noise: on a trained fp32 state 1.08x (model) and 1.11x (optimizer)
  plain, 1.19x and 1.23x by plane (scripts/bench_storage.py). Why python-zstandard and not blosc2's shuffle: the
  same ratio, no dependencies, standard checksummed frames (RFC 8878); blosc2 decodes ~2x faster, but needs 8 more
  packages, and ~1 GB/s per thread already outruns the links where compression pays.
- The index holds the state's nested dicts/lists/tuples and plain values (keys too: the optimizer's are ints),
  and each tensor's dtype, shape and frame sizes. Loading never unpickles, so a file cannot run code, and it needs
  no flag: the leading magic tells the formats apart. The index comes last, so frames stream through the
  checkpoint's hashing writer without a seek; the magic at both ends makes a truncated file a clear error.

Tensors come back contiguous, on the CPU, bit-identical (views and shared storage are not kept). Read errors stay
OSError; a malformed file is a CompressedFileError with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import zstandard

CODECS = ("none", "zstd")
DEFAULT_LEVEL = 1  # on float planes, level 3 or 9 is 1.6x or 6x slower for under 1% (scripts/bench_storage.py)
CHUNK_BYTES = 1 << 22  # 4 MiB: enough parallel work even for small models, large enough to cost no ratio
MAGIC = b"nanochz1"
_TAIL = struct.Struct("<Q8s")  # index length, MAGIC
# What a file may declare: at most MAX_RATIO raw bytes per byte it holds, plus FLOOR_BYTES. zstd itself reaches
# ~20000x (1 MiB of zeros is a 49-byte frame), so the format alone lets 16 KiB declare 512 MiB: a decompression bomb,
# allocated before any frame is read. A real checkpoint compresses ~1.2x (scripts/bench_storage.py); only a state
# over 99.5% zeros passes 256x, and under the floor any state does (small test states of zeros, say).
MAX_RATIO = 256
FLOOR_BYTES = 64 << 20
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, OverflowError)


# the dtypes a file may declare: plain bytes per element (no quantized, sub-byte or bit types, which torch.empty
# refuses or cannot view as bytes: a file naming one must fail as malformed here, not as a RuntimeError at load)
_PLAIN = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16", "bfloat16",
          "float32", "float64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
          "float8_e5m2fnuz")  # fmt: skip
_DTYPES = {name: getattr(torch, name) for name in _PLAIN if isinstance(getattr(torch, name, None), torch.dtype)}


class CompressedFileError(ValueError):
    """A compressed payload file is truncated, corrupted or not one at all."""


def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def codec_of(path: Path) -> str:
    """Which codec wrote `path` ("none" for anything that is not our container), from its first bytes."""
    with open(path, "rb") as f:
        return "zstd" if f.read(len(MAGIC)) == MAGIC else "none"


def _ordered(fn: Callable[[Any], Any], items: Iterable, threads: int) -> Iterator:
    """fn over items on `threads` threads, results in order, at most 2 x threads in flight (bounded memory).
    zstd and numpy's copies release the GIL, so the threads really run in parallel."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-zstd") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _planes(t: torch.Tensor, group: bool = True) -> np.ndarray:
    """A tensor's bytes as (elements, bytes per element) uint8 (one column if not `group`), sharing its memory."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat.reshape(-1, t.element_size() if group else 1)


def _encode(obj: Any, tensors: list[torch.Tensor], where: str = "") -> Any:
    """The state's structure as JSON, each tensor replaced by its number in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"tensor": len(tensors) - 1}
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, tensors, f"{where}[]") for v in obj]}
    if obj is None or type(obj) in (bool, int, float, str):  # exact types: json would not round-trip subclasses
        return obj
    raise TypeError(f"cannot compress a {type(obj).__name__} at {where or '/'}: only tensors and plain values")


def dump(
    state: Any, f: BinaryIO, codec: str = "zstd", level: int = DEFAULT_LEVEL, threads: int = 0, group: bool = True
) -> dict:
    """Write `state` (nested dicts/lists/tuples of tensors and plain values) to `f` on `threads` threads (0 = all
    cores); `group=False` keeps bytes interleaved (for comparisons). Returns what a meta may record of the file."""
    if codec == "none":
        torch.save(state, f)
        return {"codec": "none"}
    if codec != "zstd":
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    tensors: list[torch.Tensor] = []
    tree = _encode(state, tensors)
    planes = [_planes(t, group) for t in tensors]
    step = [max(1, CHUNK_BYTES // p.shape[1]) for p in planes]  # elements per chunk
    chunks = [(i, lo) for i, p in enumerate(planes) for lo in range(0, len(p), step[i])]
    local = threading.local()  # a ZstdCompressor must not be shared between threads

    def compress(chunk: tuple[int, int]) -> tuple[int, int, list[bytes]]:
        i, lo = chunk
        if not hasattr(local, "zc"):
            local.zc = zstandard.ZstdCompressor(level=level, write_checksum=True)
        rows = planes[i][lo : lo + step[i]]
        return i, rows.size, [local.zc.compress(np.ascontiguousarray(rows[:, b])) for b in range(rows.shape[1])]

    f.write(MAGIC)
    sizes: list[list[list[int]]] = [[] for _ in tensors]
    for i, raw, frames in _ordered(compress, chunks, threads or all_threads()):
        for frame in frames:
            f.write(frame)
        sizes[i].append([raw, *map(len, frames)])
    meta = [{"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "group": p.shape[1], "chunks": s}
            for t, p, s in zip(tensors, planes, sizes)]  # fmt: skip
    index = json.dumps({"format": 1, "codec": codec, "level": level, "tree": tree, "tensors": meta}).encode()
    f.write(index)
    f.write(_TAIL.pack(len(index), MAGIC))
    return {"codec": codec, "level": level, "raw_size": int(sum(p.size for p in planes))}


def read_index(path: Path, f: BinaryIO | None = None, max_raw: int | None = None) -> dict:
    """The index of a compressed file (open as `f`, if given), checked against the file's layout without
    decompressing anything: cheap, so verification can use it in place of a trial load. Every declared size is
    an exact integer, and their total is bounded by the file's size (MAX_RATIO) and by `max_raw` when the caller
    knows how large the state can be. Raises CompressedFileError."""
    path = Path(path)
    if f is None:
        with open(path, "rb") as f:
            return read_index(path, f, max_raw)
    size = os.fstat(f.fileno()).st_size
    if size < len(MAGIC) + _TAIL.size or f.read(len(MAGIC)) != MAGIC:
        raise CompressedFileError(f"{path.name} is not a compressed checkpoint file (or is truncated)")
    f.seek(size - _TAIL.size)
    n, tail = _TAIL.unpack(f.read(_TAIL.size))
    end = size - _TAIL.size - n  # where the frames must end
    if tail != MAGIC or end < len(MAGIC):
        raise CompressedFileError(f"{path.name} is truncated: its index is missing")
    f.seek(end)
    try:
        index = json.loads(f.read(n))
        if index["format"] != 1 or index["codec"] != "zstd":
            raise ValueError(f"format {index['format']}, codec {index['codec']!r} (written by a newer version?)")
        offset, raw, limit = len(MAGIC), 0, MAX_RATIO * size + FLOOR_BYTES
        limit = limit if max_raw is None else min(limit, max_raw)
        for t in index["tensors"]:
            t["dtype"], k, chunks = _DTYPES[t["dtype"]], t["group"], t["chunks"]
            if not all(type(d) is int and d >= 0 for d in t["shape"]) or k not in (1, t["dtype"].itemsize):
                raise ValueError(f"a tensor has shape {str(t['shape'])[:80]}, group {k}")
            if not all(len(c) == k + 1 and all(type(x) is int and x > 0 for x in c) and c[0] % k == 0 for c in chunks):
                raise ValueError("a chunk has an impossible size")
            nbytes = math.prod(t["shape"]) * t["dtype"].itemsize  # exact: numpy's int64 would wrap to a small size
            raw += nbytes
            if raw > limit:
                raise ValueError(f"it declares over {raw} bytes of tensors in a {size}-byte file (at most {limit})")
            if sum(c[0] for c in chunks) != nbytes:
                raise ValueError(f"a tensor's chunks do not add up to its shape {str(t['shape'])[:80]}")
            t["at"] = list(accumulate((sum(c[1:]) for c in chunks), initial=offset))  # where each chunk starts
            t["lo"] = list(accumulate((c[0] // k for c in chunks), initial=0))  # its first element
            offset = t["at"].pop()
        if offset != end:
            raise ValueError(f"the frames end at byte {offset}, the index starts at {end}")
        _decode(index["tree"], range(len(index["tensors"])))  # the structure is sound, and names only our tensors
    except _MALFORMED as e:
        raise CompressedFileError(f"{path.name} has a malformed index ({type(e).__name__}: {e})") from None
    return index


def _decode(node: Any, tensors: list | range) -> Any:
    if not isinstance(node, dict):
        return node
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        return (list if kind == "list" else tuple)(_decode(v, tensors) for v in value)
    raise ValueError(f"unknown node {kind!r}")


def load(path: Path, threads: int = 0, mmap: bool = False, max_raw: int | None = None) -> Any:
    """The state in `path`, whichever codec wrote it, never running code from the file. A torch.save file loads
    with torch.load(weights_only=True) (memory-mapped with `mmap`); a compressed one is decompressed on `threads`
    threads (0 = all cores) straight into the tensors, each thread reading its own chunks from the file, after
    `read_index` has bounded what it declares (`max_raw`: see there)."""
    path = Path(path)
    if codec_of(path) == "none":
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    with open(path, "rb") as f:
        index = read_index(path, f, max_raw)
        tensors = [torch.empty(t["shape"], dtype=t["dtype"]) for t in index["tensors"]]
        local = threading.local()

        def decompress(job: tuple[int, int]) -> None:
            i, j = job
            t, (raw, *lens) = index["tensors"][i], index["tensors"][i]["chunks"][j]
            data = memoryview(os.pread(f.fileno(), sum(lens), t["at"][j]))
            rows = _planes(tensors[i], t["group"] > 1)[t["lo"][j] : t["lo"][j] + raw // len(lens)]  # shares memory
            if not hasattr(local, "zd"):
                local.zd = zstandard.ZstdDecompressor()
            for b, (lo, hi) in enumerate(zip(accumulate(lens, initial=0), accumulate(lens))):
                try:
                    plane = local.zd.decompress(data[lo:hi], max_output_size=len(rows))
                    if len(plane) != len(rows):
                        raise ValueError(f"{len(plane)} bytes in a plane of {len(rows)}")
                    rows[:, b] = np.frombuffer(plane, np.uint8)
                except (zstandard.ZstdError, ValueError) as e:
                    raise CompressedFileError(f"{path.name} is corrupted (tensor {i}, chunk {j}: {e})") from None

        jobs = [(i, j) for i, t in enumerate(index["tensors"]) for j in range(len(t["chunks"]))]
        for _ in _ordered(decompress, jobs, threads or all_threads()):
            pass
    return _decode(index["tree"], tensors)
