"""The supervising loop: launch an attempt, watch it, reap every process of it, gather the evidence, classify,
record, ask the policy, act. Repeat.

The agent never trains and never writes checkpoint files; it reads checkpoints only through nanochat.checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nanochat import checkpoint
from nanochat.locks import DirLock, lock_holder
from supervisor import memory, procs
from supervisor.classify import Evidence, classify
from supervisor.display import Display, View
from supervisor.launch import TrainOptions
from supervisor.nodes import ACK_TIMEOUT, Coordinator, LeaderLost, as_recorded, decision_of
from supervisor.policy import AttemptSummary, Batch, decide
from supervisor.records import EventLog, RunDir, read_heartbeat
from supervisor.report import summary_lines
from supervisor.states import Action, AttemptClass, Decision, Outcome, RunState
from supervisor.workers import Worker, Workers

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # the trainer refused its settings or checkpoint: as bad usage, not a failed run
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; a scheduler should requeue the job
EXIT_INTERRUPTED = 130  # stopped by Ctrl+C after saving
KILL_WAIT = 5.0  # seconds between SIGTERM and SIGKILL when we take a tree down
NOTICE_DELAY = 1.0  # a worker gone with an unknown status is announced only if torchrun outlives it this long


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
    before: tuple[Path, checkpoint.Checkpoint] | None  # the resume point when it started
    started: float  # monotonic
    started_wall: float
    last_progress: float
    healthy: bool = False
    heartbeat: dict = field(default_factory=dict)
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


class Agent:
    def __init__(self, opts: TrainOptions, display: Display, nodes: Coordinator | None = None):
        self.opts = opts
        self.nodes = nodes  # a multi-node run: the leader decides for every node (supervisor/nodes.py)
        self.dir_per_node = False  # several nodes that share no disk (nanochat/node_dirs.py)
        self.display = display
        self.run_dir = RunDir(opts.run_dir)
        self.events = EventLog(self.run_dir, display.event)
        self.run_id = secrets.token_hex(4)  # tags this invocation's processes: NANOCHAT_ATTEMPT_ID=<run id>-<n>
        self.state = RunState.STARTING
        self.signals: list[int] = []
        self.history: list[AttemptSummary] = []
        self.overrides: dict[str, str] = {}
        self.batch = Batch()
        self.fresh = opts.fresh_start  # pass --resume=False until an attempt has shown a heartbeat
        self.attempt_no = 0
        self.view = View(max_attempts=opts.policy.max_restarts + 1)
        self.steps_lost = 0  # steps trained by this invocation's attempts that no checkpoint kept
        self.stop_code: int | None = None  # a follower: the exit code the leader's stop decision carries
        self.agreed: Decision | None = None  # several nodes: the leader's decision on the attempt that just ended
        self._proc_cache: dict = {}

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

    def _stop_code(self) -> int:
        return EXIT_PREEMPTED if signal.SIGTERM in self.signals else EXIT_INTERRUPTED

    # ---- the run -------------------------------------------------------------------------------------------

    def run(self) -> int:
        follower = self.nodes is not None and not self.nodes.leader
        lock = DirLock(self.opts.checkpoint_dir, "supervisor", self.nodes.node if follower else None)
        if msg := lock.acquire():
            self.display.event(msg)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.events.append("run_start", pid=os.getpid(), checkpoint_dir=str(self.opts.checkpoint_dir),
                           run_id=self.run_id, phase=self.opts.phase)  # fmt: skip
        started = time.time()
        try:
            code = self._check_nodes() or self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            lock.release()
        self.events.append("run_end", state=self.state.value, exit_code=code, steps_lost=self.steps_lost)
        self._summary(time.time() - started)
        return code

    def _summary(self, seconds: float) -> None:
        """The run in a few lines: where it got, how, what it cost, and where everything is."""
        try:
            point = None if self.fresh else self._resume_point()
        except (OSError, checkpoint.CheckpointError):
            point = None
        for line in summary_lines(self.state.value, seconds, point[1] if point else None, self.view, self.opts,
                                  len(self.history), self.steps_lost, self.run_dir.path):  # fmt: skip
            self.display.event(line)

    def _loop(self) -> int:
        follower = self.nodes is not None and not self.nodes.leader
        while True:
            if follower:  # the leader waits for any previous trainer, then says go
                if (code := self._wait_for_go()) is not None:
                    return code
            else:
                if (code := self._wait_for_previous_trainer()) is not None:
                    return code
                self.attempt_no = self.run_dir.next_attempt()
                if self.nodes:
                    self.nodes.go(self.attempt_no, self.overrides, self.fresh)
            outcome, summary = self._attempt(self.attempt_no)
            n = self.attempt_no
            self.history.append(summary)
            self.view.restarts.append(outcome.kind.value)
            if self.nodes:  # the leader's decision, for every node (made in _attempt, before the record)
                decision = self.agreed
            else:
                decision = decide(outcome, self.history, self.opts.policy, self.batch)
            self.events.append("decision", attempt=n, action=decision.action.value, reason=decision.reason,
                               delay=decision.delay, overrides=decision.trainer_overrides,
                               next_attempt=n + 1 if decision.action is Action.RESTART else None)  # fmt: skip
            if follower and decision.action is Action.RESTART:  # the leader sleeps the backoff, then says go
                self._set_state(RunState.BACKOFF, f"{decision.reason}; waiting for the leader's next attempt")
                self._set_state(RunState.STARTING, "the leader's next attempt")
                continue
            if decision.action is Action.FINISH:  # STARTING/HEALTHY -> SUCCEEDED
                self._set_state(RunState.SUCCEEDED, decision.reason)
                return EXIT_OK
            if decision.action is Action.STOP:  # STOPPING -> STOPPED
                self._set_state(RunState.STOPPED, decision.reason)
                return self.stop_code if self.stop_code is not None else self._stop_code()
            if decision.action is Action.GIVE_UP:  # STARTING/HEALTHY -> FAILED
                self._set_state(RunState.FAILED, decision.reason)
                self.display.event(f"diagnosis: {outcome.kind.value}: {outcome.message}; read {self._log_of(n)}")
                for line in outcome.evidence.get("log_tail", []):
                    self.display.event(f"  | {line}")
                return EXIT_USAGE if outcome.kind is AttemptClass.REFUSED else EXIT_FAILED
            self.overrides.update(decision.trainer_overrides)
            if decision.trainer_overrides:
                self.display.event(f"next attempt changes: {decision.trainer_overrides}")
            # STARTING/HEALTHY -> BACKOFF
            self._set_state(RunState.BACKOFF, f"{decision.reason} in {decision.delay:.0f}s")
            if self._sleep(decision.delay):
                self._set_state(RunState.STOPPED, "stop requested during backoff")  # BACKOFF -> STOPPED
                return self._stop_code()
            self._set_state(RunState.STARTING, f"attempt {n + 1}")  # BACKOFF -> STARTING

    def _log_of(self, n: int) -> Path:
        return self.run_dir.attempt(n) / "torchrun.log"

    def _sleep(self, seconds: float) -> bool:
        """Sleep, waking for signals; True if a stop was requested."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.signals:
            time.sleep(max(0.0, min(self.opts.tick, deadline - time.monotonic())))
        return bool(self.signals)

    def _wait_for_previous_trainer(self) -> int | None:
        """A trainer of an earlier supervisor (one that died) may still be finishing its save: starting ours now
        would have it clean up that save's temp files mid-write. Wait for its trainer lock; None when clear."""
        holder = lock_holder(self.opts.checkpoint_dir, "trainer")
        if not holder:
            return None
        grace = self.opts.grace_period
        self.display.event(f"waiting for the previous trainer pid {holder.get('pid')} to finish its save (it holds"
                           f" the trainer lock in {self.opts.checkpoint_dir}; up to {grace:g}s)")  # fmt: skip
        deadline = time.monotonic() + grace
        while (holder := lock_holder(self.opts.checkpoint_dir, "trainer")) and time.monotonic() < deadline:
            if self._sleep(min(1.0, self.opts.tick * 5)):
                # STARTING -> STOPPED
                self._set_state(RunState.STOPPED, "stop requested while waiting for the previous trainer")
                return self._stop_code()
        if holder:  # STARTING -> FAILED
            self._set_state(RunState.FAILED, f"the previous trainer pid {holder.get('pid')} on {holder.get('host')}"
                            f" still holds {self.opts.checkpoint_dir} after --grace-period={grace:g}s; stop it"
                            " and run again")  # fmt: skip
            return EXIT_FAILED
        return None

    # ---- one attempt: launch -> watch -> reap -> evidence -> classify -> record -----------------------------

    def _check_nodes(self) -> int | None:
        """Several nodes: before anything runs, one shared checkpoint dir, or one per node with a remote
        (supervisor/nodes.py)."""
        if self.nodes is None:
            return None
        remote = any(arg.split("=")[0] in ("--remote_dir", "--remote-dir") for arg in self.opts.trainer_args)
        try:
            why, self.dir_per_node = self.nodes.check_dirs(self.opts.checkpoint_dir, remote, self.opts.node_timeout)
        except LeaderLost as e:
            why = str(e)
        if not why:
            if self.dir_per_node:
                self.display.event("every node has its own checkpoint dir: each keeps a copy of every checkpoint")
            return None
        self._set_state(RunState.FAILED, why)
        return EXIT_USAGE

    def _wait_for_go(self) -> int | None:
        """A follower: until the leader starts the next attempt (its number, overrides and --resume become ours);
        an exit code if we are stopped meanwhile or the leader is gone."""
        try:
            got = self.nodes.wait_go(self.attempt_no, lambda: bool(self.signals))
        except LeaderLost as e:
            self._set_state(RunState.FAILED, str(e))
            return EXIT_FAILED
        if got is None:
            self._set_state(RunState.STOPPED, "stop requested while waiting for the leader")
            return self._stop_code()
        self.attempt_no, self.overrides, self.fresh = got
        return None

    def _agree(self, a: Attempt, outcome: Outcome, summary: AttemptSummary):
        """A multi-node attempt has ended here: tell the leader how; the leader hears every node, finds the root
        cause and decides for all (supervisor/nodes.py). Returns this node's outcome as recorded (peer_failure
        when another node failed first), the decision, and the root cause's class (the leader's; else None)."""
        nodes, stop = self.nodes, lambda: False
        nodes.report(a.n, outcome, a.worker_died_at or a.exited_at)
        if nodes.leader:
            waiting = lambda late: self.display.event(  # noqa: E731
                f"attempt {a.n} ended here; waiting up to --node-timeout={self.opts.node_timeout:g}s for node(s)"
                f" {late} to report how it ended there (a node that never does is lost)")  # fmt: skip
            ends = nodes.gather(a.n, self.opts.node_timeout, stop, waiting)
            policy = lambda o: decide(o, [*self.history, summary], self.opts.policy, self.batch)  # noqa: E731
            decision, root, cause = nodes.decide_for_all(a.n, ends, policy, bool(self.signals), self.opts.node_timeout)
            code = self._stop_code() if decision.action is Action.STOP and self.signals else None
            nodes.decide(a.n, decision, root, code)
            if decision.action is not Action.RESTART:
                nodes.wait_acks(a.n, ACK_TIMEOUT)
        else:
            try:
                record = nodes.wait_decision(a.n, stop)
            except LeaderLost as e:
                record = {"action": "give_up", "reason": str(e), "delay": 0.0, "overrides": {}, "root": None,
                          "exit_code": None}  # fmt: skip
            decision, root, cause = decision_of(record), record["root"], None
            self.stop_code = record.get("exit_code")
        return as_recorded(outcome, decision, root, nodes.node), decision, cause

    def _attempt(self, n: int) -> tuple[Outcome, AttemptSummary]:
        a = self._launch(n)
        try:
            self._watch(a)
            self._read_heartbeat(a, time.monotonic())  # the last one, written just before torchrun exited
        finally:
            self._reap(a)
        if a.fresh and checkpoint.run_id(self.opts.checkpoint_dir) != a.lineage:
            self.fresh = False  # the trainer started the new lineage (archiving the old checkpoints): resume now
        # a fresh start that never got that far has not archived the old checkpoints yet: they are not this
        # run's, and judge nothing
        after = None if self.fresh else self._resume_point()
        progressed, budget = self._judge(a, after)
        outcome = classify(self._evidence(a, after, progressed, budget))
        summary = AttemptSummary(outcome.kind, progressed, a.healthy, a.heartbeat.get("device_batch_size"))
        if self.nodes:  # several nodes: this node's outcome as recorded, and the leader's decision for all
            outcome, self.agreed, cause = self._agree(a, outcome, summary)
            summary = dataclasses.replace(summary, kind=cause or outcome.kind)  # the policy's history: the cause
        self._record(a, outcome, after, progressed)
        return outcome, summary

    def _resume_point(self) -> tuple[Path, checkpoint.Checkpoint] | None:
        """The one answer to "the newest usable checkpoint": what the trainer will resume from."""
        # on several machines the trainers use a snapshot only if every machine holds it: judge by disk alone
        one_machine = self.opts.nnodes == "1" and not self.opts.rdzv_endpoint
        return checkpoint.find_resume_point(self.opts.checkpoint_dir, warn=lambda msg: None, snapshots=one_machine)

    def _launch(self, n: int) -> Attempt:
        opts = self.opts
        n, log_dir, problem = self.run_dir.make_attempt_dir(n)
        self.attempt_no = n
        if problem:
            self.display.event(problem)
        before = self._resume_point()
        start_step = before[1].step if before and not self.fresh else None
        self.view.new_attempt(n, len(self.history) + 1, start_step)
        spec = self.launch_spec(log_dir)
        attempt_id = f"{self.run_id}-{n}"
        oom = memory.OomCounters()
        env = procs.environ_for(attempt_id, self.dir_per_node, opts.env)
        try:
            proc = procs.launch(spec, log_dir / "torchrun.log", env)
        except OSError as e:  # the log cannot be created (a full disk): log elsewhere rather than not run
            log_dir = Path(tempfile.mkdtemp(prefix=f"nanochat-run-attempt-{n:03d}-"))
            self.display.event(f"cannot create {spec.log_dir / 'torchrun.log'} ({e}); this attempt logs to {log_dir}")
            spec = dataclasses.replace(spec, log_dir=log_dir)
            proc = procs.launch(spec, log_dir / "torchrun.log", env)
        oom.watch(proc.pid)
        t = time.monotonic()
        lineage = checkpoint.run_id(opts.checkpoint_dir)
        a = Attempt(n, log_dir, proc, Workers(attempt_id, opts.nproc_per_node), oom, self.fresh, lineage, before, t,
                    time.time(), t)  # fmt: skip
        self.events.append("attempt_start", attempt=n, attempt_id=attempt_id, pid=proc.pid, cmd=spec.command(),
                           start_step=start_step, fresh=self.fresh, overrides=dict(self.overrides),
                           log_dir=str(log_dir))  # fmt: skip
        start = "starting fresh (--resume=False)" if self.fresh else f"resuming from step {start_step}"
        if start_step is None and not self.fresh:
            start = "no checkpoint yet: starting from step 0"
            if self.dir_per_node:  # a new machine, say: the trainer gets the run's newest from the remote
                start = "no checkpoint in this node's dir: the trainer gets the run's newest, if any, from the remote"
        self.display.event(f"attempt {n}: torchrun pid {proc.pid}, {start}")
        return a

    def launch_spec(self, log_dir: Path) -> procs.LaunchSpec:
        """The torchrun command of the next attempt: the user's trainer settings, then what the agent adds."""
        opts = self.opts
        args = [*opts.trainer_args, f"--resume={not self.fresh}", f"--checkpoint_dir={opts.checkpoint_dir}",
                f"--heartbeat_file={self.run_dir.heartbeat}"]  # fmt: skip
        args += [f"--{k}={v}" for k, v in self.overrides.items()]  # later settings win in the trainer's parser
        # a rendezvous per attempt, named by its number: every node knows it (the leader's go carries it)
        rdzv_id = f"{opts.rdzv_id or 'nanochat'}-{self.attempt_no}"
        return procs.LaunchSpec(opts.script, args, opts.nproc_per_node, log_dir, opts.nnodes, opts.node_rank,
                                opts.rdzv_endpoint, rdzv_id, opts.local_addr)  # fmt: skip

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
        self.fresh = False  # the trainer has archived the old checkpoints (before its first heartbeat): resume now
        if hb.get("device_batch_size"):
            self.batch = Batch(hb.get("device_batch_size"), hb.get("total_batch_size"), hb.get("max_seq_len"),
                               hb.get("world_size"), hb.get("device"))  # fmt: skip
        moved = ("step", "phase", "eval_batch")  # an evaluation's batches are progress too
        if any(hb.get(k) != a.heartbeat.get(k) for k in moved):
            a.last_progress = now
        a.heartbeat = hb
        self.view.beat(hb)
        if hb.get("phase") in ("training", "saving") and not a.healthy:
            a.healthy = True
            if self.state is RunState.STARTING:
                self._set_state(RunState.HEALTHY, f"training at step {hb.get('step')}")  # STARTING -> HEALTHY

    def _check_hang(self, a: Attempt, now: float) -> None:
        if not (why := self._hang_reason(a, now)):
            return
        a.hang = a.killed = why
        self.display.event(f"hang: {why}; dumping stacks (SIGUSR1) into the attempt log, then SIGKILL to the tree")
        procs.send([w.proc for w in a.workers.live()], signal.SIGUSR1)
        time.sleep(2.0)  # faulthandler writes at once; give the tee a moment to reach the log
        procs.kill_tree(a.proc, a.workers.leftovers(), signal.SIGKILL)

    def _hang_reason(self, a: Attempt, now: float) -> str:
        """Why the attempt counts as hung now, or ''. A timeout of 0 is off."""
        opts, phase = self.opts, a.heartbeat.get("phase")
        if not a.healthy:
            if opts.startup_timeout > 0 and now - a.started > opts.startup_timeout:
                return f"no training step within --startup-timeout={opts.startup_timeout:g}s"
            return ""
        # a save may legitimately take as long as the grace period allows a stop-save
        limit = max(opts.hang_timeout, opts.grace_period) if phase == "saving" else opts.hang_timeout
        if opts.hang_timeout <= 0 or now - a.last_progress <= limit:
            return ""
        if limit != opts.hang_timeout:
            return f"no progress for {limit:g}s in a save (the longer of --hang-timeout and --grace-period)"
        return f"no progress for --hang-timeout={opts.hang_timeout:g}s at step {a.heartbeat.get('step')}"

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
            self.view.phase = "saving on stop"
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
            self._stopping(why)
        elif not a.workers.all and a.torchrun_stopped is None:
            a.torchrun_stopped = now
            os.kill(a.proc.pid, signal.SIGTERM)
            self._stopping(f"{name} before any worker started: stopping torchrun (nothing to save yet)")

    def _stopping(self, why: str) -> None:
        if self.state.running:
            self._set_state(RunState.STOPPING, why)  # STARTING/HEALTHY -> STOPPING
        else:
            self.display.event(why)

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

    # ---- judging, evidence, recording ----------------------------------------------------------------------

    def _judge(self, a: Attempt, after) -> tuple[bool, bool]:
        """(progressed, budget reached) by the verified resume point, before and after the attempt."""
        if after is None:
            return False, False
        key = lambda point: (str(point[0]), point[1].step, (point[1].meta or {}).get("saved_at"))  # noqa: E731
        newer = a.before is None or a.fresh or after[1].step > a.before[1].step
        progressed = newer and (a.before is None or key(after) != key(a.before))
        ckpt, asked = after[1], self.opts.num_iterations
        # the budget asked for now wins over the one the checkpoint was saved under (it may have been raised)
        budget = asked if asked is not None and asked > 0 else (ckpt.meta or {}).get("num_iterations", 1 << 62)
        return progressed, bool(ckpt.final and ckpt.step >= budget)

    def _evidence(self, a: Attempt, after, progressed: bool, budget: bool) -> Evidence:
        stop_reason = (after[1].meta or {}).get("stop_reason", "") if after else ""
        pids = {w.pid for w in a.workers.all} | {a.proc.pid}
        return Evidence(
            exitcode=a.exitcode, attempt_log=a.log, log_dir=a.log_dir, torchrun_pid=a.proc.pid,
            stop_requested=bool(self.signals), saved_on_stop=progressed and stop_reason.startswith("signal:"),
            hang=a.hang, killed=a.killed, budget_reached=budget, workers=[w.to_dict() for w in a.workers.all],
            oom_cgroup=a.oom.cgroup_increase(), oom_host=a.oom.host_increase(),
            oom_kernel=memory.kernel_oom_kills(pids, a.started_wall) if a.exitcode else {},
            peak_rss=a.peak_rss, memory_limit=memory.memory_limit(),
            disks=memory.disk_space([self.opts.checkpoint_dir, self.run_dir.path]),
        )  # fmt: skip

    def _record(self, a: Attempt, outcome: Outcome, after, progressed: bool) -> None:
        end_step = after[1].step if after else None
        reached = a.heartbeat.get("step")
        lost = max(0, reached - (end_step or 0)) if isinstance(reached, int) else None
        self.steps_lost += lost or 0
        self.events.append("attempt_end", attempt=a.n, **{"class": outcome.kind.value}, outcome=outcome.to_dict(),
                           step_reached=reached, checkpoint_step=end_step, steps_lost=lost, progressed=progressed,
                           healthy=a.healthy, duration=time.monotonic() - a.started, peak_rss=a.peak_rss,
                           exited_at=a.exited_at, worker_died_at=a.worker_died_at)  # fmt: skip
        self.view.last_checkpoint = end_step
        where = f"checkpoint at step {end_step}" if end_step is not None else "no checkpoint yet"
        lost_txt = f", {lost} steps lost" if lost else ""
        self.display.event(f"attempt {a.n} ended: {outcome.kind.value}: {outcome.message} ({where}{lost_txt})")


def _exit_text(code: int) -> str:
    return f"killed by {procs.signal_name(code)}" if code < 0 else f"with status {code}"
