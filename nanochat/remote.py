"""Remote copies of checkpoints at any fsspec URL (s3://bucket/prefix, gs://..., file:///mnt/shared/...), so a run
outlives its machine. The local checkpoint dir stays the one the trainer writes and resumes from; this module
copies its committed checkpoints out, and back in on a machine that lacks them.

The remote holds the same files (names from nanochat/checkpoint/names.py) and the same commit rule: a checkpoint is
committed when its meta exists, so an upload sends the payload files first, the meta last, then latest_step.txt;
a deletion removes the meta first. An upload killed at any point leaves payload files without a meta: not a
checkpoint, overwritten by the next upload of that step, removed by pruning once a newer one is committed. A
download goes through temp files and is verified against the meta (sizes and xxh3 checksums) before it is
committed locally, meta last. What a meta may name is one rule (`vouched_files`, nanochat/checkpoint/verify.py): only
that step's own file names are ever fetched, written or deleted, and a download uses the very meta that was
checked (never a second read, which a tampered or changing bucket could answer differently).

`Remote` is a checkpoint storage (nanochat/checkpoint/storage.py): what is committed there is the package's one
resolver over it (`committed`, checking sizes: the checksums are checked at download), and what pruning deletes is
the package's one retention plan (`plan_prune`), as for a local dir.

A remote dir may hold checkpoints of several runs (a --resume=False start makes a new run id): only the run's
own lineage is restored or pruned; the others are left as they are.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import checkpoint, safefile
from nanochat.checkpoint import Checkpoint, CheckpointError, StorageError
from nanochat.config import ConfigError
from nanochat.redact import redact

EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
COPY_CHUNK = 1 << 23  # bytes per read of a download (s3fs and gcsfs fetch ranges of this size)
RETRY_CAP = 120.0  # longest wait between upload retries, in seconds
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}  # folders are implicit there


def open_remote(url: str) -> Remote:
    """The fsspec filesystem of `url`; a protocol whose package is missing is a one-line ConfigError naming it. The
    Remote keeps only the redacted URL (nanochat/redact.py): the credentials live in the filesystem object alone."""
    import fsspec

    protocol, shown = url.split("://", 1)[0] if "://" in url else "file", redact(url)
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError:
        package, extra = EXTRAS.get(protocol, (protocol, protocol))
        raise ConfigError(
            f"--remote_dir={shown}: {protocol}:// needs {package}: pip install 'nanochat-run[{extra}]'"
        ) from None
    except ValueError as e:
        raise ConfigError(f"--remote_dir={shown}: {redact(str(e))}") from None
    return Remote(fs, root.rstrip("/"), shown)


@dataclass
class Remote:
    fs: object  # an fsspec AbstractFileSystem
    root: str
    url: str  # for messages: the user info and secret query values redacted (nanochat/redact.py)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self, path: str) -> None:
        """Folders, where the filesystem has them. Never on an object store: there a folder is implicit, and
        s3fs's makedirs would create a missing bucket (a typo in the URL must be an error, not a new bucket)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if not OBJECT_STORES & set(protocols):
            self.fs.makedirs(path, exist_ok=True)

    def files(self) -> dict[int, dict[str, int]]:
        """{step: {file name: size}} of the checkpoint files there (anything else is ignored)."""
        try:
            self.fs.invalidate_cache(self.root)  # s3fs and gcsfs cache listings; another process may have written
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        found: dict[int, dict[str, int]] = {}
        for entry in listing:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if parsed := checkpoint.parse_name(name):
                found.setdefault(parsed[1], {})[name] = int(entry.get("size") or 0)
        return found

    @property
    def location(self) -> str:
        return self.url

    def listing(self) -> dict[int, dict[str, int]]:
        """The storage interface's listing (nanochat/checkpoint/storage.py): `files`."""
        return self.files()

    def meta(self, step: int) -> checkpoint.Meta:
        name = checkpoint.file_name("meta", step)
        return checkpoint.Meta.parse(json.loads(self.fs.cat_file(self.path(name))), f"{self.url}/{name}")

    def check(self, step: int, files: dict[str, int], verify: bool = False, load_check: bool = False) -> Checkpoint:
        """One step checked as far as a listing can: its meta, and the sizes it records. Checksums and the safe load
        need the bytes: `download` checks them before anything is committed locally (so `verify` and `load_check`
        change nothing here)."""
        meta_name = checkpoint.file_name("meta", step)
        ckpt = Checkpoint(step, [])
        if meta_name not in files:
            ckpt.problem = "no meta file (an interrupted upload, or an interrupted prune)"
            return ckpt
        ckpt.committed = True
        try:
            meta = self.meta(step)
            vouched = checkpoint.vouched_files(meta, step)
        except CheckpointError as e:  # a damaged or tampered meta (parse names the file)
            ckpt.problem = first_line(e)
            return ckpt
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            ckpt.problem = f"{meta_name} is unreadable ({type(e).__name__}: {first_line(e)})"
            return ckpt
        ckpt.meta = meta
        for name, want in vouched.items():
            if files.get(name) != want["size"]:
                ckpt.problem = f"{name} has {files.get(name, 'no')} bytes, meta says {want['size']}"
                break
        return ckpt

    def identity(self, step: int, files: dict[str, int]) -> None:
        """Never cached: a listing and a meta are cheap next to the verification a cache saves locally."""
        return None

    def remove(self, step: int, files: Iterable[str]) -> list[str]:
        names = sorted(files, key=lambda n: not n.startswith("meta"))
        for name in names:
            self.fs.rm_file(self.path(name))
        return names

    def committed(self, run_id: str | None = None, step: int | None = None) -> list[tuple[int, dict]]:
        """(step, meta) of the committed checkpoints whose files match their meta's sizes (see `check`), newest
        first; only those of `run_id`, or the one at `step`, when given: the one resolver over this storage."""
        ours = None if run_id is None else lambda c: c.meta.run_id == run_id
        return [(c.step, c.meta) for c in checkpoint.valid_newest_first(self, accept=ours, step=step)]

    def upload(self, local: Path, step: int, fault: Callable[[str], None] = lambda phase: None,
               progress: Callable[[int, int], None] = lambda sent, total: None) -> bool:  # fmt: skip
        """Copy the committed local checkpoint `step`: payload files, then the meta (the commit), then the marker.
        False if the remote already holds it (the same meta, committed). `progress(sent, total)`: bytes so far (as
        each file ends, and as a filesystem that reports its chunks sends them) and in all."""
        from fsspec.callbacks import Callback  # (fsspec is imported where a remote is used, like open_remote)

        meta_name = checkpoint.file_name("meta", step)
        meta_bytes = (local / meta_name).read_bytes()  # read first: a prune meanwhile must not leave us half-sent
        meta = checkpoint.Meta.parse(json.loads(meta_bytes), str(local / meta_name))
        if any(m == meta for _, m in self.committed(step=step)):
            return False
        self.makedirs(self.root)
        names = {kind: checkpoint.file_name(kind, step) for kind in checkpoint.KINDS}
        files = {kind: name for kind, name in names.items() if name in meta.files}  # (weights only: no optimizer)
        sizes = {kind: (local / name).stat().st_size for kind, name in files.items()}
        total, done = sum(sizes.values()) + len(meta_bytes), 0
        progress(0, total)
        for kind, name in files.items():
            # a filesystem that sends in chunks (s3fs, gcsfs) reports each through the callback's hook
            sending = Callback(hooks={"sent": lambda _, value, at=done, **kw: progress(at + int(value or 0), total)})
            self.fs.put_file(str(local / name), self.path(name), callback=sending)
            done += sizes[kind]
            progress(done, total)
            fault(kind)
        fault("meta")
        self.fs.pipe_file(self.path(meta_name), meta_bytes)
        progress(total, total)
        self.fs.pipe_file(self.path(checkpoint.LATEST), f"{step}\n".encode())
        return True

    def download(
        self, step: int, local: Path, meta: checkpoint.Meta | dict, warn: Callable[[str], None] = print
    ) -> checkpoint.Checkpoint:
        """Fetch `step` into the local dir as `meta` (the one `committed` checked: never read again) vouches for it:
        through temp files, each fully verified (size, checksum, safe load) before anything is committed, then the
        files, the meta last, and the marker. A committed local copy of that step is set aside first (see
        `checkpoint.set_aside`). Raises CheckpointError if it does not verify; on any failure nothing of it is
        left behind."""
        try:
            meta = meta if isinstance(meta, checkpoint.Meta) else checkpoint.Meta.parse(meta)
            files = checkpoint.vouched_files(meta, step)
        except (ValueError, KeyError, TypeError, AttributeError, CheckpointError) as e:
            raise CheckpointError(f"{self.url}: the meta of step {step} is not valid ({e})") from None
        checkpoint.make_dir(local)
        fetched, placed = {}, []
        try:
            for name, want in files.items():
                tmp = local / f"{checkpoint.TMP_PREFIX}{name}.download"
                tmp.unlink(missing_ok=True)  # debris of an earlier try (a link planted there: never followed)
                with open(safefile.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as out:
                    fetched[name] = tmp
                    with self.fs.open(self.path(name), "rb", block_size=COPY_CHUNK) as src:
                        shutil.copyfileobj(src, out, COPY_CHUNK)
                if problem := checkpoint.check_file(tmp, want, load_check=True):
                    raise CheckpointError(f"{self.url}/{name}: {problem}")
            checkpoint.set_aside(local, step, warn)
            for name, tmp in fetched.items():
                placed.append(local / name)
                tmp.rename(local / name)
            placed.append(local / checkpoint.file_name("meta", step))
            checkpoint.write_text_atomic(placed[-1], json.dumps(meta.to_dict(), indent=1))
            ckpt = checkpoint.inspect(local, step, verify=False)  # as committed (its bytes were verified above)
            if not ckpt.valid:
                raise CheckpointError(f"{local}: step {step} does not verify once committed: {ckpt.problem}")
            checkpoint.mark_latest(local, step)  # last: a failure before leaves the marker as it was
        except BaseException:
            for path in reversed(placed):  # the meta first: never a committed checkpoint without its files
                path.unlink(missing_ok=True)
            raise
        finally:
            for tmp in fetched.values():
                tmp.unlink(missing_ok=True)
        return ckpt

    def plan_prune(self, keep: int, run_id: str | None, keep_every: int = 0) -> dict[int, list[str]]:
        """What `prune` would delete, {step: file names}: the one retention plan (`checkpoint.plan`) over the
        run's checkpoints here (another run's are neither kept nor deleted), keep=-1 included (it still drops
        payload files left without a meta below the newest committed step)."""
        found = [c for c in checkpoint.checked_newest_first(self)
                 if not c.valid or run_id is None or c.meta.run_id == run_id]  # fmt: skip
        listing = self.files()  # as it is now: a step gone meanwhile is not deleted again
        return {c.step: sorted(listing[c.step]) for c in checkpoint.plan(found, keep, keep_every) if c.step in listing}

    def prune(self, keep: int, run_id: str | None, keep_every: int = 0) -> list[int]:
        """Delete what plan_prune names, the meta of each first. Returns the deleted steps."""
        doomed = self.plan_prune(keep, run_id, keep_every)
        for step, names in doomed.items():
            self.remove(step, names)
        return list(doomed)


def restore_if_newer(
    remote: Remote, local: Path, warn: Callable[[str], None], log: Callable[[str], None], cache: dict | None = None
) -> None:
    """Rank 0 at start: if the remote holds a checkpoint of this dir's lineage (any, when the dir has none yet)
    newer than the newest valid local one, download it. One that fails verification is skipped with a warning and
    the next older one is tried. `cache`: the trainer's (`checkpoint.valid_newest_first`), so that the local
    checkpoint it verifies here is not read again when the trainer looks for its resume point."""
    point = checkpoint.find_latest_valid(local, lambda msg: None, cache=cache) if local.is_dir() else None
    lineage = checkpoint.run_id(local, point)
    have = point.step if point else -1
    try:
        candidates = remote.committed(lineage)
    except Exception as e:  # noqa: BLE001 - unreachable, no credentials: train from what is here
        warn(f"cannot read the remote {remote.url} ({type(e).__name__}: {first_line(e)}); resuming from local files")
        return
    for step, meta in candidates:
        if step <= have:
            return
        try:
            log(f"the remote {remote.url} has step {step}, newer than the local {have if have >= 0 else 'nothing'}:"
                " downloading it")  # fmt: skip
            t0 = time.perf_counter()
            remote.download(step, local, meta, warn)
            if lineage is None and meta.run_id:
                checkpoint.write_text_atomic(local / checkpoint.RUN_ID, meta.run_id + "\n")
            log(f"downloaded step {step} in {time.perf_counter() - t0:.1f}s")
            return
        except Exception as e:  # noqa: BLE001 - a bad copy, or the storage failing: try the next older one
            warn(f"skipping the remote checkpoint at step {step}: {type(e).__name__}: {first_line(e)}")


def pull(url: str, step: int | None, to: Path) -> checkpoint.Checkpoint:
    """`nanochat-run pull`: the remote checkpoint at `step` (default: the newest committed) into `to`, verified.
    A checkpoint that fails verification is refused (CheckpointError) and leaves nothing behind."""
    remote = check_remote(url)
    committed = remote.committed()
    if not committed:
        raise CheckpointError(f"{remote.url} holds no committed checkpoint")
    steps = [s for s, _ in committed]
    if step is not None and step not in steps:
        raise CheckpointError(
            f"{remote.url} has no committed checkpoint at step {step} (it has {', '.join(map(str, sorted(steps)))})"
        )
    step, meta = committed[0] if step is None else (step, dict(committed)[step])
    if (to / checkpoint.file_name("meta", step)).exists():
        raise CheckpointError(f"{to} already holds step {step}: pick another --to")
    made = not to.exists()
    try:
        return remote.download(step, to, meta)
    except BaseException:
        if made and to.is_dir() and not any(to.iterdir()):
            to.rmdir()
        raise


def push(local: Path, url: str, log: Callable[[str], None] = print) -> list[int]:
    """`nanochat-run push`: upload every valid local checkpoint the remote lacks, oldest first. Returns the steps
    sent. Nothing remote is deleted."""
    remote = check_remote(url)
    have = {s: m for s, m in remote.committed()}
    sent = []
    for ckpt in sorted(checkpoint.valid_newest_first(local, warn=log), key=lambda c: c.step):
        if have.get(ckpt.step) == ckpt.meta:
            continue
        t0 = time.perf_counter()
        remote.upload(local, ckpt.step)
        log(f"uploaded step {ckpt.step} to {remote.url} in {time.perf_counter() - t0:.1f}s")
        sent.append(ckpt.step)
    return sent


def lag(local: Path, url: str) -> dict:
    """For `nanochat-run status --remote-dir`: the remote's newest committed step of this dir's lineage and how
    many local valid checkpoints are newer (not copied yet)."""
    point = checkpoint.find_latest_valid(local, warn=lambda msg: None, load_check=False) if local.is_dir() else None
    lineage = checkpoint.run_id(local, point)
    remote = check_remote(url)
    committed = remote.committed(lineage)
    newest = committed[0][0] if committed else None
    local_steps = [c.step for c in checkpoint.scan(local) if c.valid] if local.is_dir() else []
    return {"url": remote.url, "remote_step": newest, "remote_steps": sorted(s for s, _ in committed),
            "behind": sum(1 for s in local_steps if newest is None or s > newest)}  # fmt: skip


def copy_tree(local: Path, url: str, skip: Callable[[Path], bool] = lambda path: False) -> int:
    """Copy every file under `local` (logs, reports: not checkpoints) to the same relative paths under `url`,
    overwriting; returns how many were sent."""
    remote = check_remote(url)
    sent = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file() and not skip(p)):
        target = remote.path(path.relative_to(local).as_posix())
        remote.makedirs(target.rsplit("/", 1)[0])
        remote.fs.put_file(str(path), target)
        sent += 1
    return sent


def first_line(e: BaseException) -> str:
    """An error's first line for a message, any URL in it redacted (a storage error may quote the URL it used)."""
    text = redact(str(e)).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@dataclass
class Uploader:
    """Copies committed checkpoints to the remote in a background thread (rank 0). `offer(step)` after each
    commit; the newest offered step wins (an older one still waiting is skipped). Failures warn once per kind of
    error and retry with backoff; the training loop never waits, except `flush` at the end or on a signal."""

    remote: Remote
    local: Path
    keep: int
    warn: Callable[[str], None] = print
    log: Callable[[str], None] = print
    fault: Callable[[str], None] = field(default=lambda phase: None)
    run_id: str | None = None
    keep_every: int = 0  # remote retention also keeps every checkpoint whose step is a multiple of this
    uploaded: int | None = None  # the newest step committed remotely by this run
    offered: int | None = None  # the newest step offered
    error: str = ""  # the last failure, until an upload succeeds
    sending: tuple[int, int, int] | None = None  # the upload in progress: (step, bytes sent, bytes in all)
    sent: tuple[int, float] | None = None  # the last upload that sent a checkpoint: (bytes, seconds)
    _want: int | None = field(default=None, init=False, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def offer(self, step: int) -> None:
        with self._cond:
            self._want = self.offered = step
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckpt-uploader", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def status(self) -> dict:
        """For the heartbeat and `status`: how far the remote lags, and what the last upload sent in how long (the
        supervisor's hang deadline for the final upload follows it: supervisor/pace.py)."""
        sent_bytes, seconds = self.sent or (None, None)
        return {"remote_step": self.uploaded, "remote_error": self.error or None,
                "remote_behind": self.offered is not None and self.uploaded != self.offered,
                "remote_sent_bytes": sent_bytes, "remote_sent_seconds": seconds}  # fmt: skip

    def progress(self) -> dict:
        """For the heartbeat while the trainer waits for its last upload (`flush`): the step it waits for and the
        bytes of the upload in progress sent so far, and in all."""
        step, sent, total = self.sending or (self.offered, None, None)
        return {"uploading": step, "upload_sent": sent, "upload_bytes": total}

    def flush(self, timeout: float, waiting: Callable[[], None] = lambda: None) -> bool:
        """Wait up to `timeout` seconds until the newest offered step is uploaded; False if it is not. `waiting` is
        called about every second meanwhile (the trainer beats the upload's progress)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with self._cond:
                if self.offered is None or self.uploaded == self.offered:
                    return True
            waiting()  # (outside the lock: the uploader thread takes it to say an upload is done)
            with self._cond:
                if self.offered is not None and self.uploaded != self.offered:
                    self._cond.wait(min(left, 1.0))
        with self._cond:
            return self.offered is None or self.uploaded == self.offered

    def _sending(self, step: int, done: int, total: int) -> None:
        self.sending = (step, done, total)  # one tuple: the reading thread sees all three of one moment

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        delay, warned = 1.0, ""
        while True:
            with self._cond:
                while self._want is None and not self._closed:
                    self._cond.wait()
                if self._want is None:
                    return
                step, self._want = self._want, None
            try:
                t0 = time.perf_counter()
                sent = self.remote.upload(self.local, step, self.fault, functools.partial(self._sending, step))
                if sent and self.sending is not None:
                    self.sent = (self.sending[2], time.perf_counter() - t0)
                self.sending = None
                pruned = self.remote.prune(self.keep, self.run_id, self.keep_every)
                if sent:  # said before `flush` returns: the process may exit right after it
                    self.log(f"uploaded step {step} to {self.remote.url} in {time.perf_counter() - t0:.1f}s"
                             + (f" (pruned remote steps {pruned})" if pruned else ""))  # fmt: skip
                if warned:
                    self.log(f"the remote {self.remote.url} works again")
                    warned = ""
                with self._cond:
                    self.uploaded, self.error, delay = step, "", 1.0
                    self._cond.notify_all()
            except Exception as e:  # noqa: BLE001 - network, credentials, throttling, a full or missing bucket: retry
                if isinstance(e, FileNotFoundError) and not (self.local / checkpoint.file_name("meta", step)).exists():
                    self.error = f"step {step} was pruned locally before its upload ({first_line(e)})"
                    continue  # a newer step is on its way
                self.error = f"{type(e).__name__}: {first_line(e)}"
                kind = type(e).__name__
                if kind != warned:  # one warning per kind of failure, not one per retry
                    self.warn(f"uploading step {step} to {self.remote.url} failed ({self.error}); retrying in the"
                              " background, training goes on")  # fmt: skip
                    warned = kind
                with self._cond:
                    if self._want is None:
                        self._want = step  # try this one again, unless a newer one came meanwhile
                    self._cond.wait(delay)
                delay = min(2 * delay, RETRY_CAP)


def check_remote(url: str) -> Remote:
    """A remote URL from the settings, opened (a missing filesystem package is a ConfigError)."""
    if not re.match(r"^[a-z][a-z0-9+.-]*://", url):
        raise ConfigError(f"--remote_dir={url!r} is not a URL: write s3://bucket/prefix, gs://..., file:///path")
    return open_remote(url)


__all__ = ["Remote", "Uploader", "open_remote", "check_remote", "restore_if_newer", "StorageError"]
