"""One attempt, from launch to the last process gone: start torchrun, watch it (workers, memory, heartbeat,
hangs, a stop to deliver), reap every process it started, and record how it ended.

The watcher never decides what happens next (agent.py does, through policy.py); it changes the run's state only
as the attempt shows it: HEALTHY at its first training heartbeat, STOPPING when it delivers a stop.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from nanochat import checkpoint
from supervisor import goodput, memory, pace, procs
from supervisor.attempt import Attempt, Plan, Point, deadline, hang_reason, resume_point
from supervisor.display import Display, View
from supervisor.launch import TrainOptions
from supervisor.lifecycle import Lifecycle
from supervisor.pace import Pace
from supervisor.policy import Batch
from supervisor.records import EventLog, RunDir, read_events, read_heartbeat
from supervisor.spare import Spare
from supervisor.states import AttemptClass, Outcome, RunState
from supervisor.workers import Worker, Workers

KILL_WAIT = 5.0  # seconds between SIGTERM and SIGKILL when we take a tree down
NOTICE_DELAY = 1.0  # a worker gone with an unknown status is announced only if torchrun outlives it this long


def launch_spec(opts: TrainOptions, run_dir: RunDir, plan: Plan, log_dir: Path) -> procs.LaunchSpec:
    """The torchrun command of an attempt: the user's trainer settings, then what the supervisor adds."""
    args = [*opts.trainer_args, f"--resume={not plan.fresh}", f"--checkpoint_dir={opts.checkpoint_dir}",
            f"--heartbeat_file={run_dir.heartbeat}"]  # fmt: skip
    args += [f"--{k}={v}" for k, v in plan.overrides.items()]  # later settings win in the trainer's parser
    # a rendezvous per attempt, named by its number: every node knows it (the leader's go carries it)
    rdzv_id = f"{opts.rdzv_id or 'nanochat'}-{plan.n}"
    return procs.LaunchSpec(opts.script, args, opts.nproc_per_node, log_dir, opts.nnodes, opts.node_rank,
                            opts.rdzv_endpoint, rdzv_id, opts.local_addr)  # fmt: skip


class Watcher:
    def __init__(self, opts: TrainOptions, run_dir: RunDir, events: EventLog, lifecycle: Lifecycle, run_id: str):
        self.opts, self.run_dir, self.events, self.lifecycle = opts, run_dir, events, lifecycle
        self.run_id = run_id  # tags this invocation's processes: NANOCHAT_ATTEMPT_ID=<run id>-<n>
        self._proc_cache: dict = {}
        self.pace = Pace()  # what every attempt of this supervisor showed (--hang-timeout auto)
        self._earlier = pace.seed(read_events(run_dir))  # what the last invocation on this run dir measured
        self._deadlines: dict[str, float] = {}  # the deadlines last written to the event log
        self.spare = Spare(opts, run_dir.path / "spare", run_id)  # --spare: the next attempt's workers, waiting
        self._launched: tuple[procs.LaunchSpec, dict[str, str]] | None = None  # the last attempt's, for its spare

    @property
    def display(self) -> Display:
        return self.lifecycle.display

    @property
    def view(self) -> View:
        return self.lifecycle.view

    @property
    def signals(self) -> list[int]:
        return self.lifecycle.signals

    def run(self, plan: Plan) -> Attempt:
        """Launch the attempt, watch it until torchrun exits, and reap every process it started."""
        a = self.launch(plan)
        try:
            self._watch(a)
            self._read_heartbeat(a, time.monotonic())  # the last one, written just before torchrun exited
        finally:
            self._reap(a)
        return a

    def launch(self, plan: Plan) -> Attempt:
        opts = self.opts
        n, log_dir, problem = self.run_dir.make_attempt_dir(plan.n)
        plan = dataclasses.replace(plan, n=n)
        if problem:
            self.display.event(problem)
        before = resume_point(opts)
        start_step = before[1].step if before and not plan.fresh else None
        self.view.new_attempt(n, plan.tries, start_step)
        spec = launch_spec(opts, self.run_dir, plan, log_dir)
        attempt_id = f"{self.run_id}-{n}"
        oom = memory.OomCounters()
        env = procs.environ_for(attempt_id, plan.dir_per_node, opts.env, self.run_dir.path / "compile-cache")
        self._launched = (spec, env)
        if spare := self.spare.take(spec, env, log_dir):
            proc, attempt_id = spare  # its processes keep the spare's tag
        else:
            try:
                proc = procs.launch(spec, log_dir / "torchrun.log", env)
            except OSError as e:  # the log cannot be created (a full disk): log elsewhere rather than not run
                log_dir = Path(tempfile.mkdtemp(prefix=f"nanochat-run-attempt-{n:03d}-"))
                self.display.event(f"cannot create {spec.log_dir / 'torchrun.log'} ({e}); this attempt logs to"
                                   f" {log_dir}")  # fmt: skip
                spec = dataclasses.replace(spec, log_dir=log_dir)
                proc = procs.launch(spec, log_dir / "torchrun.log", env)
        oom.watch(proc.pid)
        t = time.monotonic()
        lineage = checkpoint.run_id(opts.checkpoint_dir)
        a = Attempt(n, log_dir, proc, Workers(attempt_id, opts.nproc_per_node), oom, plan.fresh, lineage, before, t,
                    time.time(), t)  # fmt: skip
        # its time is the Attempt's: the goodput ledger's start of the attempt
        self.events.append("attempt_start", attempt=n, attempt_id=attempt_id, pid=proc.pid, cmd=spec.command(),
                           start_step=start_step, fresh=plan.fresh, overrides=dict(plan.overrides),
                           log_dir=str(log_dir), spare=bool(spare), time=a.started_wall)  # fmt: skip
        start = "starting fresh (--resume=False)" if plan.fresh else f"resuming from step {start_step}"
        if start_step is None and not plan.fresh:
            start = "no checkpoint yet: starting from step 0"
            if plan.dir_per_node:  # a new machine, say: the trainer gets the run's newest from the remote
                start = "no checkpoint in this node's dir: the trainer gets the run's newest, if any, from the remote"
        self.display.event(f"attempt {n}: torchrun pid {proc.pid}{' (the warm spare)' if spare else ''}, {start}")
        return a

    def close(self) -> None:
        """The run is over: no spare outlives it."""
        self.spare.close()

    def _watch(self, a: Attempt) -> None:
        """Until torchrun exits: track workers, sample memory, read heartbeats, deliver a stop, detect hangs."""
        while (code := procs.wait_exit(a.proc, self.opts.tick)) is None:
            now = time.monotonic()
            self._track_workers(a, now)
            self._sample(a, now)
            self._read_heartbeat(a, now)
            if self.signals:
                self._stop(a, now)
            elif not a.hang:
                self._check_hang(a, now)
            self.display.update(self.view)
        a.exitcode, a.exited_at = code, time.time()  # bench_recovery measures detection with exited_at

    def _track_workers(self, a: Attempt, now: float) -> None:
        for w in a.workers.refresh(a.proc.pid):
            a.oom.watch(w.pid)
        for w in a.workers.check_exits():
            a.worker_died_at = a.worker_died_at or w.ended
            if w.exitcode is None and a.notice is None:
                a.notice = (w, now)  # unknown status: announce only if torchrun outlives it (not a clean end)
            elif w.exitcode:
                self._announce(a, w)
        if a.notice and now - a.notice[1] >= NOTICE_DELAY:
            self._announce(a, a.notice[0])

    def _announce(self, a: Attempt, w: Worker) -> None:
        """Say at once that a worker died (torchrun takes a moment to stop the rest), unless it was expected: we
        stopped or killed it, or the trainer said it was done (its workers exit one by one at the end)."""
        self._read_heartbeat(a, time.monotonic())
        if a.announced or self.signals or a.killed or a.heartbeat.get("phase") == "done":
            return
        a.announced, a.notice = True, None
        how = "" if w.exitcode is None else " " + _exit_text(w.exitcode)
        self.display.event(f"worker {w.name} exited{how}; torchrun is stopping the others")

    def _sample(self, a: Attempt, now: float) -> None:
        if now < a.next_sample:
            return
        s = procs.sample(procs.tree(a.proc.pid), self._proc_cache)
        a.peak_rss, a.next_sample = max(a.peak_rss, s.rss), now + 1.0
        self.view.rss, self.view.cpu = s.rss, s.cpu_percent

    def _read_heartbeat(self, a: Attempt, now: float) -> None:
        hb = read_heartbeat(self.run_dir.heartbeat)
        if not hb or hb.get("time", 0) < a.started_wall:
            return  # nothing yet from this attempt
        a.beat = True  # the trainer has archived the old checkpoints (before its first heartbeat): resume now
        if hb.get("device_batch_size"):
            a.batch = Batch(hb.get("device_batch_size"), hb.get("total_batch_size"), hb.get("max_seq_len"),
                            hb.get("world_size"), hb.get("device"))  # fmt: skip
        self.pace, said = pace.adopt(self.pace, hb, self._earlier)
        if said:
            self.display.event(said)
        self.pace.seen(hb)
        moved = ("step", "phase", "eval_batch", "upload_sent")  # an evaluation's batches, an upload's files too
        if any(hb.get(k) != a.heartbeat.get(k) for k in moved):
            if a.heartbeat and a.healthy:
                self.pace.moved(a.heartbeat, hb, now - a.last_progress)
            a.last_progress = now
        a.heartbeat = hb
        self.view.beat(hb)
        if hb.get("phase") in ("training", "saving") and not a.healthy:
            a.healthy = True
            self.pace.started(now - a.started)
            if self._launched and not self.signals and (said := self.spare.start(*self._launched, hb.get("device"))):
                self.display.event(said)
            if self.lifecycle.state is RunState.STARTING:
                self.lifecycle.set(RunState.HEALTHY, f"training at step {hb.get('step')}")  # STARTING -> HEALTHY

    def _check_hang(self, a: Attempt, now: float) -> None:
        self._record_deadlines()
        _, limit, how = deadline(self.opts, healthy=a.healthy, heartbeat=a.heartbeat, pace=self.pace)
        self.view.hang_after, self.view.hang_why = limit, how
        self.view.quiet = now - (a.last_progress if a.healthy else a.started)
        why = hang_reason(self.opts, healthy=a.healthy, started=a.started, last_progress=a.last_progress,
                          heartbeat=a.heartbeat, now=now, pace=self.pace)  # fmt: skip
        if not why:
            return
        a.hang = a.killed = why
        self.display.event(f"hang: {why}; dumping stacks (SIGUSR1) into the attempt log, then SIGKILL to the tree")
        procs.send([w.proc for w in a.workers.live()], signal.SIGUSR1)
        time.sleep(2.0)  # faulthandler writes at once; give the tee a moment to reach the log
        procs.kill_tree(a.proc, a.workers.leftovers(), signal.SIGKILL)

    def _record_deadlines(self) -> None:
        """Under --hang-timeout auto, log the deadlines (`status` shows them) when one is new or moved by a quarter."""
        if self.opts.hang_timeout is not None:
            return
        limits = self.pace.limits(self.opts.grace_period, self.opts.startup_timeout)
        seconds = {k: v[0] for k, v in limits.items()}
        old = self._deadlines
        if old.keys() == seconds.keys() and all(abs(v - old[k]) <= 0.25 * old[k] for k, v in seconds.items()):
            return
        self._deadlines = seconds
        self.events.append(
            "hang_deadlines",
            deadlines={k: {"seconds": v[0], "why": v[1]} for k, v in limits.items()},
            pace=pace.record(self.pace),
        )  # what the next invocation starts from (pace.seed)

    def _stop(self, a: Attempt, now: float) -> None:
        """Deliver the stop to every worker as it appears; escalate per worker after the grace period."""
        opts = self.opts
        if a.killed:
            return
        if len(self.signals) > 1:
            a.killed = "a second stop signal: SIGKILL to the whole tree"
            self.display.event(a.killed)
            procs.kill_tree(a.proc, a.workers.leftovers(), signal.SIGKILL)
            return
        if a.stop_sent is None:
            a.stop_sent = now
            self.view.phase, self.view.hang_after = "saving on stop", None  # the grace period holds now, not a deadline
        self._deliver_stop(a, now)
        # each worker has the grace period from its own signal: escalate only once the last one to get it is over
        # (its peers wait for it in their collectives anyway); with no worker left, torchrun has it from the stop
        signalled = [now - w.signalled for w in a.workers.live() if w.signalled is not None]
        if a.torchrun_stopped is not None:
            signalled.append(now - a.torchrun_stopped)
        if not a.workers.live():
            signalled.append(now - a.stop_sent)
        if signalled and min(signalled) > opts.grace_period:
            a.killed = f"the grace period of {opts.grace_period:g}s was over: SIGTERM, then SIGKILL, to the whole tree"
            self.display.event(a.killed)
            procs.kill_tree(a.proc, a.workers.leftovers(), signal.SIGTERM, timeout=KILL_WAIT)

    def _deliver_stop(self, a: Attempt, now: float) -> None:
        sig = self.signals[0]
        name = signal.Signals(sig).name
        fresh = [w for w in a.workers.live() if w.signalled is None]
        for w in fresh:
            if procs.send([w.proc], sig):
                w.signalled = now  # its own grace period starts now
        if fresh:
            # straight to the workers: torchrun would SIGKILL them 30 s after relaying, too soon for a big save
            why = (f"{name} sent to worker {', '.join(w.name for w in fresh)}; saving a checkpoint (grace period"
                   f" {self.opts.grace_period:g}s; Ctrl+C again to kill)")  # fmt: skip
            self.lifecycle.stopping(why)
        elif not a.workers.all and a.torchrun_stopped is None:
            a.torchrun_stopped = now
            os.kill(a.proc.pid, signal.SIGTERM)
            self.lifecycle.stopping(f"{name} before any worker started: stopping torchrun (nothing to save yet)")

    def _reap(self, a: Attempt) -> None:
        """The attempt ends only when all its processes are gone. Workers that outlived torchrun got SIGTERM (the
        parent-death signal, or ours) and are saving: they get the grace period; anything else goes at once."""
        if a.proc.poll() is None:  # we got here by an exception: take it all down
            a.killed = a.killed or "the supervisor itself failed"
            procs.kill_tree(a.proc, a.workers.leftovers(), signal.SIGKILL)
        if a.exitcode is None:
            a.exitcode, a.exited_at = a.proc.wait(), time.time()
        left = a.workers.leftovers()
        if not left:
            return
        pids = ", ".join(str(p.pid) for p in left)
        if a.healthy and not a.killed and len(self.signals) < 2:
            self._await_orphans(a, left, pids)
            return
        # killed by us or by a second signal: at once; never trained: nothing to save, a moment to exit
        sig = signal.SIGKILL if a.killed or len(self.signals) > 1 else signal.SIGTERM
        self.display.event(
            f"{len(left)} processes of attempt {a.n} outlived torchrun (pids {pids}): "
            f"{signal.Signals(sig).name}" + (", then SIGKILL" if sig == signal.SIGTERM else "")
        )
        procs.send(left, sig)
        procs.send(psutil.wait_procs(left, timeout=KILL_WAIT)[1], signal.SIGKILL)

    def _await_orphans(self, a: Attempt, left: list[psutil.Process], pids: str) -> None:
        grace = self.opts.grace_period
        now = time.monotonic()
        for w in a.workers.live():
            if w.signalled is None and procs.send([w.proc], signal.SIGTERM):
                w.signalled = now  # they had the parent-death signal already; a second SIGTERM is harmless
        self.display.event(
            f"torchrun (pid {a.proc.pid}) is gone but its workers live on (pids {pids}): they got"
            f" SIGTERM and are saving; waiting up to {grace:g}s (Ctrl+C {'again' if self.signals else 'twice'} to kill"
            " them)"
        )
        self.view.phase, next_scan = "orphaned workers saving", now + 1.0
        while left:
            time.sleep(self.opts.tick)
            now = time.monotonic()
            self._read_heartbeat(a, now)
            self.display.update(self.view)
            live = a.workers.live()
            if len(self.signals) > 1:
                doomed, why = left, "a second stop signal"
            elif live:
                doomed, why = [w.proc for w in live if now - (w.signalled or now) > grace], "the grace period is over"
            else:
                doomed, why = left, ""  # the workers are done: what they left behind has nothing to save
            if doomed:
                if why:
                    self.display.event(f"{why}: SIGKILL to {', '.join(str(p.pid) for p in doomed)}")
                procs.send(doomed, signal.SIGKILL)
                psutil.wait_procs(doomed, timeout=KILL_WAIT)
            if doomed or now >= next_scan:
                left, next_scan = a.workers.leftovers(), now + 1.0

    def record(self, a: Attempt, outcome: Outcome, after: Point | None, progressed: bool) -> int:
        """Log and show how the attempt ended; the steps it trained that no checkpoint kept."""
        end_step = after[1].step if after else None
        reached = a.heartbeat.get("step")
        lost = max(0, reached - (end_step or 0)) if isinstance(reached, int) else None
        ended, first = time.time(), a.before[1].step if a.before and not a.fresh else 0
        clean = outcome.kind in (AttemptClass.COMPLETED, AttemptClass.STOPPED)
        parts = goodput.attempt_parts(a.heartbeat, a.started_wall, ended, first, end_step or 0, clean)
        self.events.append("attempt_end", attempt=a.n, **{"class": outcome.kind.value}, outcome=outcome.to_dict(),
                           step_reached=reached, checkpoint_step=end_step, steps_lost=lost, progressed=progressed,
                           healthy=a.healthy, duration=time.monotonic() - a.started, peak_rss=a.peak_rss,
                           exited_at=a.exited_at, worker_died_at=a.worker_died_at,
                           ledger={k: round(v, 3) for k, v in parts.items()}, time=ended)  # fmt: skip
        self.view.last_checkpoint = end_step
        where = f"checkpoint at step {end_step}" if end_step is not None else "no checkpoint yet"
        lost_txt = f", {lost} steps lost" if lost else ""
        self.display.event(f"attempt {a.n} ended: {outcome.kind.value}: {outcome.message} ({where}{lost_txt})")
        return lost or 0


def _exit_text(code: int) -> str:
    return f"killed by {procs.signal_name(code)}" if code < 0 else f"with status {code}"
