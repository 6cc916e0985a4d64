"""Several nodes, one run: `nanochat-run train --nnodes N --node-rank K --rdzv-endpoint HOST:PORT` on every node.

One supervisor per node. The leader (node rank 0) makes every decision: restart or not, the backoff, a smaller
batch after an OOM, give up, stop. The followers carry them out and never decide alone, so every node starts each
attempt together, with the same settings, and a fresh rendezvous.

The channel is a torch.distributed.TCPStore that the leader's supervisor hosts at the rendezvous host's port + 1
for the whole run, across attempts. It is what torchrun's own c10d rendezvous is built on, needs no shared
filesystem, and outlives every attempt's workers. Keys, each a JSON value:

    dirs/...                 at start: who sees whose token file in its checkpoint dir, and the leader's verdict
    latest                   the leader: the number of the newest attempt it started
    attempt/<n>/go           the leader: launch attempt n, with these trainer overrides and this --resume
    attempt/<n>/end/<node>   every node: how attempt n ended there (class, message, when its first worker failed)
    attempt/<n>/decision     the leader: restart | finish | stop | give_up, why, the delay, the root-cause node

The root cause of a failed attempt is the node whose first worker failed first (by wall clock: the nodes of a run
are NTP-synced machines, and the gap between the first failure and its echo on the other nodes is seconds); it
names the class the policy acts on, and the other nodes record peer_failure. A node that fails its health check
before an attempt (supervisor/health.py) reports `unhealthy` for it and exits: the leader goes on without it while
--nnodes MIN allows, else gives up naming it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from nanochat import checkpoint, safefile
from supervisor.launch import UsageProblem, split_endpoint
from supervisor.states import Action, AttemptClass, Decision, Outcome

CONNECT_TIMEOUT = 600.0  # seconds a follower waits for the leader's store (the leader may start later)
ACK_TIMEOUT = 30.0  # seconds the leader waits, before it exits, for the followers to read its last decision


class LeaderLost(Exception):
    """A follower cannot reach the leader's store any more: the leader's supervisor (or its machine) is gone."""


@dataclass
class Coordinator:
    node: int
    members: list[int]  # the node ranks that take part (all of --nnodes at first; fewer after one is lost)
    store: object  # torch.distributed.TCPStore
    min_nodes: int = 0  # --nnodes MIN:MAX: the run goes on while at least MIN nodes are left (0: all of them)
    tick: float = 0.2

    @classmethod
    def connect(cls, node: int, nodes: int, rdzv_endpoint: str, min_nodes: int = 0) -> Coordinator:
        from torch.distributed import TCPStore

        host, port = split_endpoint(rdzv_endpoint)
        try:
            store = TCPStore(host, port + 1, is_master=node == 0, timeout=timedelta(seconds=CONNECT_TIMEOUT),
                             wait_for_workers=False, multi_tenant=False)  # fmt: skip
        except RuntimeError as e:  # the port is taken (leader), or no leader there within the timeout (follower)
            where = f"{host}:{port + 1}, the rendezvous port + 1"
            what = "host" if node == 0 else f"reach within {CONNECT_TIMEOUT:g}s"
            raise UsageProblem(f"cannot {what} the supervisors' channel at {where} ({str(e).splitlines()[0][:160]});"
                               " free that port on node 0, or start node 0") from None  # fmt: skip
        return cls(node, list(range(nodes)), store, min_nodes or nodes)

    @property
    def leader(self) -> bool:
        return self.node == 0

    # ---- the store, as JSON --------------------------------------------------------------------------------

    def _set(self, key: str, value) -> None:
        try:
            self.store.set(key, json.dumps(value))
        except RuntimeError as e:  # the store's host is gone
            raise LeaderLost(f"the leader's supervisor cannot be reached ({str(e).splitlines()[0][:200]})") from e

    def _get(self, key: str, stop: Callable[[], bool], timeout: float | None = None):
        """The value at `key` once it is there; None if `stop()` turns true or `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self.store.check([key]):
                    return json.loads(self.store.get(key))
            except RuntimeError as e:  # the store's host is gone
                raise LeaderLost(f"the leader's supervisor cannot be reached ({str(e).splitlines()[0][:200]})") from e
            if stop() or (deadline is not None and time.monotonic() > deadline):
                return None
            time.sleep(self.tick)

    # ---- before the first attempt: does every node see the same checkpoint dir? -----------------------------

    def check_dirs(self, directory: Path, remote: bool, timeout: float) -> tuple[str, bool]:
        """(why the run cannot start, or ''; whether every node has its own dir). Every node writes a token file
        into its checkpoint dir and says whose tokens it sees there: all of them (one shared dir: the usual
        case), only its own (a dir per node: allowed with --remote-dir, see nanochat/node_dirs.py), or anything
        else (some nodes share a dir, some do not: refused)."""
        if self.leader:
            self._set("dirs/token", secrets.token_hex(6))
        token = self._get("dirs/token", lambda: False, timeout)
        if token is None:
            return f"the leader's supervisor did not answer within --node-timeout={timeout:g}s", False
        mine, problem = directory / f".nodes-{token}-{self.node}", None
        try:
            checkpoint.make_dir(directory)
            note = "written by nanochat-run at start: does every node see this checkpoint dir?\n"
            safefile.write_text(mine, note, durable=False)  # never through a link planted at the name
        except OSError as e:
            problem = f"node {self.node} cannot write to {directory} ({e.strerror or e}): fix it, or pick another dir"
        self._set(f"dirs/wrote/{self.node}", True)
        deadline = time.monotonic() + timeout
        for k in self.members:  # every token is written before any node looks
            self._get(f"dirs/wrote/{k}", lambda: False, max(0.0, deadline - time.monotonic()))
        seen = problem or [k for k in self.members if (directory / f".nodes-{token}-{k}").exists()]
        self._set(f"dirs/seen/{self.node}", seen)
        if self.leader:
            seen = {k: self._get(f"dirs/seen/{k}", lambda: False, max(0.0, deadline - time.monotonic()))
                    for k in self.members}  # fmt: skip
            self._set("dirs/verdict", dirs_verdict(seen, self.members, directory, remote))
        verdict = self._get("dirs/verdict", lambda: False, max(0.0, deadline - time.monotonic()))
        mine.unlink(missing_ok=True)
        self._set(f"dirs/ack/{self.node}", True)
        if self.leader:  # read by every follower before the leader (and its store) may go
            for k in self.members[1:]:
                self._get(f"dirs/ack/{k}", lambda: False, ACK_TIMEOUT)
        if verdict is None:
            return f"the leader's supervisor did not answer within --node-timeout={timeout:g}s", False
        return verdict["why"], verdict["per_node"]

    def go(self, n: int, overrides: dict, fresh: bool) -> None:
        """The leader: every node launches attempt `n` now."""
        self._set(f"attempt/{n}/go", {"overrides": overrides, "fresh": fresh})
        self._set("latest", n)

    def wait_go(self, after: int, stop: Callable[[], bool]) -> tuple[int, dict, bool] | None:
        """A follower: the next attempt the leader starts (number, overrides, fresh); None on a stop."""
        while True:
            n = self._get("latest", stop)
            if n is None:
                return None
            if n > after:
                go = self._get(f"attempt/{n}/go", stop)
                return None if go is None else (n, go["overrides"], go["fresh"])
            time.sleep(self.tick)

    def report(self, n: int, outcome: Outcome, failed_at: float | None) -> None:
        """Every node: how attempt `n` ended here."""
        self._set(f"attempt/{n}/end/{self.node}", {"class": outcome.kind.value, "message": outcome.message,
                                                   "failed_at": failed_at})  # fmt: skip

    def gather(self, n: int, timeout: float, stop: Callable[[], bool], waiting: Callable[[list[int]], None]
               ) -> dict[int, dict | None]:  # fmt: skip
        """The leader: every node's end of attempt `n`, waiting up to `timeout` for each (None: it never came);
        told `waiting(nodes)` once if some have not reported after a few seconds."""
        deadline, ends = time.monotonic() + timeout, {}
        for k in self.members:
            ends[k] = self._get(f"attempt/{n}/end/{k}", stop, min(3.0, max(0.0, deadline - time.monotonic())))
        if late := [k for k, end in ends.items() if end is None]:
            waiting(late)
            for k in late:
                ends[k] = self._get(f"attempt/{n}/end/{k}", stop, max(0.0, deadline - time.monotonic()))
        return ends

    def decide(self, n: int, decision: Decision, root: int, exit_code: int | None) -> None:
        self._set(f"attempt/{n}/decision", {"action": decision.action.value, "reason": decision.reason,
                                            "delay": decision.delay, "overrides": decision.trainer_overrides,
                                            "root": root, "exit_code": exit_code})  # fmt: skip

    def decide_for_all(self, n: int, ends: dict[int, dict | None], policy: Callable[[Outcome], Decision],
                       stopped: bool, node_timeout: float) -> tuple[Decision, int, AttemptClass | None]:  # fmt: skip
        """The leader: the decision on attempt `n` for every node, the root-cause node and its class (what the
        policy's history keeps for this attempt; None on a stop). The policy acts on the
        root cause's class; a stop asked on the leader stops all; a node that never reported is lost: the run goes
        on without it while --nnodes MIN allows (it is dropped from `members`), else it gives up naming it."""
        if stopped:  # the user stopped the run on the leader: every node's workers have saved; stop them all
            return Decision(Action.STOP, "stopped on request (on the leader)"), self.node, None
        # a node that failed its health check has left the run (supervisor/health.py): go on without it while
        # --nnodes MIN allows, else stop naming it
        sick = {k: e for k, e in ends.items() if e is not None and e["class"] == AttemptClass.UNHEALTHY.value}
        if sick:
            named = "; ".join(f"node {k} is unhealthy: {e['message']}" for k, e in sick.items())
            self.members = [k for k in self.members if k not in sick]  # gone: no ack to wait for
            if len(self.members) < self.min_nodes:
                return Decision(Action.GIVE_UP, f"{named} (--nnodes allows no fewer than {self.min_nodes})"), \
                    min(sick), AttemptClass.UNHEALTHY  # fmt: skip
            ends = {k: e for k, e in ends.items() if k not in sick}
        root, end = root_cause(ends)
        cause = as_outcome(end, root)
        decision = policy(cause)
        if sick:
            decision = dataclasses.replace(decision, reason=f"{named}: going on with {len(self.members)} node(s);"
                                           f" {decision.reason}")  # fmt: skip
        if lost := [k for k, e in ends.items() if e is None]:
            silent = f"node(s) {lost} did not report the end of attempt {n} within --node-timeout={node_timeout:g}s"
            left = [k for k in self.members if k not in lost]
            if len(left) < self.min_nodes or decision.action is not Action.RESTART:
                return Decision(Action.GIVE_UP, silent), root, cause.kind
            self.members = left
            return (
                dataclasses.replace(decision, reason=f"{silent}: going on with {len(left)} node(s)"),
                root,
                cause.kind,
            )
        return decision, root, cause.kind

    def wait_decision(self, n: int, stop: Callable[[], bool]) -> dict | None:
        """A follower: the leader's decision on attempt `n` (acknowledged, so the leader may exit after it)."""
        record = self._get(f"attempt/{n}/decision", stop)
        self._set(f"attempt/{n}/ack/{self.node}", True)
        return record

    def wait_acks(self, n: int, timeout: float) -> None:
        """The leader, before it exits: every follower has read the last decision (its store dies with it)."""
        deadline = time.monotonic() + timeout
        for k in self.members[1:]:
            self._get(f"attempt/{n}/ack/{k}", lambda: False, max(0.0, deadline - time.monotonic()))


def dirs_verdict(seen: dict[int, list | None], members: list[int], directory: Path, remote: bool) -> dict:
    """The leader: from whose tokens each node sees in its checkpoint dir, one shared dir, a dir per node, or a
    refusal (one line naming the fix). A node's entry is the nodes it sees, None if it never answered, or why it
    could not look."""
    if problems := [s for s in seen.values() if isinstance(s, str)]:
        return {"why": problems[0], "per_node": False}
    if silent := [k for k, s in seen.items() if s is None]:
        return {"why": f"node(s) {silent} did not answer the start-up check of the checkpoint dirs within"
                       " --node-timeout: start every node's supervisor", "per_node": False}  # fmt: skip
    if all(s == members for s in seen.values()):
        return {"why": "", "per_node": False}
    if all(s == [k] for k, s in seen.items()):
        if remote:
            return {"why": "", "per_node": True}
        why = (f"node(s) {members[1:]} do not see node 0's checkpoint dir {directory}: put it on storage every node"
               " mounts at the same path (NFS, Lustre, ...), or add --remote-dir (then each node keeps its own copy"
               " of every checkpoint, and a node on a new machine restores from the remote)")  # fmt: skip
        return {"why": why, "per_node": False}
    groups = sorted({tuple(s) for s in seen.values()})
    why = (f"the nodes see {len(groups)} different checkpoint dirs at {directory} ({', '.join(map(str, groups))}):"
           " give every node the same shared dir, or every node its own")  # fmt: skip
    return {"why": why, "per_node": False}


def root_cause(ends: dict[int, dict | None]) -> tuple[int, dict]:
    """The node whose attempt failed first, and its end. A node that never reported counts as failed at the
    start (lost with its machine); when no node failed (all completed, or all stopped), node 0's end."""
    failed = {k: e for k, e in ends.items() if e is None or e["class"] not in (AttemptClass.COMPLETED.value,
                                                                               AttemptClass.STOPPED.value)}  # fmt: skip
    if not failed:
        return 0, ends[0] or {"class": AttemptClass.COMPLETED.value, "message": "", "failed_at": None}
    lost = [k for k, e in failed.items() if e is None]
    if lost:
        return lost[0], {"class": AttemptClass.SIGNAL.value, "message": f"node {lost[0]} never reported the end of"
                         " the attempt (its supervisor or machine is gone)", "failed_at": None}  # fmt: skip
    known = [
        k for k, e in failed.items() if e["failed_at"] is not None and e["class"] != AttemptClass.PEER_FAILURE.value
    ]
    k = min(known, key=lambda k: failed[k]["failed_at"]) if known else min(failed)
    return k, failed[k]


def as_outcome(end: dict, node: int) -> Outcome:
    """A node's reported end, as the Outcome the policy decides on."""
    return Outcome(AttemptClass(end["class"]), f"node {node}: {end['message']}")


def as_recorded(outcome: Outcome, decision: Decision, root: int | None, node: int) -> Outcome:
    """This node's outcome as its event log keeps it: stopped, when the leader stopped the run (our workers saved
    with the others); peer_failure, when another node failed first."""
    if outcome.kind in (AttemptClass.COMPLETED, AttemptClass.STOPPED):
        return outcome
    if decision.action is Action.STOP:
        return dataclasses.replace(outcome, kind=AttemptClass.STOPPED, message=f"stopped with node {root}:"
                                   f" {outcome.message}")  # fmt: skip
    if root is not None and root != node:
        return dataclasses.replace(outcome, kind=AttemptClass.PEER_FAILURE, message=f"node {root} failed first;"
                                   f" here: {outcome.message}")  # fmt: skip
    return outcome


def decision_of(record: dict) -> Decision:
    return Decision(Action(record["action"]), record["reason"], record["delay"], record["overrides"])
