"""The supervisor's parts, in-process: restart policy, classification, lock, event log, run states, CLI usage errors.

The end-to-end behaviour with real torchrun processes is in test_supervisor_e2e.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.agent import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, Agent, TrainOptions
from supervisor.classify import Evidence, classify, read_error_files, root_cause
from supervisor.policy import AttemptSummary, Policy, decide
from supervisor.records import LOCK_NAME, Lock, LockError, RunDir, append_event, lock_holder, read_events
from supervisor.states import Action, AttemptClass, Outcome, RunState

REPO_ROOT = Path(__file__).resolve().parents[1]
C = AttemptClass

# ---------------------------------------------------------------------------------------------------------------
# policy


def outcome(kind: AttemptClass, message: str = "boom") -> Outcome:
    return Outcome(kind, message, exitcode=1)


def history(*progressed: bool, kind: AttemptClass = C.CRASH) -> list[AttemptSummary]:
    return [AttemptSummary(kind, p) for p in progressed]


def test_completed_finishes_even_with_no_restarts_left():
    d = decide(outcome(C.COMPLETED), history(False, False, False), Policy(max_restarts=0, max_no_progress=1))
    assert d.action is Action.FINISH and d.delay == 0 and not d.trainer_overrides


def test_stopped_stops_and_never_restarts():
    d = decide(outcome(C.STOPPED), history(True), Policy())
    assert d.action is Action.STOP and not d.trainer_overrides
    d = decide(outcome(C.STOPPED), history(False, False, False, False), Policy(max_restarts=1, max_no_progress=1))
    assert d.action is Action.STOP


@pytest.mark.parametrize("kind", [C.CRASH, C.HOST_OOM, C.HANG, C.SIGNAL, C.NCCL_TIMEOUT, C.CUDA_OOM])
def test_every_failure_class_restarts_with_resume(kind):
    d = decide(outcome(kind), history(True, kind=kind), Policy(backoff=2.0), device_batch_size=4, total_batch_size=512)
    assert d.action is Action.RESTART and d.delay == 2.0
    assert kind.value in d.reason


def test_backoff_doubles_per_attempt_without_progress_and_is_capped():
    policy = Policy(max_restarts=100, max_no_progress=100, backoff=3.0, backoff_cap=20.0)
    delays = [decide(outcome(C.CRASH), history(True, *[False] * n), policy).delay for n in range(7)]
    assert delays == [3.0, 3.0, 6.0, 12.0, 20.0, 20.0, 20.0]
    # progress resets the streak: back to the first delay
    assert decide(outcome(C.CRASH), history(False, False, False, True), policy).delay == 3.0
    assert decide(outcome(C.CRASH), history(True), Policy(backoff=0.0)).delay == 0.0


def test_trainer_usage_exit_gives_up_at_once():
    # exit status 2 from the trainer: bad settings, an incompatible checkpoint, a full disk; a restart cannot help
    bad = Outcome(C.CRASH, "ConfigError: --total_batch_size=100 is not a multiple", exitcode=1, worker_exitcode=2)
    d = decide(bad, history(True), Policy(max_restarts=5, max_no_progress=5))
    assert d.action is Action.GIVE_UP and "ConfigError" in d.reason
    d = decide(Outcome(C.CRASH, "x", exitcode=1, worker_exitcode=1), history(True), Policy())
    assert d.action is Action.RESTART


def test_max_restarts_counts_restarts_after_the_first_attempt():
    policy = Policy(max_restarts=2, max_no_progress=100)
    assert decide(outcome(C.CRASH), history(True), policy).action is Action.RESTART
    assert decide(outcome(C.CRASH), history(True, True), policy).action is Action.RESTART
    d = decide(outcome(C.CRASH, "RuntimeError: x"), history(True, True, True), policy)
    assert d.action is Action.GIVE_UP
    assert "--max-restarts=2" in d.reason and "RuntimeError: x" in d.reason
    d = decide(outcome(C.CRASH), history(True), Policy(max_restarts=0))
    assert d.action is Action.GIVE_UP and "--max-restarts=0" in d.reason


def test_crash_loop_gives_up_after_max_no_progress_attempts():
    policy = Policy(max_restarts=100, max_no_progress=3)
    assert decide(outcome(C.CRASH), history(True, False, False), policy).action is Action.RESTART
    d = decide(outcome(C.CRASH, "ValueError: bad"), history(True, False, False, False), policy)
    assert d.action is Action.GIVE_UP
    assert "crash loop" in d.reason and "--max-no-progress=3" in d.reason and "crash: ValueError: bad" in d.reason
    # progress in between resets the count
    assert decide(outcome(C.CRASH), history(False, False, True, False, False), policy).action is Action.RESTART
    d = decide(outcome(C.HANG), history(False, kind=C.HANG), Policy(max_no_progress=1))
    assert d.action is Action.GIVE_UP and "hang" in d.reason


def test_cuda_oom_halves_the_device_batch_and_pins_the_total():
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), device_batch_size=8, total_batch_size=524288)
    assert d.action is Action.RESTART
    assert d.trainer_overrides == {"device_batch_size": "4", "total_batch_size": "524288"}
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), device_batch_size=3, total_batch_size=None)
    assert d.trainer_overrides == {"device_batch_size": "1"}  # no total known: nothing to pin
    d = decide(outcome(C.CRASH), history(True), Policy(), device_batch_size=8, total_batch_size=512)
    assert d.trainer_overrides == {}  # only a CUDA OOM changes the batch


def test_cuda_oom_at_batch_one_or_unknown_batch_gives_up():
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), device_batch_size=1, total_batch_size=512)
    assert d.action is Action.GIVE_UP and "device_batch_size=1" in d.reason
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), device_batch_size=None, total_batch_size=None)
    assert d.action is Action.GIVE_UP and "unknown" in d.reason


def test_no_oom_shrink_restarts_unchanged():
    policy = Policy(oom_shrink=False)
    d = decide(outcome(C.CUDA_OOM), history(True), policy, device_batch_size=8, total_batch_size=512)
    assert d.action is Action.RESTART and d.trainer_overrides == {}
    d = decide(outcome(C.CUDA_OOM), history(True), policy, device_batch_size=1, total_batch_size=512)
    assert d.action is Action.RESTART and d.trainer_overrides == {}


# ---------------------------------------------------------------------------------------------------------------
# classification over attempt dirs laid out like torchrun's


SEP = "=" * 60
LINE = "-" * 60


def failure_block(rank: int, exitcode: int, error_file: str | None, traceback: str = "") -> str:
    """One entry of torchrun's failure summary, as torch.distributed.elastic prints it."""
    pid = 1000 + rank
    name = signal.Signals(-exitcode).name if exitcode < 0 else ""
    return (
        f"  time      : 2026-01-01_00:00:00\n  host      : localhost\n"
        f"  rank      : {rank} (local_rank: {rank})\n"
        f"  exitcode  : {exitcode} (pid: {pid}) {f' ({name})' if name else ''}\n"
        f"  error_file: {error_file or '<N/A>'}\n"
        f"  traceback : {traceback or f'Signal {-exitcode} ({name}) received by PID {pid}'}\n"
    )


class Attempt:
    """An attempt dir as torchrun leaves it: torchrun.log plus <run id>/attempt_0/<local rank>/error.json."""

    def __init__(self, root: Path):
        self.dir = root / "attempt-001"
        self.ranks = self.dir / "5f0c-run_abc" / "attempt_0"
        self.ranks.mkdir(parents=True)
        self.log = self.dir / "torchrun.log"
        self.log.write_text("[default0]:step 00001/00030 | loss 6.2\n[default0]:step 00002/00030 | loss 6.1\n")

    def error_file(self, rank: int, exc_line: str, timestamp: int = 1700000000, raw: str | None = None) -> str:
        path = self.ranks / str(rank) / "error.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if raw is None:
            stack = f'Traceback (most recent call last):\n  File "scripts/base_train.py", line 1\n{exc_line}\n'
            extra = {"py_callstack": stack, "timestamp": str(timestamp)}
            raw = json.dumps({"message": {"message": exc_line, "extraInfo": extra}})
        path.write_text(raw)
        return str(path)

    def torchrun_failed(self, root: tuple[int, int, str | None], others: list[tuple[int, int, str | None]] = ()):
        """Append torchrun's ChildFailedError summary: other failures first, then the root cause."""
        text = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + SEP + "\n"
        text += "scripts.base_train FAILED\n" + LINE + "\nFailures:\n"
        if not others:
            text += "  <NO_OTHER_FAILURES>\n"
        for i, (rank, code, err) in enumerate(others, 1):
            text += f"[{i}]:\n" + failure_block(rank, code, err, "Traceback (most recent call last):\n  ...")
        text += LINE + "\nRoot Cause (first observed failure):\n[0]:\n"
        text += failure_block(*root, "" if root[1] < 0 else "Traceback (most recent call last):\n  ...")
        text += SEP + "\n"
        with open(self.log, "a") as f:
            f.write(text)

    def evidence(self, exitcode: int | None = 1, **kw) -> Evidence:
        return Evidence(exitcode=exitcode, attempt_log=self.log, log_dir=self.dir, **kw)


PEER_GONE = "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4567"


@pytest.fixture
def att(tmp_path: Path) -> Attempt:
    return Attempt(tmp_path)


def test_sigkilled_worker_with_oom_counter_up_is_host_oom(att):
    # rank 1 notices its peer is gone and leaves an error file; the root cause is rank 0, killed without one
    peer = att.error_file(1, PEER_GONE, timestamp=1700000005)
    att.torchrun_failed(root=(0, -9, None), others=[(1, 1, peer)])
    out = classify(att.evidence(1, oom_kills=1, peak_rss=10, memory_limit=100))
    assert out.kind is C.HOST_OOM
    assert "OOM killer" in out.message and out.evidence == {"oom_kills": 1}
    assert (out.rank, out.worker_exitcode, out.exitcode) == (0, -9, 1)


def test_sigkilled_worker_near_the_memory_limit_is_host_oom(att):
    att.torchrun_failed(root=(1, -9, None))
    out = classify(att.evidence(1, oom_kills=0, peak_rss=95, memory_limit=100))
    assert out.kind is C.HOST_OOM and "95%" in out.message and out.rank == 1
    out = classify(att.evidence(1, oom_kills=0, peak_rss=90, memory_limit=100))
    assert out.kind is C.HOST_OOM  # 90% is the threshold


def test_sigkilled_worker_without_memory_evidence_is_signal(att):
    peer = att.error_file(1, PEER_GONE)
    att.torchrun_failed(root=(0, -9, None), others=[(1, 1, peer)])
    out = classify(att.evidence(1, oom_kills=0, peak_rss=80, memory_limit=100))
    assert out.kind is C.SIGNAL and "SIGKILL" in out.message
    assert (out.rank, out.worker_exitcode) == (0, -9)
    out = classify(att.evidence(1, oom_kills=0, peak_rss=99, memory_limit=0))  # unknown limit: no guess
    assert out.kind is C.SIGNAL


def test_sigkill_wins_when_torchrun_names_the_peer_that_raised_first(att):
    # same-second timestamps: torchrun may name rank 1's "peer gone" as the root cause of rank 0's SIGKILL
    peer = att.error_file(1, PEER_GONE)
    att.torchrun_failed(root=(1, 1, peer), others=[(0, -9, None)])
    out = classify(att.evidence(1, oom_kills=0, peak_rss=10, memory_limit=100))
    assert out.kind is C.SIGNAL and "SIGKILL" in out.message
    assert (out.rank, out.worker_exitcode) == (0, -9)


@pytest.mark.parametrize(("code", "name"), [(-15, "SIGTERM"), (-6, "SIGABRT"), (137, "SIGKILL"), (143, "SIGTERM")])
def test_other_signals_and_shell_style_exit_codes(att, code, name):
    att.torchrun_failed(root=(0, code, None))
    out = classify(att.evidence(1, oom_kills=0))
    assert out.kind is C.SIGNAL and name in out.message


def test_torchrun_itself_killed(att):
    out = classify(att.evidence(-9, oom_kills=0))
    assert out.kind is C.SIGNAL and "SIGKILL" in out.message and out.worker_exitcode is None
    assert classify(att.evidence(-9, oom_kills=2)).kind is C.HOST_OOM


def test_cuda_oom_error_file(att):
    err = att.error_file(0, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    att.torchrun_failed(root=(0, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM
    assert out.message == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert out.error_file == err and out.rank == 0 and out.worker_exitcode == 1


def test_nccl_watchdog_timeout(att):
    msg = (
        "RuntimeError: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"
        " ran for 600000 milliseconds before timing out."
    )
    err = att.error_file(1, msg)
    att.torchrun_failed(root=(1, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.NCCL_TIMEOUT and "Watchdog caught collective operation timeout" in out.message
    assert out.rank == 1


def test_plain_exception_is_a_crash_with_the_exception_line(att):
    err = att.error_file(1, "RuntimeError: debug_fault: injected crash at step 12")
    att.torchrun_failed(root=(1, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.CRASH and out.message == "RuntimeError: debug_fault: injected crash at step 12"
    assert out.error_file == err and out.rank == 1
    assert json.loads(json.dumps(out.to_dict()))["kind"] == "crash"


def test_multiline_exception_message_keeps_its_last_line(att):
    err = att.error_file(0, "ValueError: first line\nmore detail\nKeyError: 'the real one'")
    att.torchrun_failed(root=(0, 1, err))
    assert classify(att.evidence(1)).message == "KeyError: 'the real one'"


def test_root_cause_error_file_wins_over_earlier_ones(att):
    # a consequence can carry an earlier timestamp (clock skew, or a rank that failed on its own first);
    # torchrun's root cause names which file to believe
    att.error_file(0, PEER_GONE, timestamp=1700000000)
    err = att.error_file(1, "OutOfMemoryError: CUDA out of memory", timestamp=1700000009)
    att.torchrun_failed(root=(1, 1, err), others=[(0, 1, str(att.ranks / "0" / "error.json"))])
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM and out.error_file == err


def test_without_a_root_cause_the_earliest_error_file_is_used(att):
    att.error_file(1, PEER_GONE, timestamp=1700000009)
    first = att.error_file(0, "ZeroDivisionError: division by zero", timestamp=1700000001)
    out = classify(att.evidence(1))
    assert out.kind is C.CRASH and out.message == "ZeroDivisionError: division by zero" and out.error_file == first
    assert [e["local_rank"] for e in read_error_files(att.dir)] == [0, 1]


def test_nonzero_exit_without_any_evidence(att):
    out = classify(att.evidence(3))
    assert out.kind is C.CRASH and "status 3" in out.message and "no error file" in out.message


def test_hang(att):
    why = "no progress for --hang-timeout=5s at step 7"
    out = classify(att.evidence(-9, hang=why))
    assert out.kind is C.HANG and out.message == why


def test_stop_requested_is_stopped_whatever_the_exit(att):
    att.error_file(0, "KeyboardInterrupt")
    out = classify(att.evidence(1, stop_requested=True, saved_on_stop=True))
    assert out.kind is C.STOPPED and "saved a checkpoint" in out.message
    out = classify(att.evidence(-9, stop_requested=True, saved_on_stop=False))
    assert out.kind is C.STOPPED and "without a new checkpoint" in out.message


def test_budget_reached_is_completed(att):
    assert classify(att.evidence(0, budget_reached=True)).kind is C.COMPLETED
    # Ctrl+C arriving after the final save: the run is still done
    assert classify(att.evidence(1, budget_reached=True, stop_requested=True)).kind is C.COMPLETED
    out = classify(att.evidence(0, budget_reached=False))
    assert out.kind is C.CRASH and "before the step budget" in out.message


def test_root_cause_parser(att):
    att.torchrun_failed(root=(1, -9, None), others=[(0, -15, "/x/0/error.json")])
    assert root_cause(att.log) == {"rank": 1, "exitcode": -9}
    att.torchrun_failed(root=(0, 1, "/x/0/error.json"))  # a later summary (torchrun printed twice): the last wins
    assert root_cause(att.log) == {"rank": 0, "exitcode": 1, "error_file": "/x/0/error.json"}
    assert root_cause(att.dir / "missing.log") == {}


GARBAGE_ERROR_FILES = [
    "",
    "not json",
    "[1, 2, 3]",
    '"a string"',
    "42",
    '{"message": 5}',
    '{"message": {"message": 5}}',
    '{"message": {"message": "x", "extraInfo": []}}',
    '{"message": {"message": "x", "extraInfo": {"timestamp": [1]}}}',
    '{"message": {"message": "x", "extraInfo": {"timestamp": "soon"}}}',
    '{"message": null}',
    "\x00\xff\xfe garbage",
]


@pytest.mark.parametrize("raw", GARBAGE_ERROR_FILES)
def test_classify_never_raises_on_garbage_error_files(att, raw):
    att.error_file(0, "", raw=raw)
    att.torchrun_failed(root=(0, 1, str(att.ranks / "0" / "error.json")))
    out = classify(att.evidence(1))
    assert isinstance(out, Outcome) and out.kind is C.CRASH and out.message


@pytest.mark.parametrize("raw", GARBAGE_ERROR_FILES)
def test_a_garbage_error_file_does_not_hide_a_good_one(att, raw):
    att.error_file(0, "", raw=raw)
    att.error_file(1, "OutOfMemoryError: CUDA out of memory")
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM, out


def test_classify_never_raises_on_garbage_logs(tmp_path):
    rng = random.Random(0)
    (tmp_path / "dir.log").mkdir()
    logs = [tmp_path / "missing.log", tmp_path / "dir.log", tmp_path / "bin.log", tmp_path / "half.log"]
    logs[2].write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    logs[3].write_text("Root Cause (first observed failure):\n[0]:\n  rank      : x\n  exitcode  : -\n  error_file:")
    log_dirs = [tmp_path / "missing", tmp_path / "bin.log", tmp_path]
    for log in logs:
        for log_dir in log_dirs:
            for code in (None, 0, 1, -9, 137, 255, -1000, 10**6):
                for kw in ({}, {"oom_kills": 3}, {"peak_rss": 10, "memory_limit": 10}, {"memory_limit": -1}):
                    out = classify(Evidence(exitcode=code, attempt_log=log, log_dir=log_dir, **kw))
                    assert isinstance(out, Outcome) and isinstance(out.kind, AttemptClass) and out.message
    # wrong types altogether still come back as an Outcome
    out = classify(Evidence(exitcode="?", attempt_log=None, log_dir=None))  # type: ignore[arg-type]
    assert out.kind is C.CRASH and "unclassifiable" in out.message


# ---------------------------------------------------------------------------------------------------------------
# lock


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from supervisor.records import Lock
    Lock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def hold_lock_in_child(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_acquire_writes_our_pid_and_release_clears_it(tmp_path):
    lock = Lock(tmp_path / "ckpt")
    assert lock.acquire() == ""  # the directory is created, nothing to take over
    info = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"] > 0
    holder = lock_holder(tmp_path / "ckpt")  # another open file description: flock conflicts even in-process
    assert holder["pid"] == os.getpid() and holder["alive"] is True
    lock.release()
    assert (tmp_path / "ckpt" / LOCK_NAME).read_text() == ""
    assert lock_holder(tmp_path / "ckpt") is None
    assert Lock(tmp_path / "ckpt").acquire() == ""  # a cleanly released lock is not "stale"


def test_lock_contention_names_the_holder_and_stale_lock_is_taken_over(tmp_path):
    proc = hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(LockError, match=rf"another supervisor \(pid {proc.pid} on .*\) is driving"):
            Lock(tmp_path).acquire()
        holder = lock_holder(tmp_path)
        assert holder["pid"] == proc.pid and holder["alive"] is True
    finally:
        proc.kill()  # dies holding the lock: the kernel drops the flock, the file still names it
        proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    assert lock_holder(tmp_path) is None
    lock = Lock(tmp_path)
    msg = lock.acquire()
    assert msg == f"took over a stale lock from pid {proc.pid} (no longer running)"
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_file_with_garbage_is_taken_quietly(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    lock = Lock(tmp_path)
    assert lock.acquire() == ""
    lock.release()


# ---------------------------------------------------------------------------------------------------------------
# event log


def test_event_log_tolerates_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path / "run")
    append_event(run, "run_start", pid=1)
    append_event(run, "attempt_start", attempt=1, cmd=["a", "b"])
    with open(run.events, "a") as f:
        f.write('{"event": "attempt_end", "attem')  # the supervisor was killed mid-write
    events = read_events(run)
    assert [e["event"] for e in events] == ["run_start", "attempt_start"]
    assert events[1]["cmd"] == ["a", "b"] and events[0]["time"] > 0
    # the next supervisor on this run dir appends after the torn line without losing its own event
    append_event(run, "run_start", pid=2)
    assert [(e["event"], e.get("pid")) for e in read_events(run)][-1] == ("run_start", 2)
    assert read_events(RunDir(tmp_path / "nothing")) == []


def test_event_log_skips_undecodable_bytes(tmp_path):
    run = RunDir(tmp_path)
    append_event(run, "a")
    with open(run.events, "ab") as f:
        f.write(b"\xff\xfe\x00\n")
    append_event(run, "b")
    assert [e["event"] for e in read_events(run)] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# run states and the loop around decide()


class Recorder:
    def __init__(self):
        self.lines: list[str] = []

    def event(self, msg: str) -> None:
        self.lines.append(msg)

    def update(self, view) -> None:
        pass

    def close(self) -> None:
        pass


def make_agent(tmp_path: Path, **policy) -> Agent:
    opts = TrainOptions("scripts.base_train", [], tmp_path / "ckpt", tmp_path / "run", policy=Policy(**policy))
    return Agent(opts, Recorder())


def test_state_diagram_names_every_state():
    doc = RunState.__doc__
    for state in RunState:
        assert state.name in doc
    assert {s for s in RunState if s.final} == {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED}
    assert {s for s in RunState if s.running} == {RunState.STARTING, RunState.HEALTHY}


@pytest.mark.parametrize("final", [RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED])
def test_a_final_state_never_changes(tmp_path, final):
    agent = make_agent(tmp_path)
    agent._set_state(RunState.HEALTHY, "training")
    agent._set_state(final, "done")
    assert agent.state is final and agent.view.state == final.value
    for new in RunState:
        with pytest.raises(AssertionError, match="a final state never changes"):
            agent._set_state(new)
        assert agent.state is final


def test_state_changes_are_reported(tmp_path):
    agent = make_agent(tmp_path)
    agent._set_state(RunState.HEALTHY, "training at step 1")
    agent._set_state(RunState.HEALTHY)  # no change, no line
    agent._set_state(RunState.STOPPING)
    assert agent.display.lines == ["starting -> healthy: training at step 1", "healthy -> stopping"]


def scripted(agent: Agent, results: list[tuple[Outcome, bool]], on_attempt=None):
    calls = []

    def fake_attempt(n: int):
        calls.append(n)
        if on_attempt:
            on_attempt(n)
        return results[n - 1]

    agent._attempt = fake_attempt
    return calls


def states_seen(agent: Agent) -> list[str]:
    return [line for line in agent.display.lines if " -> " in line]


def test_loop_restarts_then_succeeds(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    calls = scripted(agent, [(outcome(C.CRASH), True), (outcome(C.COMPLETED), True)])
    assert agent._loop() == EXIT_OK
    assert calls == [1, 2] and agent.state is RunState.SUCCEEDED
    assert [s.split(":")[0] for s in states_seen(agent)] == [
        "starting -> backoff", "backoff -> starting", "starting -> succeeded"]  # fmt: skip
    decisions = [e for e in read_events(agent.run_dir) if e["event"] == "decision"]
    assert [d["action"] for d in decisions] == ["restart", "finish"]


def test_loop_gives_up_with_a_diagnosis(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0, max_no_progress=2)
    scripted(agent, [(outcome(C.CRASH, "ValueError: v"), False)] * 2)
    assert agent._loop() == EXIT_FAILED and agent.state is RunState.FAILED
    diagnosis = [line for line in agent.display.lines if line.startswith("diagnosis:")]
    assert diagnosis == [f"diagnosis: crash: ValueError: v; read {tmp_path / 'run' / 'attempt-002'}/torchrun.log"]


def test_loop_gives_up_at_once_when_the_trainer_rejects_its_settings(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    bad = Outcome(C.CRASH, "ConfigError: --total_batch_size=100 is not a multiple", exitcode=1, worker_exitcode=2)
    calls = scripted(agent, [(bad, False)])
    assert agent._loop() == EXIT_FAILED and calls == [1]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED)])
def test_loop_stop_exit_codes(tmp_path, sig, code):
    agent = make_agent(tmp_path)
    agent.signals.append(sig)
    scripted(agent, [(outcome(C.STOPPED), True)])
    assert agent._loop() == code and agent.state is RunState.STOPPED


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED)])
def test_a_signal_during_backoff_stops_without_another_attempt(tmp_path, sig, code):
    agent = make_agent(tmp_path, backoff=60.0)
    calls = scripted(agent, [(outcome(C.CRASH), True)] * 2, on_attempt=lambda n: agent.signals.append(sig))
    assert agent._loop() == code
    assert calls == [1] and agent.state is RunState.STOPPED


def test_loop_passes_the_cuda_oom_overrides_to_the_next_attempt(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    agent.batch = (8, 4096)
    scripted(agent, [(outcome(C.CUDA_OOM), True), (outcome(C.COMPLETED), True)])
    assert agent._loop() == EXIT_OK
    assert agent.overrides == {"device_batch_size": "4", "total_batch_size": "4096"}


# ---------------------------------------------------------------------------------------------------------------
# CLI usage errors: one line on stderr, exit 2, no traceback


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["nanochat-run", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("nanochat-run: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def empty_ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("no checkpoints here\n")
    return d


USAGE_CASES = {
    "unknown flag": (["train", "--bogus-flag"], ["--bogus-flag"]),
    "unknown command": (["frobnicate"], ["frobnicate"]),
    "negative max-restarts": (["train", "--max-restarts", "-1"], ["--max-restarts must be >= 0"]),
    "zero max-no-progress": (["train", "--max-no-progress", "0"], ["--max-no-progress must be >= 1"]),
    "negative hang-timeout": (["train", "--hang-timeout", "-5"], ["--hang-timeout must be >= 0"]),
    "not a number": (["train", "--max-restarts", "many"], ["--max-restarts"]),
    "keep 0": (["prune", "--keep", "0", "--checkpoint-dir", "{tmp}"], ["--keep must be >= 1"]),
    "missing dir (prune)": (["prune", "--checkpoint-dir", "{tmp}/nope"], ["no checkpoint dir at", "nope"]),
    "missing dir (status)": (["status", "--checkpoint-dir", "{tmp}/nope"], ["no checkpoint dir at", "nope"]),
    "no checkpoints": (["prune", "--keep", "1", "--checkpoint-dir", "{ckpt}"], ["no checkpoints in", "nothing"]),
    "bad trainer setting": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--depth=0"], ["--depth must be >= 1"]),
    "unknown trainer setting": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--detph=2"], ["did you mean --depth"]),
    "bad fault spec": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--debug_fault=boom"], ["not a fault spec"]),
    "bad trainer value": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--save_every=x"], ["trainer setting"]),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_cli_usage_errors(monkeypatch, capsys, tmp_path, empty_ckpt, case):
    args, needles = USAGE_CASES[case]
    args = [a.format(tmp=tmp_path, ckpt=empty_ckpt) for a in args]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert_usage_error(code, err, *needles)
    assert not (tmp_path / "c").exists()  # a rejected run leaves nothing behind
    assert not (tmp_path / "c.run").exists()


def test_cli_usage_error_from_the_real_console_script(tmp_path, env):
    script = Path(sys.executable).with_name("nanochat-run")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]
    proc = subprocess.run([*cmd, "train", "--max-restarts", "-1"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert_usage_error(proc.returncode, proc.stderr, "--max-restarts must be >= 0")
    proc = subprocess.run([*cmd, "prune", "--keep", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert_usage_error(proc.returncode, proc.stderr, "--keep must be >= 1")


def test_cli_status_of_an_empty_checkpoint_dir(monkeypatch, capsys, empty_ckpt):
    code, out, err = run_cli(monkeypatch, capsys, "status", "--json", "--checkpoint-dir", str(empty_ckpt))
    assert code == 0, err
    info = json.loads(out)
    assert info["checkpoints"] == [] and info["newest_valid_step"] is None and info["complete"] is False
    assert info["attempts"] == [] and info["supervisor"] is None
    assert info["run_dir"] == str(empty_ckpt.resolve().with_name("ckpt.run"))
