"""What every training phase shares around its loop (nanochat/phase.py): where a run starts (resume point and
lineage, decided by rank 0 holding the directory), the stop flag that turns SIGINT and SIGTERM into "save after this
step", the save schedule (what each step owes; with --save_every=auto, the Young/Daly interval from the measured
cost of a save), the heartbeat the supervisor watches, RNG state for exact resume, the replica check, the GPU's peak
for MFU, and the exit statuses.
"""

from __future__ import annotations

import base64
import contextlib
import faulthandler
import json
import math
import os
import signal
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from nanochat import checkpoint, metrics, safefile
from nanochat.checkpoint import CheckpointError, StorageError, snapshots
from nanochat.common import (
    EXIT_DIVERGED,
    EXIT_REFUSED,
    EXIT_STORAGE,
    DistInfo,
    cleanup_distributed,
    gather,
    print0,
    warn0,
)
from nanochat.config import ConfigError, HelpRequested
from nanochat.guard import Diverged


def find_start(
    ckpt_dir: Path, resume: bool, dist_info: DistInfo, machines: int = 1, cache: dict | None = None
) -> tuple[tuple[Path, checkpoint.Checkpoint] | None, str]:
    """Where this run starts: (where this rank reads the checkpoint to resume from, and it; or None), and the run id
    of the lineage. Rank 0 decides, holding the trainer lock, and tells the others (its failure too, so that no rank
    waits for it forever). A fresh start (--resume=False) archives the old checkpoints. On several machines, an
    in-memory snapshot counts only if every machine holds it (each in its own shared memory); else the newest
    checkpoint on disk. `cache`: verified checkpoints (`checkpoint.valid_newest_first`), shared with what verified
    them before (a dir per node: `node_dirs.before_start`) and after (the saver's pruning)."""
    found: list = [None, None, None, False]
    if dist_info.master:
        try:
            point = None
            if not resume and (archived := checkpoint.archive(ckpt_dir)):
                print0(f"--resume=False: starting fresh; moved the old checkpoints to {archived} (nothing deleted)")
                metrics.archive(ckpt_dir, archived)
            if resume:
                point = checkpoint.find_resume_point(ckpt_dir, warn0, cache=cache)
            run_id = checkpoint.start_lineage(ckpt_dir, point[1] if point else None)
            if point is None:
                print0(f"no checkpoint to resume from in {ckpt_dir}: starting from scratch (run id {run_id})")
            found = [point, run_id, None, point is not None and point[0] != ckpt_dir]
        except OSError as e:
            found[2] = StorageError(f"reading {ckpt_dir} failed ({e.strerror or e}); check the storage, then resume")
        except CheckpointError as e:
            found[2] = e
    if dist_info.is_distributed:
        dist.broadcast_object_list(found, src=0)  # rank 0 verified the files; everyone loads the same step
    if found[2] is not None:
        raise found[2]
    point, run_id, in_memory = found[0], found[1], found[3]
    with contextlib.suppress(OSError):  # a cleanup: never a reason for one rank to fail alone
        if dist_info.local_rank == 0 and snapshots.drop_other_runs(ckpt_dir, run_id):
            print("dropped in-memory snapshots left by an earlier run of this checkpoint dir", flush=True)
    if point is None or not in_memory:  # (a dir per node: each node reads its own copy, at its own path)
        return (None if point is None else (ckpt_dir, point[1])), run_id
    if machines == 1:
        return point, run_id  # rank 0's slot, on this very machine
    # each machine's local rank 0 verifies its own slots; the other ranks of the machine read the slot it found
    slot = snapshots.holding(ckpt_dir, run_id, point[1].step) if dist_info.local_rank == 0 else None
    held = gather(dist_info.world_size, None if slot is None else str(slot))
    firsts = held[:: dist_info.world_size // machines]  # torchrun numbers each machine's ranks contiguously
    if all(firsts):
        return (Path(held[dist_info.rank - dist_info.local_rank]), point[1]), run_id
    if dist_info.local_rank == 0:  # a snapshot left now would be ambiguous next time (two of one step)
        snapshots.remove(ckpt_dir)
    found = [None, None]
    if dist_info.master:  # some machine lacks the snapshot (its memory was lost, or its snapshots failed)
        print0(f"the snapshot at step {point[1].step} is not on every machine: resuming from disk instead")
        try:
            found[0] = checkpoint.find_latest_valid(ckpt_dir, warn0, cache=cache)
        except OSError as e:
            found[1] = StorageError(f"reading {ckpt_dir} failed ({e.strerror or e}); check the storage, then resume")
    dist.broadcast_object_list(found, src=0)
    if found[1] is not None:
        raise found[1]
    return (None if found[0] is None else (ckpt_dir, found[0])), run_id


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of the GPU, for MFU; None where we do not know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def record_error(e: BaseException) -> None:
    """Write a refusal or storage error into torchrun's per-rank error file, like @record does for a crash, so the
    supervisor reads the cause from the same place (best effort: on a full disk it cannot be written)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(Exception):
            ErrorHandler().record_exception(e)


class StopFlag:
    """SIGINT/SIGTERM set it; the loop agrees on it across ranks once per step and saves before exiting.

    The handler only records the signal: printing from a signal handler can re-enter a write that the signal
    interrupted (a blocked stdout), so the loop reports it."""

    def __init__(self) -> None:
        self.signum, self.count, self.reported = 0, 0, False
        self.decided = 0  # the signal the ranks last agreed on (any rank's), which decides every rank's exit
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # SIGUSR1: dump every thread's Python stack to stderr (the supervisor's hang diagnosis)
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum  # the first one counts; more only add to the count
        self.count += 1

    def agreed_with(self, dist_info: DistInfo, flag: int) -> tuple[int, int]:
        """(the signal any rank received, the largest `flag` of any rank) in one collective, so every rank stops
        after the same step: e.g. "my share of the data ran out", or rank 0's "save now", agreed with the stop."""
        values = [self.signum, flag]
        if dist_info.is_distributed:
            t = torch.tensor(values, device=dist_info.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            values = [int(v) for v in t.tolist()]
        self.decided = self.decided or values[0]
        self.report()
        return values[0], values[1]

    def report(self) -> None:
        """Say what this rank received (once, and how many more while stopping), from the loop, not the handler."""
        if self.signum and not self.reported:
            self.reported = True
            print(f"got {signal.Signals(self.signum).name}: will save a checkpoint after the current step and exit",
                  flush=True)  # fmt: skip


class Heartbeat:
    """Each node's local rank 0 rewrites a small JSON file every step; that node's supervisor watches it. Atomic
    and cheap (no fsync: a lost heartbeat costs nothing, a torn one would confuse the supervisor) and best effort:
    a failed write (a full disk under the run dir) warns once and never stops training."""

    def __init__(self, path: str, enabled: bool, **fixed) -> None:
        self.path, self.enabled, self.fixed, self.failed = path, bool(path) and enabled, fixed, False
        self.last: dict = {}  # the fields of the last beat, for `amend`

    def amend(self, **fields) -> None:
        """Write the last beat again with these fields added (e.g. the remote's state after the final upload)."""
        self(**{**self.last, **fields})

    def __call__(self, **fields) -> None:
        self.last = fields
        if not self.enabled:
            return
        beat = {**self.fixed, **fields, "time": time.time(), "pid": os.getpid()}
        try:  # through a temp file of our own, never a link planted at a fixed name
            safefile.write_text(Path(self.path), json.dumps(beat), durable=False)
        except OSError as e:
            if not self.failed:
                warn0(f"cannot write the heartbeat file {self.path} ({e.strerror or e}); training goes on")
            self.failed = True


@dataclass(frozen=True)
class Due:
    """What a step owes: a save with its reason ("completed", "signal:SIGTERM" or "periodic"), to disk and/or to
    an in-memory snapshot. A final or signal save goes to disk and is durable before the loop goes on."""

    reason: str
    disk: bool = True
    memory: bool = False


# --save_every=auto (AutoSave): how it measures and logs
FIRST_SAVE_STEPS = 3  # the first save, to measure what a save costs: after this many steps of a process (the first
# step includes compilation and warm-up, so the step time is measured over the next ones too)
MEASURED_SAVES = 5  # the cost of a save: the average of this process's last few (one alone is noisy)
CHANGE_TO_LOG = 0.2  # log the interval again only when it moved by more than this fraction
STEP_WINDOW = 20  # step times: the median of the last this many (of each kind: with and without a write in flight),
# which one step slowed by something else (a busy host, a data shard opened) does not move


def young_daly(cost: float, write: float, step_time: float, mtbf: float) -> int:
    """The save interval in steps that loses the least expected time: a save every sqrt(2 x cost x MTBF) seconds
    (Young 1974, Daly 2006), `cost` the seconds a save blocks the loop. Bounds: at least one step, and at least the
    background write (`write` seconds; one save in flight at a time, so a shorter interval only blocks on it); at
    most the MTBF itself, where the rule's assumption (cost much smaller than the MTBF) no longer holds and a
    failure is expected before the next save anyway."""
    seconds = min(max(math.sqrt(2 * max(cost, 0.0) * mtbf), write), mtbf)
    return max(1, math.ceil(seconds / max(step_time, 1e-9)))


def write_slowdown(step_time: float, writing_step_time: float | None, steps: float) -> float:
    """The seconds a save's background write costs the loop by slowing the `steps` steps it overlaps (on average):
    each takes `writing_step_time` instead of `step_time`. 0 until both are timed, or when the steps are no slower.
    (Counted in steps, not the write's seconds: a write shorter than a step still slows that whole step.)"""
    if writing_step_time is None or writing_step_time <= step_time:
        return 0.0
    return (writing_step_time - step_time) * max(steps, 0.0)


def _writing(record, start: float, end: float) -> bool:
    """Whether the background part of a save's disk write (after the save stopped blocking, until durable) ran
    during [start, end]."""
    return record.started + record.blocked < end and (record.durable_at is None or record.durable_at > start)


def _recent(times: list[float], dt: float) -> list[float]:
    return [*times, dt][-STEP_WINDOW:]


@dataclass
class AutoSave:
    """--save_every=auto on rank 0: measures the loop's step time and the saver's records (how long a save blocked,
    how long its write took until durable), and votes "save now" every `young_daly` steps. The ranks agree on rank
    0's vote in the loop's per-step collective (StopFlag.agreed_with), so every rank saves the same step.

    A save costs more than its blocking part: the steps that run while its background write is in flight are slower
    (the writer competes for memory bandwidth, the disk and a core). Steps are timed apart by whether a disk write
    was in flight during them, and what they lose (their extra time, times the steps a save's write overlaps on
    average) is added to the cost."""

    mtbf: float
    first_step: int  # the step this process started from (a resumed run measures afresh)
    steps: list[float] = field(default_factory=list)  # recent step times without a disk write in flight (seconds)
    writing: list[float] = field(default_factory=list)  # recent step times while a disk write was in flight
    writing_steps: int = 0  # steps of this process that a disk write was in flight during
    interval: int | None = None  # steps; None until a save was measured
    logged: int | None = None
    last_save: int | None = None
    log: Callable[[str], None] = print

    def observe(self, step: int, dt: float, records: list, now: float | None = None) -> None:
        """Step `step` took `dt` seconds and ended at `now` (time.perf_counter(), the saver's clock); `records`: the
        saver's SaveRecords so far (rank 0's)."""
        now = time.perf_counter() if now is None else now
        measured = [r for r in records if r.disk and r.step > self.first_step][-MEASURED_SAVES:]
        if step > self.first_step + 1:  # the first step of a process includes compilation and warm-up
            if measured and _writing(measured[-1], now - dt, now):  # one write in flight at a time: the newest
                self.writing = _recent(self.writing, dt)
                self.writing_steps += 1
            else:
                self.steps = _recent(self.steps, dt)
        step_time = self.step_time or self.writing_step_time  # (every step overlapped a write: no slowdown known)
        during = self.writing_step_time
        if not measured or step_time is None:
            return
        cost = sum(r.blocked for r in measured) / len(measured)
        written = [r.durable_at - r.started for r in measured if r.durable_at is not None]
        write = sum(written) / len(written) if written else cost
        saves = sum(1 for r in records if r.disk and r.step > self.first_step)
        slowdown = write_slowdown(step_time, during, self.writing_steps / saves)
        self.interval = young_daly(cost + slowdown, write, step_time, self.mtbf)
        if self.logged is None or abs(self.interval - self.logged) > CHANGE_TO_LOG * self.logged:
            self.logged = self.interval
            timed = f"{during:.3f}s" if during is not None else "not timed yet"
            self.log(f"--save_every=auto: a save every {self.interval} steps (~{self.interval * step_time:.1f}s;"
                     f" a save costs {cost + slowdown:.3f}s: it blocks {cost:.3f}s and slows the"
                     f" {self.writing_steps / saves:.1f} steps during its background write by {slowdown:.3f}s; its"
                     f" write takes {write:.3f}s, MTBF {self.mtbf:g}s, a step {step_time:.3f}s, {timed} during a"
                     " write)")  # fmt: skip

    @property
    def step_time(self) -> float | None:
        """A step's time without a write in flight (the median of the recent ones), None before one was timed."""
        return statistics.median(self.steps) if self.steps else None

    @property
    def writing_step_time(self) -> float | None:
        """A step's time while a disk write was in flight, the same way."""
        return statistics.median(self.writing) if self.writing else None

    def vote(self, step: int, busy: bool) -> int:
        """1 if step `step` should save to disk: the first measuring save, then every `interval` steps, never while
        the previous write is still in flight (the save would only wait for it)."""
        if busy:
            return 0
        if self.interval is None:
            return int(self.last_save is None and step >= self.first_step + FIRST_SAVE_STEPS)
        return int(step - (self.last_save or self.first_step) >= self.interval)


@dataclass
class SaveSchedule:
    """When a run saves (--save_every to disk, --snapshot_every to shared memory; 0 or less: never), asked by every
    place that saves. The stop signal comes in as an argument, agreed across ranks by the caller; so does, with
    --save_every=auto (`auto` set), the "save now" that rank 0's AutoSave voted. Pure without `auto`."""

    save_every: int
    snapshot_every: int
    auto: AutoSave | None = None

    def due(self, step: int, last: bool = False, signum: int = 0, save_now: int = 0) -> Due | None:
        """What step `step` owes once done (its heartbeat and log line out; eval and samples come after, so a crash
        in them never costs the checkpoint): the final save, a save on the agreed signal `signum`, or a periodic
        save and/or snapshot (with `auto`: a save to disk if the ranks agreed on `save_now`); None for nothing."""
        if last or signum:
            return Due("completed" if last else f"signal:{signal.Signals(signum).name}")
        if self.auto is not None and save_now:
            self.auto.last_save = step
        # a snapshot step that is also a save step snapshots too, so that a long disk write in flight never makes a
        # crash cost more than snapshot_every steps
        disk, memory = self.on_disk(step), self.snapshot_every > 0 and step % self.snapshot_every == 0
        return Due("periodic", disk, memory) if disk or memory else None

    @classmethod
    def of(cls, save_every: int | str, snapshot_every: int, mtbf: float, first_step: int) -> SaveSchedule:
        """The schedule of these settings (--save_every, --snapshot_every, --mtbf) for a process starting at
        `first_step`."""
        if save_every == "auto":
            return cls(0, snapshot_every, AutoSave(mtbf, first_step, log=print0))
        return cls(int(save_every), snapshot_every)

    def vote(self, step: int, dt: float, records: list, busy: bool, now: float | None = None) -> int:
        """Rank 0's "save now" for step `step` (it took `dt` seconds and ended at `now`, by default just now;
        `records`, `busy`: its saver's), which the ranks then agree on: 0 unless --save_every=auto."""
        if self.auto is None:
            return 0
        self.auto.observe(step, dt, records, now)
        return self.auto.vote(step, busy)

    def on_disk(self, step: int) -> bool:
        """Whether step `step`'s periodic save wrote it to disk (perhaps still in the background)."""
        if self.auto is not None:
            return self.auto.last_save == step
        return self.save_every > 0 and step % self.save_every == 0


def stopped(stop: StopFlag, signum: int, step: int, where: str = "; run again to resume") -> int:
    """Leave after the checkpoint on a signal was saved: report, tear down, and return the exit status 128+signal."""
    stop.report()  # a signal that arrived during the save
    if stop.count > 1:
        print(f"ignored {stop.count - 1} more signal(s) during the save: the first one decides", flush=True)
    print0(f"stopped by {signal.Signals(signum).name} at step {step}{where}")
    cleanup_distributed()
    # Saved; only exiting is left, and the exit code must say why. Python restores the default handlers during
    # shutdown, so torchrun's SIGTERM to the workers still running once one has exited would kill this one as -15
    # instead; ignored signals stay ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    return 128 + signum


def rng_state(device: torch.device) -> dict:
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cpu"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8), device
        )


def check_replicas(model: torch.nn.Module, dist_info: DistInfo) -> str:
    """Every rank must end a step with bit-identical weights; compare a CRC32 of them across ranks."""
    crc = 0
    for p in model.state_dict().values():
        crc = zlib.crc32(p.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    crcs = gather(dist_info.world_size, crc)
    if len(set(crcs)) != 1:
        raise RuntimeError(f"ranks disagree on the weights (CRC32 per rank: {crcs}): replicas diverged")
    return f"{crc:08x}"


def run_and_exit(name: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a training script's main and exit with a status the supervisor acts on (see nanochat/common.py): a
    storage error may pass with a restart, a refusal (settings, an incompatible checkpoint, the directory in use)
    never does. Either is one `<name>: error:` line, also written to torchrun's per-rank error file."""
    try:
        code = main(argv)
    except HelpRequested as h:
        with contextlib.suppress(OSError):  # `--help | head` closes the pipe early: not an error
            print(h)
        code = 0
    except (ConfigError, CheckpointError, FileNotFoundError, OSError) as e:
        storage = isinstance(e, StorageError) or isinstance(e, OSError) and not isinstance(e, FileNotFoundError)
        with contextlib.suppress(OSError):  # our stderr may be a log file on the very disk that is full
            print(f"{name}: error: {e}", file=sys.stderr)
        record_error(e)
        cleanup_distributed(barrier=False)
        code = EXIT_STORAGE if storage else EXIT_REFUSED
    except Diverged as e:  # every rank agreed on it: the run stops, and a restart would not help
        with contextlib.suppress(OSError):
            print(f"{name}: error: {e}", file=sys.stderr)
        record_error(e)
        cleanup_distributed(barrier=False)
        code = EXIT_DIVERGED
    # Done, or refused with exit 2, and nothing is in flight: leave without interpreter finalization. Under torchrun
    # with gloo, a worker sometimes aborts in C++ teardown at this point ("terminate called without an active
    # exception", SIGABRT/SIGBUS), which would turn a finished run into a failed attempt (or hide the 2).
    # Any other exception propagates: @record has written the error file, and a normal exit lets a background
    # checkpoint write finish first (even if the teardown then aborts, the error file names the cause).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code or 0)
