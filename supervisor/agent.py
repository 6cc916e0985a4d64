"""The supervising loop: run an attempt, judge and classify how it ended, record it, ask the policy, act.
Repeat until done.

One attempt (launch, watch, reap) is watch.py's; the pure judgements on it are attempt.py's; agreeing with other
nodes is peers.py's; the decision is policy.py's `decide`; the run's state lives in lifecycle.py. The agent
never trains and never writes checkpoint files; it reads checkpoints only through nanochat.checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import time
from pathlib import Path

from nanochat import checkpoint
from nanochat.locks import DirLock, lock_holder
from supervisor import health, preempt, procs
from supervisor.attempt import Plan, evidence, judge, resume_point
from supervisor.classify import classify
from supervisor.display import Display, View
from supervisor.launch import TrainOptions
from supervisor.lifecycle import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, Lifecycle
from supervisor.nodes import Coordinator
from supervisor.peers import Peers
from supervisor.policy import AttemptSummary, Batch, decide
from supervisor.records import EventLog, RunDir
from supervisor.report import summary_lines
from supervisor.states import Action, AttemptClass, Decision, Outcome, RunState
from supervisor.watch import Watcher, launch_spec

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_USAGE", "Agent", "TrainOptions"]


class Agent:
    """One supervised run. `run()` is the whole of it; `loop()` asks `attempt(n)` for each attempt in turn."""

    def __init__(self, opts: TrainOptions, display: Display, nodes: Coordinator | None = None,
                 since: float | None = None, check_devices: bool = True):  # fmt: skip
        self.opts = opts
        self.since = since  # when this invocation's process started: the goodput ledger's start (supervisor/goodput.py)
        self.nodes = nodes  # a multi-node run: the leader decides for every node (supervisor/nodes.py)
        self.display = display
        self.view = View(max_attempts=opts.policy.max_restarts + 1)
        self.lifecycle = Lifecycle(display, self.view)
        self.signals = self.lifecycle.signals
        self.peers = Peers(nodes, opts, self.lifecycle) if nodes is not None else None
        self.run_dir = RunDir(opts.run_dir)
        self.events = EventLog(self.run_dir, display.event)
        self.run_id = secrets.token_hex(4)  # tags this invocation's processes: NANOCHAT_ATTEMPT_ID=<run id>-<n>
        self.watcher = Watcher(opts, self.run_dir, self.events, self.lifecycle, self.run_id)
        self.dir_per_node = False  # several nodes that share no disk (nanochat/node_dirs.py)
        self.history: list[AttemptSummary] = []
        self.overrides: dict[str, str] = {}
        self.batch = Batch()
        self.fresh = opts.fresh_start  # pass --resume=False until an attempt has shown a heartbeat
        self.attempt_no = 0
        self.steps_lost = 0  # steps trained by this invocation's attempts that no checkpoint kept
        self.stop_code: int | None = None  # a follower: the exit code the leader's stop decision carries
        self.agreed: Decision | None = None  # several nodes: the leader's decision on the attempt that just ended
        self.peak_rss = 0  # the peak memory of the last attempt not killed for memory: what the next one needs free
        # check the devices before the next attempt: the first (`check_devices`: a speedrun's later phases skip
        # it), and after a failure that could be the machine's (health.suspicious)
        self.suspect = check_devices

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    def run(self) -> int:
        follower = self.peers is not None and self.peers.follower
        lock = DirLock(self.opts.checkpoint_dir, "supervisor", self.nodes.node if follower else None)
        if msg := lock.acquire():
            self.display.event(msg)
        old_handlers = {s: signal.signal(s, self.lifecycle.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.events.append("run_start", pid=os.getpid(), checkpoint_dir=str(self.opts.checkpoint_dir),
                           run_id=self.run_id, phase=self.opts.phase, process_started=self.since)  # fmt: skip
        started = time.time()
        poller = preempt.start(self.opts.preemption, self.opts.preemption_endpoint, self._on_notice, self.display.event)
        try:
            code = self._check_nodes() or self.loop()
        finally:
            if poller:
                poller.stop()
            self.watcher.close()  # no warm spare outlives the run
            for s, h in old_handlers.items():
                signal.signal(s, h)
            lock.release()
        if poller and poller.notice:
            self._notice_met(poller.notice)
        self.events.append("run_end", state=self.state.value, exit_code=code, steps_lost=self.steps_lost)
        self._summary(time.time() - started)
        return code

    def loop(self) -> int:
        """Attempt after attempt until the policy says finish, stop or give up: the exit code."""
        life = self.lifecycle
        follower = self.peers is not None and self.peers.follower
        while True:
            if follower:  # the leader waits for any previous trainer, then says go
                got = self.peers.wait_for_go(self.attempt_no)
                if isinstance(got, int):
                    return got
                self.attempt_no, self.overrides, self.fresh = got
                if (code := self._check_health(self.attempt_no)) is not None:
                    return code
            else:
                if (code := self._wait_for_previous_trainer()) is not None:
                    return code
                if (code := self._check_health(self.run_dir.next_attempt())) is not None:
                    return code
                self.attempt_no = self.run_dir.next_attempt()
                if self.peers:
                    self.peers.go(self.attempt_no, self.overrides, self.fresh)
            outcome, summary = self.attempt(self.attempt_no)
            n = self.attempt_no
            self.history.append(summary)
            self.view.restarts.append(outcome.kind.value)
            if self.peers:  # the leader's decision, for every node (made in attempt(), before the record)
                decision = self.agreed
            else:
                decision = decide(outcome, self.history, self.opts.policy, self.batch)
            self.events.append("decision", attempt=n, action=decision.action.value, reason=decision.reason,
                               delay=decision.delay, overrides=decision.trainer_overrides,
                               next_attempt=n + 1 if decision.action is Action.RESTART else None)  # fmt: skip
            if follower and decision.action is Action.RESTART:  # the leader sleeps the backoff, then says go
                life.set(RunState.BACKOFF, f"{decision.reason}; waiting for the leader's next attempt")
                life.set(RunState.STARTING, "the leader's next attempt")
                continue
            if decision.action is Action.FINISH:  # STARTING/HEALTHY -> SUCCEEDED
                life.set(RunState.SUCCEEDED, decision.reason)
                return EXIT_OK
            if decision.action is Action.STOP:  # STOPPING -> STOPPED
                life.set(RunState.STOPPED, decision.reason)
                return self.stop_code if self.stop_code is not None else life.stop_code()
            if decision.action is Action.GIVE_UP:  # STARTING/HEALTHY -> FAILED
                life.set(RunState.FAILED, decision.reason)
                self.display.event(f"diagnosis: {outcome.kind.value}: {outcome.message}; read {self._log_of(n)}")
                for line in outcome.evidence.get("log_tail", []):
                    self.display.event(f"  | {line}")
                return EXIT_USAGE if outcome.kind is AttemptClass.REFUSED else EXIT_FAILED
            self.overrides.update(decision.trainer_overrides)
            if decision.trainer_overrides:
                self.display.event(f"next attempt changes: {decision.trainer_overrides}")
            # STARTING/HEALTHY -> BACKOFF
            life.set(RunState.BACKOFF, f"{decision.reason} in {decision.delay:.0f}s")
            if life.sleep(decision.delay, self.opts.tick):
                life.set(RunState.STOPPED, "stop requested during backoff")  # BACKOFF -> STOPPED
                return life.stop_code()
            life.set(RunState.STARTING, f"attempt {n + 1}")  # BACKOFF -> STARTING

    def attempt(self, n: int) -> tuple[Outcome, AttemptSummary]:
        """Run attempt `n` to its end, then judge, classify and record it (several nodes: agree on it)."""
        plan = Plan(n, self.fresh, self.overrides, self.dir_per_node, len(self.history) + 1)
        a = self.watcher.run(plan)
        self.attempt_no = a.n
        if a.beat:
            self.fresh = False  # the trainer has archived the old checkpoints (before its first heartbeat)
        if a.batch is not None:
            self.batch = a.batch
        if a.fresh and checkpoint.run_id(self.opts.checkpoint_dir) != a.lineage:
            self.fresh = False  # the trainer started the new lineage (archiving the old checkpoints): resume now
        # a fresh start that never got that far has not archived the old checkpoints yet: they are not this
        # run's, and judge nothing
        after = None if self.fresh else resume_point(self.opts)
        progressed, budget = judge(a.before, after, a.fresh, self.opts.num_iterations)
        disks = [self.opts.checkpoint_dir, self.run_dir.path]
        outcome = classify(evidence(a, after, progressed, budget, self.lifecycle.stop_requested, disks))
        if outcome.kind is not AttemptClass.HOST_OOM:  # an OOM's peak is the limit, not what the run needs
            self.peak_rss = a.peak_rss or self.peak_rss
        self.suspect = health.suspicious(outcome, a.started_wall)
        summary = AttemptSummary(outcome.kind, progressed, a.healthy, a.heartbeat.get("device_batch_size"),
                                 time.monotonic() - a.started)  # fmt: skip
        if self.peers:  # several nodes: this node's outcome as recorded, and the leader's decision for all
            policy = lambda o: decide(o, [*self.history, summary], self.opts.policy, self.batch)  # noqa: E731
            agreed = self.peers.agree(a, outcome, policy)
            outcome, self.agreed = agreed.outcome, agreed.decision
            if self.peers.follower:
                self.stop_code = agreed.exit_code
            summary = dataclasses.replace(summary, kind=agreed.cause or outcome.kind)  # the policy's history: the cause
        self.steps_lost += self.watcher.record(a, outcome, after, progressed)
        return outcome, summary

    def launch_spec(self, log_dir: Path) -> procs.LaunchSpec:
        """The torchrun command of the next attempt: the user's trainer settings, then what the agent adds."""
        plan = Plan(self.attempt_no, self.fresh, self.overrides, self.dir_per_node)
        return launch_spec(self.opts, self.run_dir, plan, log_dir)

    def _summary(self, seconds: float) -> None:
        """The run in a few lines: where it got, how, what it cost, and where everything is."""
        try:
            point = None if self.fresh else resume_point(self.opts)
        except (OSError, checkpoint.CheckpointError):
            point = None
        for line in summary_lines(self.state.value, seconds, point[1] if point else None, self.view, self.opts,
                                  len(self.history), self.steps_lost, self.run_dir.path):  # fmt: skip
            self.display.event(line)

    def _on_notice(self, notice: preempt.Notice) -> None:
        """A preemption notice (the poller's thread): recorded, then a SIGTERM to this supervisor in all but name,
        so the one stop path saves at the current step, flushes the upload and exits 75 (requeue)."""
        step = self.view.step
        if not self.signals:  # first (the record below waits for a disk): a stop under way needs no second one
            self.lifecycle.on_signal(signal.SIGTERM, None)
        self.events.append("preemption_notice", cloud=notice.cloud, action=notice.action, deadline=notice.deadline,
                           seconds_left=round(notice.warning, 1), step=step)  # fmt: skip
        self.display.event(f"preemption notice from {notice.cloud} ({notice.action}) at step {step}: the machine goes"
                           f" in {notice.warning:.0f}s; stopping as on SIGTERM (save, upload, exit 75)")  # fmt: skip

    def _notice_met(self, notice: preempt.Notice) -> None:
        """After a stop on a notice: how long the save (and upload) took against the time the notice gave."""
        took, left = time.time() - notice.seen, notice.deadline - time.time()
        try:
            point = None if self.fresh else resume_point(self.opts)
        except (OSError, checkpoint.CheckpointError):
            point = None
        self.events.append("preemption_saved", cloud=notice.cloud, seconds=round(took, 1),
                           notice_seconds=round(notice.warning, 1), seconds_to_spare=round(left, 1),
                           checkpoint_step=point[1].step if point else None,
                           remote_step=self.view.remote_step if self.opts.remote else None)  # fmt: skip
        verdict = f"{left:.1f}s to spare" if left >= 0 else f"{-left:.1f}s LATE: the machine may have gone mid-save"
        self.display.event(f"preemption: stopped and saved in {took:.1f}s of the notice's {notice.warning:.0f}s"
                           f" ({verdict})")  # fmt: skip

    def _log_of(self, n: int) -> Path:
        return self.run_dir.attempt(n) / "torchrun.log"

    def _check_nodes(self) -> int | None:
        """Several nodes: before anything runs, one shared checkpoint dir, or one per node with a remote."""
        if self.peers is None:
            return None
        code, self.dir_per_node = self.peers.check_dirs()
        return code

    def _check_health(self, n: int) -> int | None:
        """Before attempt `n`: this node's health check (supervisor/health.py). A sick node gives up at once as
        `unhealthy` (a follower tells the leader, which goes on without it or stops the run): the exit code, or
        None when healthy or --no-health-check."""
        if not self.opts.health_check:
            return None
        started = time.monotonic()
        problems = health.check_node(self.opts.checkpoint_dir, [self.run_dir.path], self.opts.device_type,
                                     self.opts.nproc_per_node, self.peak_rss, self.suspect, self.since)  # fmt: skip
        device = self.suspect and health.device_checked(self.opts.device_type)
        self.events.append("health", before_attempt=n, ok=not problems, device=device,
                           seconds=round(time.monotonic() - started, 2),
                           problems=[dataclasses.asdict(p) for p in problems])  # fmt: skip
        if not problems:
            return None
        outcome = Outcome(AttemptClass.UNHEALTHY, "; ".join(p.line() for p in problems))
        if self.peers is not None and self.peers.follower:
            self.peers.leave(n, outcome)
        decision = decide(outcome, self.history, self.opts.policy, self.batch)
        # no attempt of its own (attempt None keeps the numbering): `status` shows the reason as the run's
        self.events.append("decision", attempt=None, action=decision.action.value, reason=decision.reason,
                           delay=0.0, overrides={}, next_attempt=None)  # fmt: skip
        self.lifecycle.set(RunState.FAILED, decision.reason)  # STARTING -> FAILED
        self.display.event(f"diagnosis: unhealthy: {outcome.message}")
        return EXIT_FAILED

    def _wait_for_previous_trainer(self) -> int | None:
        """A trainer of an earlier supervisor (one that died) may still be finishing its save: starting ours now
        would have it clean up that save's temp files mid-write. Wait for its trainer lock; None when clear."""
        holder = lock_holder(self.opts.checkpoint_dir, "trainer")
        if not holder:
            return None
        grace, life = self.opts.grace_period, self.lifecycle
        self.display.event(f"waiting for the previous trainer pid {holder.get('pid')} to finish its save (it holds"
                           f" the trainer lock in {self.opts.checkpoint_dir}; up to {grace:g}s)")  # fmt: skip
        deadline = time.monotonic() + grace
        while (holder := lock_holder(self.opts.checkpoint_dir, "trainer")) and time.monotonic() < deadline:
            if life.sleep(min(1.0, self.opts.tick * 5), self.opts.tick):
                # STARTING -> STOPPED
                life.set(RunState.STOPPED, "stop requested while waiting for the previous trainer")
                return life.stop_code()
        if holder:  # STARTING -> FAILED
            life.set(RunState.FAILED, f"the previous trainer pid {holder.get('pid')} on {holder.get('host')}"
                     f" still holds {self.opts.checkpoint_dir} after --grace-period={grace:g}s; stop it"
                     " and run again")  # fmt: skip
            return EXIT_FAILED
        return None
