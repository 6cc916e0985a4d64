"""Saving from the trainer: every rank calls `Saver.save` at the same step; rank 0 writes, in the background
(and every node's local rank 0, each into its own node's dir, when the nodes share no disk: nanochat/node_dirs.py).
In-memory snapshots are per machine: every machine's local rank 0 writes its own.

What is saved and how a checkpoint is committed is the business of nanochat/checkpoint/ (commit.py); this module
decides when and where to write, and keeps the training loop from waiting:

- A background save blocks the caller only while the state is copied into CPU buffers that are allocated once
  and reused (pinned on CUDA). One writer thread then serialises, checksums, fsyncs, commits the meta, moves
  latest_step.txt and prunes. At most one save is in flight; the next one first waits for it (and logs how long).
- Final saves and saves on a signal are written before `save` returns.
- A save can also go to an in-memory snapshot slot (shared memory, see nanochat/checkpoint/snapshots.py), alone or
  before the disk checkpoint of the same step. `settle()` waits until the snapshot in flight is committed; the
  trainer calls it before it reports the next step done, so a run that dies at any moment loses at most
  `snapshot_every` steps, even while a long disk write is still going on.
- A failed snapshot (shared memory full, say) only warns and turns snapshots off. A failed disk save is raised on
  every rank as a StorageError (by the next `save` or `finish` when it ran in the background) with a one-line
  message, unless a later final or signal save succeeded: then a newer checkpoint is durable, and the failure is
  only a warning (also recorded in that checkpoint's meta).
- `start` takes the checkpoint dir's trainer lock (nanochat/locks.py) for the life of the process, so no second
  writer can start while this one lives, and only then removes temp files of crashed saves.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import checkpoint
from nanochat.checkpoint import CheckpointError, Meta, StorageError, snapshots
from nanochat.common import gather
from nanochat.locks import DirLock


@dataclass
class SaveRecord:
    """Timings of one save on a writer (time.perf_counter() seconds), for logs and benchmarks."""

    step: int
    disk: bool
    memory: bool
    started: float
    blocked: float = 0.0  # how long `save` kept the caller
    in_memory_at: float | None = None  # the snapshot was committed
    durable_at: float | None = None  # the disk checkpoint was committed, marked latest and pruning was done


@dataclass
class Saver:
    """Saves checkpoints from every rank of a run (collective: all ranks call `save` at the same step)."""

    directory: Path
    keep: int = 3
    keep_full: int = -1  # checkpoints that keep their optimizer state (the newest ones); -1: all (checkpoint.slim)
    writer: bool = True  # this rank writes: rank 0 (and each node's local rank 0 with a dir per node)
    snapshotter: bool = True  # this rank writes in-memory snapshots: each machine's local rank 0 (they are per machine)
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)
    fault: Callable[[str], None] = field(default=lambda phase: None)  # debug fault injection, by save phase
    warn: Callable[[str], None] = print
    log: Callable[[str], None] = print
    async_save: bool = False
    run_id: str | None = None  # the lineage whose snapshots this run may reuse (set by the trainer after start)
    lock_wait: float = 60.0  # seconds to wait for a previous trainer still saving into the directory
    snapshots_off: bool = False  # set on a writer after a snapshot failed
    on_durable: Callable[[int], None] | None = None  # told each step whose disk checkpoint is committed (uploads)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: off; checkpoint.kept_forever)
    codec: str = "none"  # the disk checkpoints' payload compression (nanochat/compress.py); snapshots never
    codec_threads: int = 1
    warnings: list[str] = field(default_factory=list)  # earlier failures a later save made harmless
    records: list[SaveRecord] = field(default_factory=list)  # a writer's saves, oldest first
    _writer: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _pending: Future | None = field(default=None, init=False, repr=False)  # the write in flight
    _in_memory: threading.Event | None = field(default=None, init=False, repr=False)  # its snapshot committed
    _error: BaseException | None = field(default=None, init=False, repr=False)
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _stream: torch.cuda.Stream | None = field(default=None, init=False, repr=False)  # side stream for the copies
    _lock: DirLock | None = field(default=None, init=False, repr=False)
    verified: dict = field(default_factory=dict, init=False, repr=False)  # checkpoints verified once (start, pruning)

    def start(self) -> None:
        """A writer, before anything reads or writes the directory: create it durably, take the trainer lock (waiting
        for a previous trainer to finish its save), then remove temp debris of crashed saves. Collective."""
        error = None
        if self.writer:
            try:
                checkpoint.make_dir(self.directory)
                self._lock = DirLock(self.directory, "trainer")
                wait = lambda h: self.log(f"waiting up to {self.lock_wait:g}s for pid {h.get('pid')} (a trainer still"  # noqa: E731
                                          f" running) to release {self.directory}")  # fmt: skip
                self._lock.acquire(self.lock_wait, wait)  # a stale lock (a crashed trainer) is simply taken over
                removed, kept = checkpoint.clean_temp(self.directory)
                for p in removed:
                    self.warn(f"removed {p.name}, left by a save that crashed")
                for p in kept:
                    self.warn(f"kept {p.name}: its writer is still alive")
            except OSError as e:
                error = StorageError(f"cannot use {self.directory} ({e.strerror or e}); fix it or set --checkpoint_dir")
            except CheckpointError as e:
                error = e
        self._raise_if_any_failed(None, error, "preparing")

    def save(
        self,
        step: int,
        model_state: dict,
        optim_state: dict,
        meta: Meta | dict,
        rank_state: dict,
        wait: bool = True,
        disk: bool = True,
        memory: bool = False,
    ) -> None:
        """Save `step` to disk and/or to an in-memory snapshot; `rank_state` (loader position, RNG) is gathered
        from every rank. With `async_save` and `wait=False` the writing happens in the background. `meta` is the
        writer's record (nanochat/counters.py; a dict is parsed first); the saver adds the ranks and its warnings."""
        if not isinstance(meta, Meta):
            meta = Meta.parse(meta, "the meta to save", committed=False)
        per_rank = [rank_state]
        if self.world_size > 1:
            gathered = gather(self.world_size, (rank_state, meta if dist.get_rank() == 0 else None))
            per_rank, meta = [r for r, _ in gathered], gathered[0][1]  # rank 0's record, in every node's copy
        error = None
        disk, memory = disk and self.writer, memory and self.snapshotter
        if self.writer or self.snapshotter:
            try:
                try:
                    self._join()
                except Exception as e:  # noqa: BLE001 - the previous background write failed
                    if not (wait and disk):
                        raise
                    # a final or signal save is still written; if it succeeds, a newer checkpoint is durable and the
                    # earlier failure is only a warning, recorded in the new meta
                    self.warnings.append(f"an earlier background save failed: {e}")
                    self.warn(f"{self.warnings[-1]}; saving step {step} anyway")
                memory = memory and not self.snapshots_off
                if self.warnings:
                    meta = replace(meta, warnings=list(self.warnings))
                if disk or memory:
                    self._save_here(step, model_state, optim_state, replace(meta, ranks=per_rank), wait, disk, memory)
            except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it (or they hang)
                error = e
        self._raise_if_any_failed(step, error)

    def settle(self) -> None:
        """Wait until the snapshot in flight, if any, is committed (a writer; a no-op elsewhere)."""
        if self._in_memory is None:
            return
        t0 = time.perf_counter()
        self._in_memory.wait()
        self._in_memory = None
        if (waited := time.perf_counter() - t0) > 0.1:
            self.log(f"waited {waited:.2f}s for the in-memory snapshot to be committed")

    @property
    def durable(self) -> int | None:
        """The newest step whose disk checkpoint is committed by this run (a writer; None elsewhere)."""
        return max((r.step for r in self.records if r.durable_at is not None), default=None)

    def busy(self) -> bool:
        """A background write is still in flight (a writer)."""
        return self._pending is not None and not self._pending.done()

    def finish(self) -> None:
        """Wait for the save in flight (if any) to be durable; collective, like `save`."""
        error = None
        if self.writer or self.snapshotter:
            try:
                self._join(shutdown=True)
            except Exception as e:  # noqa: BLE001 - see save
                error = e
        self._raise_if_any_failed(None, error)

    # ---- a writer --------------------------------------------------------------------------------------------

    def _save_here(self, step, model_state, optim_state, meta, wait, disk, memory) -> None:
        rec = SaveRecord(step, disk, memory, time.perf_counter())
        self.records.append(rec)
        slot = None
        if memory:
            try:
                slot = self._older_slot()
            except (OSError, CheckpointError) as e:
                self._snapshot_failed(e)
        if self.async_save and not wait:
            model_state, optim_state, copied = self._stage_all(model_state, optim_state)
            if self._writer is None:  # one long-lived writer thread, shut down by finish()
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
            self._in_memory = threading.Event() if slot else None
            self._pending = self._writer.submit(
                self._write_in_background, rec, slot, model_state, optim_state, meta, self._in_memory, copied
            )
            if copied is not None:
                # The training stream waits for these copies before its next kernel, and the loop synchronizes
                # at the start of every step, so returning before they land saves no time: it only hid the copy
                # from `blocked` (the log line, --save_every=auto's cost), which then read ~0 on CUDA.
                copied.synchronize()
        else:
            self._write(rec, slot, model_state, optim_state, meta)
        rec.blocked = time.perf_counter() - rec.started

    def _write(self, rec: SaveRecord, slot: Path | None, model_state, optim_state, meta, in_memory=None) -> None:
        """The snapshot first (it is quick and the trainer may be waiting for it), then the disk checkpoint."""
        if slot is not None:
            try:
                snapshots.prepare_slot(slot, self.directory)
                self.ensure_space(slot, model_state, optim_state)
                snap_meta = replace(meta, snapshot=True, final=False, checkpoint_dir=str(self.directory))
                fault = lambda phase: self.fault("snapshot") if phase == "model" else None  # noqa: E731
                checkpoint.write(slot, rec.step, model_state, optim_state, snap_meta, fault, private=True)
                rec.in_memory_at = time.perf_counter()
            except (OSError, CheckpointError) as e:
                self._snapshot_failed(e)
            finally:
                if in_memory is not None:
                    in_memory.set()
        if not rec.disk:
            return
        d = self.directory
        checkpoint.make_dir(d)
        checkpoint.set_aside(d, rec.step, self.warn)
        self.ensure_space(d, model_state, optim_state)
        checkpoint.write(d, rec.step, model_state, optim_state, meta, self.fault, codec=self.codec,
                         threads=self.codec_threads)  # fmt: skip
        self.fault("latest")
        checkpoint.mark_latest(d, rec.step)
        pruned = checkpoint.prune(d, self.keep, self.fault, self.verified, self.keep_every)
        if pruned:
            self.log(f"pruned {len(pruned)} old checkpoint files ({', '.join(p.name for p in pruned[:3])}...)")
        checkpoint.slim(d, self.keep_full, self.verified)
        rec.durable_at = time.perf_counter()
        if self.on_durable is not None:
            self.on_durable(rec.step)

    def _write_in_background(self, rec, slot, model_state, optim_state, meta, in_memory, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies on the side stream have landed
            self._write(rec, slot, model_state, optim_state, meta, in_memory)
        except CheckpointError as e:
            self._error = e
        except OSError as e:  # surfaces only at the next save: say which step failed
            self._error = StorageError(
                f"saving step {rec.step} to {self.directory} failed ({e.strerror or e}); earlier checkpoints are"
                " intact: free disk space or fix the directory, then resume"
            )
        except Exception as e:  # noqa: BLE001 - re-raised in the training thread by the next save or finish
            self._error = e
        finally:
            if in_memory is not None:  # whatever happened, settle() must not wait forever
                in_memory.set()

    def _join(self, shutdown: bool = False) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            self._pending.result()
            self._pending = self._in_memory = None
            if (waited := time.perf_counter() - t0) > 0.1:
                self.log(f"waited {waited:.2f}s for the previous checkpoint write to finish")
        if shutdown and self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _stage_all(self, model_state: dict, optim_state: dict):
        """Copy both states into the reused CPU buffers: (model, optim, CUDA event marking the end of the copies).

        On CUDA the copies go into pinned buffers on a side stream and this returns without waiting for them (the
        caller, `_save_here`, then does); the training stream waits for the side stream before its next kernel
        (which may update the weights)."""
        on_gpu = [t for t in tensors(model_state) + tensors(optim_state) if t.is_cuda]
        if not on_gpu:
            return self._stage(model_state, "model"), self._stage(optim_state, "optim"), None
        main = torch.cuda.current_stream(on_gpu[0].device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(on_gpu[0].device)
        self._stream.wait_stream(main)  # copy the weights as they are after this step's update
        with torch.cuda.stream(self._stream):
            staged = self._stage(model_state, "model"), self._stage(optim_state, "optim")
            for t in on_gpu:
                t.record_stream(self._stream)  # their memory must not be reused before the copies are done
            copied = torch.cuda.Event()
            copied.record(self._stream)
        main.wait_stream(self._stream)
        return staged[0], staged[1], copied

    def _stage(self, obj, key: str):
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self._buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self._stage(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._stage(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj

    def _snapshot_failed(self, error: BaseException) -> None:
        self.snapshots_off = True
        self.warn(f"in-memory snapshot failed ({error}); snapshots are off for this run, checkpoints go on")

    def _older_slot(self) -> Path:
        """The snapshot slot not holding the newest snapshot (the writer empties it first)."""
        newest = snapshots.newest(self.directory, self.run_id, verify=False)
        return next(p for p in snapshots.slots(self.directory) if newest is None or p != newest[0])

    def ensure_space(self, d: Path, model_state: dict, optim_state: dict) -> None:
        """Before a save into the checkpoint dir `d`: prune early if that makes room for these states, and raise
        StorageError naming what to free if they still do not fit (a snapshot slot `d` is left to its writer)."""
        need = int(1.05 * (_nbytes(model_state) + _nbytes(optim_state))) + (1 << 20)
        if d == self.directory:
            for path in checkpoint.make_room(d, self.keep, need, self.verified, self.keep_every):
                self.warn(f"low disk space: pruned {path.name} early")
        free = shutil.disk_usage(d).free
        if free < need and d == self.directory:
            raise StorageError(
                f"not enough disk space in {d} for the next checkpoint: need ~{_human(need)}, {_human(free)} free;"
                " free space, lower --keep_last_n_checkpoints, or set --checkpoint_dir"
            )
        if free < need:
            raise CheckpointError(
                f"not enough shared memory in {d.parent} for a snapshot: need ~{_human(need)}, {_human(free)} free;"
                " enlarge /dev/shm, point NANOCHAT_SHM_DIR elsewhere, or set --snapshot_every=0"
            )

    # ---- all ranks -------------------------------------------------------------------------------------------

    def _raise_if_any_failed(self, step: int | None, error: BaseException | None, doing: str = "saving") -> None:
        """Collective: every rank raises if a writer failed, with the same kind of error (so the same exit status):
        a CheckpointError the user must fix (e.g. the directory is locked), or a StorageError worth a restart."""
        refused = isinstance(error, CheckpointError) and not isinstance(error, StorageError)
        kind = self._agree(2 if refused else int(error is not None))
        if not kind:
            return
        at = f"step {step}" if step is not None else "the last step"
        if error is None:
            what = f"saving the checkpoint at {at}" if doing == "saving" else f"{doing} {self.directory}"
            raise (CheckpointError if kind == 2 else StorageError)(f"another rank failed {what}; see its log")
        if not isinstance(error, OSError):
            raise error
        raise StorageError(
            f"saving {at} to {self.directory} failed ({error.strerror or error}); earlier checkpoints"
            " are intact: free disk space or fix the directory, then resume"
        ) from error

    def _agree(self, code: int) -> int:
        """The worst failure code of all ranks (a plain barrier would hang the others forever on a failure)."""
        if self.world_size == 1:
            return code
        flag = torch.tensor([code], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _human(nbytes: int) -> str:
    """GB, or MB below 1 GB: small runs must not read "need ~0.00 GB, 0.00 GB free"."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested dicts/lists) state, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors(v)]
    return []


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(obj))
