"""Pretraining data: parquet shards with a `text` column in <base>/base_data.

Shards are named shard_00000.parquet, shard_00001.parquet, ...; the last one (in sorted order) is the
validation split and all others are training data. Two sources fill the directory:

* `--builtin`: the running interpreter's standard-library sources, so an offline machine can train with no
  download. The same interpreter and arguments always give byte-identical shards.
* `-n N`: shards 0..N-1 of FineWeb-edu (karpathy/fineweb-edu-100b-shuffle). The last one downloaded is the
  validation shard, so growing a download later from -n 8 to -n 16 turns old shard 7 into training data.

Every file is written under a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written shard_*.parquet behind.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import safefile
from nanochat.cli import ArgParser, run_main
from nanochat.common import get_base_dir

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{i:05d}.parquet"
MAX_SHARD = 1822  # FineWeb-edu shard indices run 0..MAX_SHARD
SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")
DOC_CHARS = 64 * 1024  # built-in corpus: longer source files are split into documents of about this size
CHUNK_BYTES = 1 << 20  # download read size
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}  # HTTP errors worth retrying; other 4xx are permanent


class DownloadError(RuntimeError):
    """A shard could not be fetched after all retries (or the server refused it outright)."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_index(path: Path) -> int:
    """The number in a shard's file name (shard_00007.parquet -> 7)."""
    match = SHARD_RE.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a shard file: expected a name like shard_00000.parquet")
    return int(match.group(1))


def data_dir(base: Path | None = None) -> Path:
    """Where the shards live: <base>/base_data, base defaulting to get_base_dir(). Not created here."""
    return (base if base is not None else get_base_dir()) / "base_data"


def list_shards(directory: Path | None = None) -> list[Path]:
    """All shard_NNNNN.parquet files in directory (default data_dir()), sorted; temp files never match."""
    directory = data_dir() if directory is None else directory
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if SHARD_RE.fullmatch(p.name) and p.is_file())


def train_val_shards(directory: Path | None = None) -> tuple[list[Path], Path]:
    """(training shards, validation shard): the last shard is validation, so at least two are needed."""
    directory = data_dir() if directory is None else directory
    shards = list_shards(directory)
    if len(shards) < 2:
        found = "no data shards" if not shards else "only 1 data shard (need 2: train + val)"
        raise FileNotFoundError(
            f"{found} in {directory}: run `python -m nanochat.dataset --builtin` (offline, built-in corpus) "
            "or `python -m nanochat.dataset -n 8` (FineWeb-edu)"
        )
    return shards[:-1], shards[-1]


def iter_texts(shards: list[Path], max_chars: int | None = None) -> Iterator[str]:
    """Documents of the given shards in order, one row group in memory at a time.

    With max_chars, stops once that many characters were yielded (the last document is cut to fit).
    """
    remaining = max_chars
    for path in shards:
        with pq.ParquetFile(path) as pf:
            if "text" not in pf.schema_arrow.names:
                raise ValueError(f"{path} has no `text` column: it is not a nanochat data shard, remove it")
            for rg in range(pf.num_row_groups):
                for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                    if remaining is not None:
                        if remaining <= 0:
                            return
                        text = text[:remaining]
                        remaining -= len(text)
                    yield text


# ---- built-in corpus ---------------------------------------------------------------------------------------


def _stdlib_sources() -> list[Path]:
    """Every .py file of the running interpreter's standard library, in a stable (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # third-party packages are not part of the stdlib and vary between machines: never include them
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _split_doc(text: str, limit: int = DOC_CHARS) -> list[str]:
    """Cut text at line boundaries into pieces of about `limit` characters (a single longer line stays whole)."""
    if len(text) <= limit:
        return [text]
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


def builtin_documents(seed: int = 0, max_docs: int | None = None) -> list[str]:
    """The built-in corpus as a list of documents, shuffled with `seed`; max_docs keeps a seeded subset."""
    docs = []
    for path in _stdlib_sources():
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # legacy encodings (a few test fixtures) and unreadable files are simply left out
        if text.strip():
            docs.extend(_split_doc(text))
    random.Random(seed).shuffle(docs)
    return docs if max_docs is None else docs[:max_docs]


def _write_atomic(table: pa.Table, dest: Path, docs_per_row_group: int) -> None:
    """Write table to a temp file next to dest, fsync it, and rename it into place (nanochat/safefile.py)."""
    write = lambda fh: pq.write_table(table, fh, row_group_size=docs_per_row_group, compression="zstd")  # noqa: E731
    safefile.write_atomic(dest, write)


def write_builtin_corpus(
    out_dir: Path,
    num_shards: int = 4,
    max_docs: int | None = None,
    seed: int = 0,
    docs_per_row_group: int = 64,
) -> list[Path]:
    """Write the built-in corpus into out_dir as num_shards contiguous slices; returns the shard paths."""
    if num_shards < 2:
        raise ValueError(f"num_shards must be at least 2 (train + val), got {num_shards}")
    if max_docs is not None and max_docs < num_shards:
        raise ValueError(f"max_docs must be at least num_shards ({num_shards}) so no shard is empty, got {max_docs}")
    if docs_per_row_group < 1:
        raise ValueError(f"docs_per_row_group must be at least 1, got {docs_per_row_group}")
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [p for p in list_shards(out_dir) if shard_index(p) >= num_shards]
    if extra:
        # leftover shards would silently become part of the data (and the last one the val split)
        raise ValueError(f"{out_dir} already holds {extra[-1].name}: delete {out_dir}/shard_*.parquet first")
    docs = builtin_documents(seed, max_docs)
    if len(docs) < num_shards:
        raise ValueError(f"the built-in corpus has only {len(docs)} documents, fewer than num_shards={num_shards}")
    paths = []
    for i in range(num_shards):
        # contiguous slices whose sizes differ by at most one document
        part = docs[i * len(docs) // num_shards : (i + 1) * len(docs) // num_shards]
        path = out_dir / shard_name(i)
        _write_atomic(pa.table({"text": pa.array(part, type=pa.string())}), path, docs_per_row_group)
        paths.append(path)
    return paths


# ---- download ----------------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path, timeout: float) -> int:
    """One attempt: stream url into a temp file next to dest, check it, rename it into place; returns bytes."""

    def stream(fh) -> int:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            size = 0
            while chunk := resp.read(CHUNK_BYTES):
                fh.write(chunk)
                size += len(chunk)
        # http.client does not always notice a connection closed early: check the length ourselves
        if expected is not None and size != int(expected):
            raise ConnectionError(f"truncated download of {url}: got {size} of {expected} bytes")
        return size

    def check(tmp: Path) -> None:
        try:
            pq.ParquetFile(tmp).close()  # reads the footer: catches HTML error pages and corrupt files
        except (pa.ArrowException, OSError) as err:
            raise ConnectionError(f"{url} did not return a valid parquet file ({err})") from err

    return safefile.write_atomic(dest, stream, check=check)


def _fetch_with_retries(url: str, dest: Path, retries: int, timeout: float, backoff: float) -> int:
    for attempt in range(retries + 1):
        try:
            return _fetch(url, dest, timeout)
        except urllib.error.HTTPError as err:
            if err.code not in RETRY_STATUS or attempt == retries:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
        except ValueError as err:  # malformed URL: retrying cannot help
            raise DownloadError(f"{url}: {err}") from err
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, truncation, bad parquet
            if attempt == retries:
                raise DownloadError(f"{url}: {err} (after {retries + 1} attempts)") from err
        time.sleep(min(backoff * 2**attempt, 60.0))
    raise AssertionError("unreachable")


def download_shards(
    num: int,
    out_dir: Path,
    url_pattern: str = FINEWEB_URL,
    retries: int = 5,
    workers: int = 4,
    timeout: float = 60,
    backoff: float = 1.0,
    verbose: bool = False,
) -> list[Path]:
    """Make sure shards 0..num-1 exist in out_dir, fetching missing ones in parallel; returns all num paths.

    url_pattern is formatted with i=<shard index>. Each missing shard gets 1 + retries attempts with exponential
    backoff (backoff, 2*backoff, ... seconds). Raises DownloadError on failure; finished shards are kept.
    """
    if not 1 <= num <= MAX_SHARD + 1:
        raise ValueError(f"number of shards must be between 1 and {MAX_SHARD + 1}, got {num}")
    if retries < 0 or workers < 1 or timeout <= 0:
        raise ValueError(f"need retries >= 0, workers >= 1, timeout > 0 (got {retries}, {workers}, {timeout})")
    try:
        probe = url_pattern.format(i=0) != url_pattern.format(i=1)
    except (KeyError, IndexError, ValueError):
        probe = False
    if not probe:
        raise ValueError(f"url pattern must contain {{i:05d}} for the shard index (and no other braces): {url_pattern}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / shard_name(i) for i in range(num)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]

    def job(i: int, path: Path) -> None:
        size = _fetch_with_retries(url_pattern.format(i=i), path, retries, timeout, backoff)
        if verbose:
            print(f"{path.name}: {size / 1e6:.1f} MB", flush=True)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(job, i, p) for i, p in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
    finally:
        # after a failure or Ctrl-C, start nothing new (shards in flight finish and clean up their temp files)
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise DownloadError(f"{errors[0]}: check the network / --url-pattern and rerun (finished shards are kept)")
    return paths


# ---- command line ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgParser(prog="python -m nanochat.dataset", description="Fetch or build the pretraining shards.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("-n", dest="num", type=int, metavar="N", help="download FineWeb-edu shards 0..N-1")
    mode.add_argument("--builtin", action="store_true", help="write the offline built-in corpus (stdlib sources)")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=5, help="extra attempts per shard, with exponential backoff")
    parser.add_argument("--url-pattern", default=FINEWEB_URL, help="download URL with {i:05d} for the shard index")
    parser.add_argument("--num-shards", type=int, default=4, help="--builtin: number of shards (last is val)")
    parser.add_argument("--max-docs", type=int, default=None, help="--builtin: keep a seeded subset of documents")
    parser.add_argument("--seed", type=int, default=0, help="--builtin: shuffle seed")
    args = parser.parse_args(argv)
    out = data_dir()
    t0 = time.time()
    if args.builtin:
        paths = write_builtin_corpus(out, args.num_shards, args.max_docs, args.seed)
        docs = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        size = sum(p.stat().st_size for p in paths)
        print(
            f"wrote {len(paths)} built-in shards ({docs:,} documents, {size / 1e6:.1f} MB) to {out} "
            f"in {time.time() - t0:.1f}s; the last one is the validation split"
        )
        return
    had = set(list_shards(out))
    paths = download_shards(args.num, out, args.url_pattern, args.retries, args.workers, verbose=True)
    new = [p for p in paths if p not in had]
    size = sum(p.stat().st_size for p in new)
    print(
        f"downloaded {len(new)} shards ({size / 1e6:.1f} MB) to {out} in {time.time() - t0:.1f}s; "
        f"{len(paths) - len(new)} were already there; the validation split is {list_shards(out)[-1].name}"
    )


if __name__ == "__main__":
    run_main(main, sys.argv[1:], expected=(ValueError, OSError, DownloadError))
