"""The supervising loop: launch an attempt, watch it, classify its end, ask the policy, act. Repeat.

The agent never trains and never writes checkpoint files; it reads checkpoints only through nanochat.checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nanochat import checkpoint
from supervisor import procs
from supervisor.classify import Evidence, classify
from supervisor.display import Display, View
from supervisor.policy import AttemptSummary, Policy, decide
from supervisor.records import Lock, RunDir, append_event, read_heartbeat
from supervisor.states import Action, Outcome, RunState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; a scheduler should requeue the job
EXIT_INTERRUPTED = 130  # stopped by Ctrl+C after saving


@dataclass
class TrainOptions:
    script: str
    trainer_args: list[str]  # everything the trainer gets except what the agent adds per attempt
    checkpoint_dir: Path
    run_dir: Path
    nproc_per_node: int = 1
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    hang_timeout: float = 1800.0
    startup_timeout: float = 3600.0
    grace_period: float = 600.0
    policy: Policy = field(default_factory=Policy)
    tick: float = 0.1  # how often the watch loop wakes up; torchrun exit is noticed within this


@dataclass
class Watch:
    """What the watch loop learns about the attempt in flight."""

    started: float  # monotonic
    started_wall: float
    last_progress: float
    healthy: bool = False
    heartbeat: dict = field(default_factory=dict)
    hang: str = ""
    stop_sent: float | None = None  # monotonic time the stop signal went to the workers
    escalated: bool = False
    peak_rss: int = 0
    next_sample: float = 0.0
    workers: list[psutil.Process] = field(default_factory=list)
    worker_died_at: float | None = None  # wall time we saw the first worker exit (before torchrun reacts)


class Agent:
    def __init__(self, opts: TrainOptions, display: Display):
        self.opts = opts
        self.display = display
        self.run_dir = RunDir(opts.run_dir)
        self.state = RunState.STARTING
        self.signals: list[int] = []
        self.history: list[AttemptSummary] = []
        self.overrides: dict[str, str] = {}
        self.batch: tuple[int | None, int | None] = (None, None)  # (device_batch_size, total_batch_size)
        self.view = View(max_attempts=opts.policy.max_restarts + 1)
        self._proc_cache: dict[int, psutil.Process] = {}

    # ---- state ---------------------------------------------------------------------------------------------

    def _set_state(self, new: RunState, why: str = "") -> None:
        if self.state.final:
            raise AssertionError(f"{self.state.name} -> {new.name}: a final state never changes")
        old, self.state = self.state, new
        self.view.state = new.value
        if old is not new:
            self.display.event(f"{old.value} -> {new.value}" + (f": {why}" if why else ""))

    def _on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    # ---- the run -------------------------------------------------------------------------------------------

    def run(self) -> int:
        lock = Lock(self.opts.checkpoint_dir)
        if msg := lock.acquire():
            self.display.event(msg)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        append_event(self.run_dir, "run_start", pid=os.getpid(), checkpoint_dir=str(self.opts.checkpoint_dir))
        try:
            code = self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            lock.release()
        append_event(self.run_dir, "run_end", state=self.state.value, exit_code=code)
        return code

    def _loop(self) -> int:
        attempt = 0
        while True:
            attempt += 1
            outcome, progressed = self._attempt(attempt)
            self.history.append(AttemptSummary(outcome.kind, progressed))
            self.view.restarts.append(outcome.kind.value)
            decision = decide(outcome, self.history, self.opts.policy, *self.batch)
            append_event(self.run_dir, "decision", attempt=attempt, action=decision.action.value,
                         reason=decision.reason, delay=decision.delay,
                         overrides=decision.trainer_overrides)  # fmt: skip
            if decision.action is Action.FINISH:
                if checkpoint.remove_snapshots(self.opts.checkpoint_dir):
                    self.display.event("removed the run's in-memory snapshots: the final checkpoint is on disk")
                self._set_state(RunState.SUCCEEDED, decision.reason)
                return EXIT_OK
            if decision.action is Action.STOP:
                self._set_state(RunState.STOPPED, decision.reason)
                return EXIT_PREEMPTED if signal.SIGTERM in self.signals else EXIT_INTERRUPTED
            if decision.action is Action.GIVE_UP:
                self._set_state(RunState.FAILED, decision.reason)
                logs = self.run_dir.attempt(attempt)
                self.display.event(f"diagnosis: {outcome.kind.value}: {outcome.message}; read {logs}/torchrun.log")
                return EXIT_FAILED
            self.overrides.update(decision.trainer_overrides)
            if decision.trainer_overrides:
                self.display.event(f"next attempt changes: {decision.trainer_overrides}")
            self._set_state(RunState.BACKOFF, f"{decision.reason} in {decision.delay:.0f}s")
            deadline = time.monotonic() + decision.delay
            while time.monotonic() < deadline and not self.signals:
                time.sleep(min(self.opts.tick, deadline - time.monotonic()))
            if self.signals:
                self._set_state(RunState.STOPPED, "stop requested during backoff")
                return EXIT_PREEMPTED if signal.SIGTERM in self.signals else EXIT_INTERRUPTED
            self._set_state(RunState.STARTING, f"attempt {attempt + 1}")

    def _newest(self) -> checkpoint.Checkpoint | None:
        """The newest valid checkpoint on disk, or a newer in-memory snapshot (it counts as progress too)."""
        valid = [c for c in checkpoint.scan(self.opts.checkpoint_dir) if c.valid]
        newest = valid[-1] if valid else None
        snap = checkpoint.newest_snapshot(self.opts.checkpoint_dir, verify=False)
        if snap and (newest is None or snap[1].step > newest.step):
            return snap[1]
        return newest

    def _attempt(self, n: int) -> tuple[Outcome, bool]:
        opts = self.opts
        log_dir = self.run_dir.attempt(n)
        before = self._newest()
        start_step = before.step if before else None
        self.view.attempt, self.view.last_checkpoint = n, start_step
        args = [*opts.trainer_args, "--resume=True", f"--checkpoint_dir={opts.checkpoint_dir}",
                f"--heartbeat_file={self.run_dir.heartbeat}"]  # fmt: skip
        args += [f"--{k}={v}" for k, v in self.overrides.items()]  # later settings win in the trainer's parser
        spec = procs.LaunchSpec(opts.script, args, opts.nproc_per_node, log_dir, opts.nnodes, opts.node_rank,
                                opts.rdzv_endpoint)  # fmt: skip
        ooms_before = procs.oom_kill_counts()
        proc = procs.launch(spec, log_dir / "torchrun.log", procs.environ_for_workers())
        t = time.monotonic()
        watch = Watch(started=t, started_wall=time.time(), last_progress=t)
        append_event(self.run_dir, "attempt_start", attempt=n, pid=proc.pid, cmd=spec.command(),
                     start_step=start_step, overrides=dict(self.overrides), log_dir=str(log_dir))  # fmt: skip
        self.display.event(f"attempt {n}: torchrun pid {proc.pid}, resuming from step {start_step or 0}")
        try:
            code = self._watch(proc, watch)
            exited_at = time.time()  # when we noticed torchrun's exit (bench_recovery measures detection with it)
        finally:
            procs.kill_tree(proc.pid, signal.SIGKILL, timeout=5)  # normally a no-op: all exited already
            self._sweep_session(proc.pid)
        after = self._newest()
        end_step = after.step if after else None
        progressed = end_step is not None and (start_step is None or end_step > start_step)
        budget = bool(after and after.final and after.step >= after.meta.get("num_iterations", 1 << 62))
        ooms = procs.oom_kill_counts()
        saved_on_stop = bool(progressed and after.meta.get("stop_reason", "").startswith("signal:"))
        evidence = Evidence(
            exitcode=code, attempt_log=log_dir / "torchrun.log", log_dir=log_dir,
            stop_requested=bool(self.signals), saved_on_stop=saved_on_stop, hang=watch.hang, budget_reached=budget,
            oom_kills=max((ooms[k] - ooms_before.get(k, 0) for k in ooms), default=0), peak_rss=watch.peak_rss,
            memory_limit=procs.memory_limit(),
        )  # fmt: skip
        outcome = classify(evidence)
        reached = watch.heartbeat.get("step")
        lost = max(0, reached - (end_step or 0)) if isinstance(reached, int) else None
        append_event(self.run_dir, "attempt_end", attempt=n, **{"class": outcome.kind.value}, outcome=outcome.to_dict(),
                     step_reached=reached, checkpoint_step=end_step, steps_lost=lost, progressed=progressed,
                     duration=time.monotonic() - watch.started, peak_rss=watch.peak_rss, exited_at=exited_at,
                     worker_died_at=watch.worker_died_at)  # fmt: skip
        self.view.last_checkpoint = end_step
        lost_txt = f", {lost} steps lost" if lost else ""
        self.display.event(f"attempt {n} ended: {outcome.kind.value}: {outcome.message} (checkpoint at step "
                           f"{end_step}{lost_txt})")  # fmt: skip
        return outcome, progressed

    def _watch(self, proc, watch: Watch) -> int:
        """Wait for torchrun to exit, watching heartbeats, memory and our own signals. Returns its exit status."""
        opts = self.opts
        while True:
            code = procs.wait_exit(proc, opts.tick)
            if code is not None:
                return code
            now = time.monotonic()
            if now >= watch.next_sample:
                s = procs.sample(proc.pid, self._proc_cache)
                watch.peak_rss = max(watch.peak_rss, s.rss)
                watch.next_sample = now + 1.0
                self.view.rss, self.view.cpu = s.rss, s.cpu_percent
            self._read_heartbeat(watch, now)
            self._check_workers(proc, watch)
            if self.signals:
                self._stop(proc, watch, now)
            elif not watch.hang:
                self._check_hang(proc, watch, now)
            self.display.update(self.view)

    def _check_workers(self, proc, watch: Watch) -> None:
        """Notice a dead worker at once (torchrun then stops the rest, which takes a moment longer)."""
        if not watch.workers:
            watch.workers = procs.workers(proc.pid, self.opts.script)
            return
        if watch.worker_died_at is not None:
            return
        for w in watch.workers:
            try:
                dead = w.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                dead = True
            if dead:
                watch.worker_died_at = time.time()
                self.display.event(f"worker pid {w.pid} exited; torchrun is stopping the others")
                return

    def _read_heartbeat(self, watch: Watch, now: float) -> None:
        hb = read_heartbeat(self.run_dir.heartbeat)
        if not hb or hb.get("time", 0) < watch.started_wall:
            return  # nothing yet from this attempt
        if hb.get("device_batch_size"):
            self.batch = (hb.get("device_batch_size"), hb.get("total_batch_size"))
        if (hb.get("step"), hb.get("phase")) != (watch.heartbeat.get("step"), watch.heartbeat.get("phase")):
            watch.last_progress = now
        watch.heartbeat = hb
        v = self.view
        v.step, v.num_iterations, v.loss, v.tok_per_s, v.phase = (
            hb.get("step"), hb.get("num_iterations"), hb.get("loss"), hb.get("tok_per_s"), hb.get("phase"))  # fmt: skip
        if hb.get("phase") in ("training", "saving") and not watch.healthy:
            watch.healthy = True
            if self.state is RunState.STARTING:
                self._set_state(RunState.HEALTHY, f"training at step {hb.get('step')}")

    def _check_hang(self, proc, watch: Watch, now: float) -> None:
        opts = self.opts
        if not watch.healthy and now - watch.started > opts.startup_timeout:
            why = f"no training step within --startup-timeout={opts.startup_timeout:g}s"
        elif watch.healthy and now - watch.last_progress > opts.hang_timeout:
            why = f"no progress for --hang-timeout={opts.hang_timeout:g}s at step {watch.heartbeat.get('step')}"
        else:
            return
        watch.hang = why
        self.display.event(f"hang: {why}; dumping stacks (SIGUSR1) into the attempt log, then stopping the tree")
        procs.send(procs.workers(proc.pid, opts.script), signal.SIGUSR1)
        time.sleep(2.0)  # faulthandler writes at once; give the tee a moment to reach the log
        procs.kill_tree(proc.pid, signal.SIGKILL)

    def _stop(self, proc, watch: Watch, now: float) -> None:
        opts = self.opts
        if watch.stop_sent is None:
            sig = self.signals[0]
            # Straight to the workers: torchrun would SIGKILL them 30 s after relaying, too soon for a big save.
            n = procs.send(procs.workers(proc.pid, opts.script), sig)
            watch.stop_sent = now
            if self.state.running:
                self._set_state(RunState.STOPPING, f"{signal.Signals(sig).name} sent to {n} workers; saving a "
                                f"checkpoint (grace period {opts.grace_period:g}s; Ctrl+C again to kill)")  # fmt: skip
            self.view.phase = "saving on stop"
        elif not watch.escalated and (len(self.signals) > 1 or now - watch.stop_sent > opts.grace_period):
            watch.escalated = True
            why = "second signal" if len(self.signals) > 1 else f"grace period of {opts.grace_period:g}s over"
            self.display.event(f"{why}: SIGTERM, then SIGKILL, to the whole tree")
            procs.kill_tree(proc.pid, signal.SIGTERM, timeout=5)

    def _sweep_session(self, sid: int) -> None:
        """Kill anything left in torchrun's session (a worker orphaned by a torchrun that died first)."""
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                    p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                continue
