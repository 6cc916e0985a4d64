"""This node's part in a multi-node run: check the checkpoint dirs before the first attempt, wait for the
leader's go (a follower), and agree on how each attempt ended and what comes next. The channel and the rules
(who is the root cause, how a lost node counts) are supervisor/nodes.py's; the run's state changes here go
through the shared `Lifecycle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.attempt import Attempt
from supervisor.launch import TrainOptions
from supervisor.lifecycle import EXIT_FAILED, EXIT_USAGE, Lifecycle
from supervisor.nodes import ACK_TIMEOUT, Coordinator, LeaderLost, as_recorded, decision_of
from supervisor.states import Action, AttemptClass, Decision, Outcome, RunState


@dataclass(frozen=True)
class Agreed:
    """What the nodes agreed on an attempt that ended."""

    outcome: Outcome  # this node's, as recorded: peer_failure when another node failed first
    decision: Decision  # the leader's, for every node
    cause: AttemptClass | None  # the root cause's class (on the leader; None on a follower or a stop)
    exit_code: int | None  # a follower: the exit code the leader's stop decision carries


class Peers:
    def __init__(self, nodes: Coordinator, opts: TrainOptions, lifecycle: Lifecycle):
        self.nodes, self.opts, self.lifecycle = nodes, opts, lifecycle

    @property
    def follower(self) -> bool:
        return not self.nodes.leader

    def check_dirs(self) -> tuple[int | None, bool]:
        """Before anything runs: one shared checkpoint dir, or one per node with a remote. (The exit code if the
        run cannot start, else None; whether every node has its own dir.)"""
        opts, dir_per_node = self.opts, False
        try:
            why, dir_per_node = self.nodes.check_dirs(opts.checkpoint_dir, opts.remote, opts.node_timeout)
        except LeaderLost as e:
            why = str(e)
        if not why:
            if dir_per_node:
                self.lifecycle.display.event(
                    "every node has its own checkpoint dir: each keeps a copy of every checkpoint"
                )
            return None, dir_per_node
        self.lifecycle.set(RunState.FAILED, why)
        return EXIT_USAGE, dir_per_node

    def go(self, n: int, overrides: dict[str, str], fresh: bool) -> None:
        """The leader: every node launches attempt `n` now."""
        self.nodes.go(n, overrides, fresh)

    def wait_for_go(self, after: int) -> tuple[int, dict[str, str], bool] | int:
        """A follower: the next attempt the leader starts (its number, overrides and --resume become ours), or
        the exit code if we are stopped meanwhile or the leader is gone."""
        life = self.lifecycle
        try:
            got = self.nodes.wait_go(after, lambda: life.stop_requested)
        except LeaderLost as e:
            life.set(RunState.FAILED, str(e))
            return EXIT_FAILED
        if got is None:
            life.set(RunState.STOPPED, "stop requested while waiting for the leader")
            return life.stop_code()
        return got

    def leave(self, n: int, outcome: Outcome) -> None:
        """A follower that cannot take part in attempt `n` (it failed its health check): tell the leader why, so it
        goes on without this node or stops the run naming it (supervisor/nodes.py)."""
        try:
            self.nodes.report(n, outcome, time.time())
        except LeaderLost:
            pass  # the leader is gone too: nobody is left to tell

    def agree(self, a: Attempt, outcome: Outcome, policy: Callable[[Outcome], Decision]) -> Agreed:
        """A multi-node attempt has ended here: tell the leader how; the leader hears every node, finds the root
        cause and decides for all with `policy` (supervisor/nodes.py)."""
        nodes, life, stop = self.nodes, self.lifecycle, lambda: False
        node_timeout = self.opts.node_timeout
        nodes.report(a.n, outcome, a.worker_died_at or a.exited_at)
        exit_code = None
        if nodes.leader:
            waiting = lambda late: life.display.event(  # noqa: E731
                f"attempt {a.n} ended here; waiting up to --node-timeout={node_timeout:g}s for node(s)"
                f" {late} to report how it ended there (a node that never does is lost)")  # fmt: skip
            ends = nodes.gather(a.n, node_timeout, stop, waiting)
            decision, root, cause = nodes.decide_for_all(a.n, ends, policy, life.stop_requested, node_timeout)
            code = life.stop_code() if decision.action is Action.STOP and life.stop_requested else None
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
            exit_code = record.get("exit_code")
        return Agreed(as_recorded(outcome, decision, root, nodes.node), decision, cause, exit_code)
