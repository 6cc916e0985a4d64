"""One attempt as a record, and the pure judgements on it: is it hung, did it progress, what is the evidence.

watch.py runs an attempt and fills in its `Attempt`; agent.py judges it with these functions once it is over.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import checkpoint
from supervisor import memory
from supervisor.classify import Evidence
from supervisor.launch import TrainOptions
from supervisor.pace import Pace, current
from supervisor.policy import Batch
from supervisor.workers import Worker, Workers

Point = tuple[Path, checkpoint.Checkpoint]  # a resume point: the checkpoint's dir, and the checkpoint


@dataclass(frozen=True)
class Plan:
    """What the decision loop asks of the next attempt."""

    n: int  # its number in the run dir (the run dir may hand out a later one)
    fresh: bool  # launch with --resume=False
    overrides: dict[str, str]  # trainer settings the policy changed (later settings win in the trainer's parser)
    dir_per_node: bool = False  # several nodes that share no disk (nanochat/node_dirs.py)
    tries: int = 1  # the how-many-th attempt of this invocation


@dataclass
class Attempt:
    """One attempt in flight: its processes and what the watch loop has learnt about it."""

    n: int
    log_dir: Path
    proc: subprocess.Popen
    workers: Workers
    oom: memory.OomCounters
    fresh: bool  # launched with --resume=False
    lineage: str | None  # the checkpoint dir's run id at launch: a fresh start makes a new one
    before: Point | None  # the resume point when it started
    started: float  # monotonic
    started_wall: float
    last_progress: float
    healthy: bool = False
    heartbeat: dict = field(default_factory=dict)
    beat: bool = False  # a heartbeat of this attempt was seen: the trainer has archived the old checkpoints
    batch: Batch | None = None  # the batch geometry of its last heartbeat that had one
    hang: str = ""
    killed: str = ""  # why we killed the tree, if we did
    stop_sent: float | None = None  # monotonic time the stop began
    torchrun_stopped: float | None = None  # we stopped torchrun itself: a stop before any worker existed
    escalated: bool = False
    peak_rss: int = 0
    next_sample: float = 0.0
    worker_died_at: float | None = None  # wall time we saw the first worker exit (before torchrun reacts)
    notice: tuple[Worker, float] | None = None  # a worker gone with an unknown status, and when
    announced: bool = False
    exitcode: int | None = None
    exited_at: float | None = None

    @property
    def log(self) -> Path:
        return self.log_dir / "torchrun.log"


def deadline(opts: TrainOptions, *, healthy: bool, heartbeat: dict, pace: Pace | None = None) -> tuple[str, float, str]:
    """(the phase, the seconds without progress after which it is a hang (0: never), how that was set) for an
    attempt whose last beat is `heartbeat` (`healthy`: it reached training; `pace`: what the run showed so far, for
    --hang-timeout auto, the None of opts.hang_timeout). The one answer for the check and for the live panel."""
    if opts.hang_timeout is None:
        return current((pace or Pace()).limits(opts.grace_period, opts.startup_timeout), heartbeat, healthy)
    if not healthy:
        return "starting", max(opts.startup_timeout, 0.0), "--startup-timeout"
    if heartbeat.get("phase") == "saving" and opts.hang_timeout > 0 and opts.grace_period > opts.hang_timeout:
        # a save may legitimately take as long as the grace period allows a stop-save
        return "saving", opts.grace_period, "the longer of --hang-timeout and --grace-period"
    return str(heartbeat.get("phase") or "training"), max(opts.hang_timeout, 0.0), "--hang-timeout"


def hang_reason(opts: TrainOptions, *, healthy: bool, started: float, last_progress: float, heartbeat: dict,
                now: float, pace: Pace | None = None) -> str:  # fmt: skip
    """Why an attempt counts as hung at `now` (monotonic), or ''. `started` and `last_progress`: when it launched
    and when its heartbeat last moved; the rest as `deadline` takes it. A timeout of 0 is off."""
    phase, limit, why = deadline(opts, healthy=healthy, heartbeat=heartbeat, pace=pace)
    since = last_progress if healthy else started
    if limit <= 0 or now - since <= limit:
        return ""
    if opts.hang_timeout is None:
        if phase == "starting":
            return f"no training step within {limit:g}s (--hang-timeout auto: {why})"
        return f"no progress for {limit:g}s {phase} at step {heartbeat.get('step')} (--hang-timeout auto: {why})"
    if not healthy:
        return f"no training step within --startup-timeout={opts.startup_timeout:g}s"
    if phase == "saving" and limit != opts.hang_timeout:
        return f"no progress for {limit:g}s in a save (the longer of --hang-timeout and --grace-period)"
    return f"no progress for --hang-timeout={opts.hang_timeout:g}s at step {heartbeat.get('step')}"


def resume_point(opts: TrainOptions) -> Point | None:
    """The one answer to "the newest usable checkpoint": what the trainer will resume from."""
    # on several machines the trainers use a snapshot only if every machine holds it: judge by disk alone
    one_machine = opts.nnodes == "1" and not opts.rdzv_endpoint
    return checkpoint.find_resume_point(opts.checkpoint_dir, warn=lambda msg: None, snapshots=one_machine)


def judge(before: Point | None, after: Point | None, fresh: bool, asked: int | None) -> tuple[bool, bool]:
    """(progressed, budget reached) by the verified resume point before and after an attempt (`fresh`: it was
    launched with --resume=False; `asked`: the step budget asked for now, if known)."""
    if after is None:
        return False, False
    key = lambda point: (str(point[0]), point[1].step, point[1].meta and point[1].meta.saved_at)  # noqa: E731
    newer = before is None or fresh or after[1].step > before[1].step
    progressed = newer and (before is None or key(after) != key(before))
    ckpt = after[1]
    # the budget asked for now wins over the one the checkpoint was saved under (it may have been raised)
    saved = ckpt.meta.num_iterations if ckpt.meta else None
    budget = asked if asked is not None and asked > 0 else (saved if saved is not None else 1 << 62)
    return progressed, bool(ckpt.final and ckpt.step >= budget)


def evidence(a: Attempt, after: Point | None, progressed: bool, budget: bool, stop_requested: bool,
             disks: list[Path]) -> Evidence:  # fmt: skip
    """Everything the classifier reads about an attempt that is over (`disks`: the dirs whose free space counts)."""
    stop_reason = (after[1].meta.stop_reason or "") if after and after[1].meta else ""
    pids = {w.pid for w in a.workers.all} | {a.proc.pid}
    return Evidence(
        exitcode=a.exitcode, attempt_log=a.log, log_dir=a.log_dir, torchrun_pid=a.proc.pid,
        stop_requested=stop_requested, saved_on_stop=progressed and stop_reason.startswith("signal:"),
        hang=a.hang, killed=a.killed, budget_reached=budget, workers=[w.to_dict() for w in a.workers.all],
        oom_cgroup=a.oom.cgroup_increase(), oom_host=a.oom.host_increase(),
        oom_kernel=memory.kernel_oom_kills(pids, a.started_wall) if a.exitcode else {},
        peak_rss=a.peak_rss, memory_limit=memory.memory_limit(), disks=memory.disk_space(disks),
    )  # fmt: skip
