"""The supervisor's parts, in-process: restart policy, lock, event log, run states, the CLI's contract.

Classification is in test_supervisor_classify.py, process handling against a stand-in torchrun in
test_supervisor_procs.py, and the end-to-end behaviour with real torchrun in test_supervisor_e2e.py and
test_supervisor_chaos.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from nanochat.locks import LOCKS, DirLock, LockError, lock_holder
from supervisor import cli, report
from supervisor.agent import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    Agent,
    TrainOptions,
)
from supervisor.attempt import hang_reason, judge, resume_point
from supervisor.launch import Supervision, resolve, train_options
from supervisor.policy import AttemptSummary, Batch, Policy, decide, observed_mtbf, smaller_batch
from supervisor.records import RunDir, append_event, read_events
from supervisor.states import Action, AttemptClass, Outcome, RunState
from tests.helpers import Recorder, assert_usage_error, run_cli, save

REPO_ROOT = Path(__file__).resolve().parents[1]
C = AttemptClass
LOCK_NAME = LOCKS["supervisor"]

# ---------------------------------------------------------------------------------------------------------------
# policy


def outcome(kind: AttemptClass, message: str = "boom") -> Outcome:
    return Outcome(kind, message, exitcode=1)


def history(*progressed: bool, kind: AttemptClass = C.CRASH, healthy: bool = False) -> list[AttemptSummary]:
    return [AttemptSummary(kind, p, healthy) for p in progressed]


def test_completed_finishes_even_with_no_restarts_left():
    d = decide(outcome(C.COMPLETED), history(False, False, False), Policy(max_restarts=0, max_no_progress=1))
    assert d.action is Action.FINISH and d.delay == 0 and not d.trainer_overrides


def test_stopped_stops_and_never_restarts():
    d = decide(outcome(C.STOPPED), history(True), Policy())
    assert d.action is Action.STOP and not d.trainer_overrides
    d = decide(outcome(C.STOPPED), history(False, False, False, False), Policy(max_restarts=1, max_no_progress=1))
    assert d.action is Action.STOP


@pytest.mark.parametrize("kind", [C.CRASH, C.STORAGE, C.HOST_OOM, C.HANG, C.SIGNAL, C.NCCL_TIMEOUT, C.CUDA_OOM])
def test_every_failure_class_restarts_with_resume(kind):
    d = decide(outcome(kind), history(True, kind=kind), Policy(backoff=2.0), Batch(4, 512))
    assert d.action is Action.RESTART and d.delay == 2.0
    assert kind.value in d.reason


def test_backoff_doubles_per_attempt_without_progress_and_is_capped():
    policy = Policy(max_restarts=100, max_no_progress=100, backoff=3.0, backoff_cap=20.0)
    delays = [decide(outcome(C.CRASH), history(True, *[False] * n), policy).delay for n in range(7)]
    assert delays == [3.0, 3.0, 6.0, 12.0, 20.0, 20.0, 20.0]
    # progress resets the streak: back to the first delay
    assert decide(outcome(C.CRASH), history(False, False, False, True), policy).delay == 3.0
    assert decide(outcome(C.CRASH), history(True), Policy(backoff=0.0)).delay == 0.0


def test_refused_gives_up_at_once():
    # exit status 2 from the trainer: bad settings or an incompatible checkpoint; a restart cannot help
    bad = Outcome(C.REFUSED, "ConfigError: --total_batch_size=100 is not a multiple", exitcode=1, worker_exitcode=2)
    d = decide(bad, history(True), Policy(max_restarts=5, max_no_progress=5))
    assert d.action is Action.GIVE_UP and "ConfigError" in d.reason and "refused" in d.reason
    d = decide(Outcome(C.CRASH, "x", exitcode=1, worker_exitcode=1), history(True), Policy())
    assert d.action is Action.RESTART


def test_storage_restarts_with_backoff_until_the_crash_loop_guard():
    policy = Policy(max_restarts=10, max_no_progress=2, backoff=4.0)
    d = decide(outcome(C.STORAGE, "disk full: /x has 0 bytes free"), history(True, False, kind=C.STORAGE), policy)
    assert d.action is Action.RESTART and d.delay == 4.0
    d = decide(outcome(C.STORAGE, "disk full: /x has 0 bytes free"), history(False, False, kind=C.STORAGE), policy)
    assert d.action is Action.GIVE_UP and "crash loop" in d.reason and "storage: disk full" in d.reason


def test_backoff_resets_after_an_attempt_that_reached_training():
    # fast failures back off exponentially; an attempt that trained (even if it saved nothing) resets the backoff,
    # while the crash-loop guard still counts it as an attempt without progress
    policy = Policy(max_restarts=100, max_no_progress=100, backoff=3.0, backoff_cap=100.0)
    fast = [AttemptSummary(C.CRASH, False, False)] * 3
    assert decide(outcome(C.CRASH), fast, policy).delay == 12.0
    trained = [*fast, AttemptSummary(C.SIGNAL, False, True)]
    assert decide(outcome(C.SIGNAL), trained, policy).delay == 3.0
    assert decide(outcome(C.CRASH), [*trained, AttemptSummary(C.CRASH, False, False)], policy).delay == 3.0
    assert decide(outcome(C.CRASH), [*trained, *fast[:2]], policy).delay == 6.0
    guard = Policy(max_restarts=100, max_no_progress=3, backoff=3.0)
    d = decide(outcome(C.CRASH), [AttemptSummary(C.CRASH, False, True)] * 3, guard)
    assert d.action is Action.GIVE_UP and "crash loop" in d.reason


def test_a_restart_tells_an_auto_save_trainer_the_failure_rate_it_observed(tmp_path):
    # the attempts' time over the failures among them; an OOM is a batch too big, not the machine failing
    policy, crashed = Policy(pass_mtbf=True), [AttemptSummary(C.CRASH, True, True, seconds=600.4)]
    assert decide(outcome(C.CRASH), crashed, policy).trainer_overrides == {"mtbf": "600"}
    more = [*crashed, AttemptSummary(C.CUDA_OOM, False, seconds=300.0), AttemptSummary(C.HANG, True, seconds=900.0)]
    assert decide(outcome(C.HANG), more, policy).trainer_overrides == {"mtbf": "900"}
    assert observed_mtbf([AttemptSummary(C.CUDA_OOM, False, seconds=5.0)]) is None
    assert decide(outcome(C.CRASH), crashed, Policy()).trainer_overrides == {}  # a fixed --save_every: no --mtbf
    # the policy passes it exactly when the trainer's settings say --save_every=auto
    for args, auto in ((["--save_every=auto"], True), (["--save_every=7"], False), ([], False)):
        launch = resolve("base", "scripts.base_train", args, tmp_path / "c")
        assert train_options(launch, tmp_path / "r", Supervision(nproc_per_node=1)).policy.pass_mtbf is auto


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
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), Batch(8, 524288, 2048, 8))
    assert d.action is Action.RESTART
    assert d.trainer_overrides == {"device_batch_size": "4", "total_batch_size": "524288"}
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), Batch(3, None))
    assert d.trainer_overrides == {"device_batch_size": "1"}  # no total known: nothing to pin
    d = decide(outcome(C.CRASH), history(True), Policy(), Batch(8, 512, 16, 2))
    assert d.trainer_overrides == {}  # only a CUDA OOM changes the batch


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (Batch(8, 64 * 8 * 2, 64, 2), 4),  # 8 rows per rank: halving divides
        (Batch(5, 64 * 5 * 1, 64, 1), 1),  # 5 rows, accumulation 1: 2 does not divide 5, 1 does
        (Batch(12, 64 * 12 * 1, 64, 1), 6),
        (Batch(12, 64 * 36 * 1, 64, 1), 6),  # 36 rows: 6 divides
        (Batch(10, 64 * 30 * 1, 64, 1), 5),
        (Batch(16, 64 * 48 * 2, 64, 2), 8),  # 48 rows per rank: 8 divides
        (Batch(9, 64 * 27 * 1, 64, 1), 3),  # 27 rows: 4 does not divide, 3 does
        (Batch(6, None, None, None), 3),  # geometry unknown (an older trainer): plain halving
    ],
)
def test_cuda_oom_shrink_picks_a_batch_that_divides_the_rows_per_rank(batch, expected):
    assert smaller_batch(batch) == (expected, "")
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), batch)
    assert d.action is Action.RESTART and d.trainer_overrides["device_batch_size"] == str(expected)


def test_cuda_oom_at_batch_one_or_unknown_batch_gives_up_with_advice():
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), Batch(1, 512, 256, 2))
    assert d.action is Action.GIVE_UP and "device_batch_size=1" in d.reason and "smaller --depth" in d.reason
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), Batch())
    assert d.action is Action.GIVE_UP and "unknown" in d.reason
    d = decide(outcome(C.CUDA_OOM), history(True), Policy(), Batch(4, 1000, 64, 2))  # not whole rows
    assert d.action is Action.GIVE_UP and "--device_batch_size" in d.reason


def test_a_host_oom_of_a_cpu_trainer_shrinks_the_batch_down_to_1_then_stops_with_advice():
    """On the CPU the batch's activations live in host memory: a host OOM is cured like a CUDA OOM, without the
    crash-loop guard (every attempt runs a smaller batch), and two OOMs at batch 1 end it with advice."""
    cpu = Batch(32, 32 * 2048, 2048, 1, "cpu")
    oom = [AttemptSummary(C.HOST_OOM, False, False, 32)]
    for size, expected in ((32, "16"), (16, "8"), (8, "4"), (4, "2"), (2, "1")):
        d = decide(outcome(C.HOST_OOM), oom, Policy(max_restarts=10), Batch(size, 32 * 2048, 2048, 1, "cpu"))
        assert d.action is Action.RESTART and d.trainer_overrides["device_batch_size"] == expected
        oom = [*oom, AttemptSummary(C.HOST_OOM, False, False, size // 2)]
    at_one = Batch(1, 32 * 2048, 2048, 1, "cpu")
    first = [AttemptSummary(C.HOST_OOM, False, False, 1)]
    d = decide(outcome(C.HOST_OOM), first, Policy(), at_one)
    assert d.action is Action.RESTART and d.trainer_overrides == {}  # once more: the host's memory is shared
    d = decide(outcome(C.HOST_OOM), first * 2, Policy(), at_one)
    assert d.action is Action.GIVE_UP and "2 times at device_batch_size=1" in d.reason and "--depth" in d.reason
    d = decide(outcome(C.HOST_OOM), oom[:3], Policy(max_restarts=2), cpu)
    assert d.action is Action.GIVE_UP and "smaller --depth" in d.reason  # out of restarts: the advice still
    d = decide(outcome(C.HOST_OOM), history(False, False, False), Policy(), Batch(32, 32 * 2048, 2048, 1, "cuda"))
    assert d.action is Action.GIVE_UP and "crash loop" in d.reason  # a GPU trainer's host OOM: not the batch


def test_no_oom_shrink_restarts_unchanged():
    policy = Policy(oom_shrink=False)
    d = decide(outcome(C.CUDA_OOM), history(True), policy, Batch(8, 512))
    assert d.action is Action.RESTART and d.trainer_overrides == {}
    d = decide(outcome(C.CUDA_OOM), history(True), policy, Batch(1, 512))
    assert d.action is Action.RESTART and d.trainer_overrides == {}


@pytest.mark.parametrize(("asked", "reached"), [(8, False), (None, True), (4, True), (2, True)])
def test_budget_reached_is_judged_against_the_budget_asked_for_now(tmp_path, asked, reached):
    """A final checkpoint at 4 (saved with num_iterations=4) does not reach a budget raised to 8: a stop before
    the next save is `stopped` (exit 130/75, requeue), not `completed` (exit 0)."""
    from nanochat import checkpoint

    d = tmp_path / "ckpt"
    save(d, 4, final=True)
    checkpoint.update_meta(d, 4, num_iterations=4)
    point = resume_point(TrainOptions("scripts.base_train", [], d, tmp_path / "run"))
    assert judge(point, point, fresh=False, asked=asked) == (False, reached)


def test_progress_is_a_newer_verified_checkpoint_than_at_launch(tmp_path):
    """An attempt progressed when the resume point moved on: a later step, or any checkpoint after a fresh start
    (the trainer archived the old ones); the same checkpoint, or none at all, is no progress."""

    d, opts = tmp_path / "ckpt", TrainOptions("scripts.base_train", [], tmp_path / "ckpt", tmp_path / "run")
    assert judge(None, resume_point(opts), fresh=False, asked=None) == (False, False)  # nothing on disk
    save(d, 2)
    two = resume_point(opts)
    assert judge(None, two, fresh=False, asked=None) == (True, False)  # the first checkpoint of the run
    assert judge(two, two, fresh=False, asked=None) == (False, False)  # nothing new
    assert judge(two, two, fresh=True, asked=None) == (False, False)  # the very same files: still nothing new
    save(d, 4, final=True)
    four = resume_point(opts)
    assert judge(two, four, fresh=False, asked=4) == (True, True)  # newer, and final at the budget asked for


def test_the_display_survives_an_output_on_a_full_disk():
    """The supervisor's own output may be a file on the disk that filled up: its lines are best effort."""
    code = "import sys; from supervisor.display import Display; d = Display(); d.event('a'); d.event('b')"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", code + "; print('went on', file=sys.stderr)"], stdout=full,
                              stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "nanochat-run: cannot write to the output (No space left on device); going on without it", "went on"
    ]  # fmt: skip


def test_the_view_shows_each_attempt_from_its_resume_step_and_the_phase_in_words(capsys):
    """After a restart nothing of the previous attempt is shown (its step, loss, rate); the resume step is; the
    checkpoint field follows the trainer's durable saves; an evaluation shows its batches."""
    from rich.console import Console

    from supervisor.display import LiveDisplay, View

    v = View(max_attempts=6)
    v.beat(
        {"step": 120, "num_iterations": 200, "phase": "training", "loss": 3.2, "tok_per_s": 5000.0, "checkpoint": 100}
    )
    v.new_attempt(2, 2, start_step=100)
    assert (v.step, v.last_checkpoint, v.loss, v.tok_per_s, v.phase) == (100, 100, None, None, "starting")
    v.beat({"step": 130, "phase": "evaluating", "eval_batch": 3, "eval_batches": 40, "checkpoint": 130})
    assert v.doing == "evaluating 3/40 batches" and v.last_checkpoint == 130 and v.num_iterations == 200
    v.beat({"step": 131, "phase": "training", "loss": 3.0})
    assert v.doing == "training" and v.eval_batch is None and v.last_checkpoint == 130
    screen = io.StringIO()
    live = LiveDisplay(Console(file=screen, width=120))
    v.state, v.phase = "starting", None
    live.update(v)
    live.close()  # off a terminal, rich prints the last panel once
    assert "starting" in screen.getvalue() and "None" not in screen.getvalue(), screen.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# lock


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from nanochat.locks import DirLock
    DirLock(Path(sys.argv[1]), "supervisor").acquire()
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
    lock = DirLock(tmp_path / "ckpt", "supervisor")
    assert lock.acquire() == ""  # the directory is created, nothing to take over
    info = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"] > 0
    holder = lock_holder(tmp_path / "ckpt")  # another open file description: flock conflicts even in-process
    assert holder["pid"] == os.getpid() and holder["alive"] is True
    lock.release()
    assert (tmp_path / "ckpt" / LOCK_NAME).read_text() == ""
    assert lock_holder(tmp_path / "ckpt") is None
    assert DirLock(tmp_path / "ckpt", "supervisor").acquire() == ""  # a cleanly released lock is not "stale"


def test_lock_contention_names_the_holder_and_stale_lock_is_taken_over(tmp_path):
    proc = hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(LockError, match=rf"another supervisor \(pid {proc.pid} on .*\) is using"):
            DirLock(tmp_path, "supervisor").acquire()
        holder = lock_holder(tmp_path)
        assert holder["pid"] == proc.pid and holder["alive"] is True
    finally:
        proc.kill()  # dies holding the lock: the kernel drops the flock, the file still names it
        proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    assert lock_holder(tmp_path) is None
    lock = DirLock(tmp_path, "supervisor")
    msg = lock.acquire()
    assert msg == f"took over a stale lock from pid {proc.pid} (no longer running)"
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_file_with_garbage_is_taken_quietly(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    lock = DirLock(tmp_path, "supervisor")
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
    agent.lifecycle.set(RunState.HEALTHY, "training")
    agent.lifecycle.set(final, "done")
    assert agent.state is final and agent.view.state == final.value
    for new in RunState:
        with pytest.raises(AssertionError, match="a final state never changes"):
            agent.lifecycle.set(new)
        assert agent.state is final


def test_state_changes_are_reported(tmp_path):
    agent = make_agent(tmp_path)
    agent.lifecycle.set(RunState.HEALTHY, "training at step 1")
    agent.lifecycle.set(RunState.HEALTHY)  # no change, no line
    agent.lifecycle.set(RunState.STOPPING)
    assert agent.display.lines == ["starting -> healthy: training at step 1", "healthy -> stopping"]


def scripted(agent: Agent, results: list[tuple[Outcome, bool]], on_attempt=None):
    calls = []

    def fake_attempt(n: int):
        calls.append(n)
        if on_attempt:
            on_attempt(n)
        out, progressed = results[len(calls) - 1]
        return out, AttemptSummary(out.kind, progressed)

    agent.attempt = fake_attempt  # the loop's one seam: it asks attempt(n) for each attempt
    return calls


def states_seen(agent: Agent) -> list[str]:
    return [line for line in agent.display.lines if " -> " in line]


def test_loop_restarts_then_succeeds(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    calls = scripted(agent, [(outcome(C.CRASH), True), (outcome(C.COMPLETED), True)])
    assert agent.loop() == EXIT_OK
    assert calls == [1, 2] and agent.state is RunState.SUCCEEDED
    assert [s.split(":")[0] for s in states_seen(agent)] == [
        "starting -> backoff", "backoff -> starting", "starting -> succeeded"]  # fmt: skip
    decisions = [e for e in read_events(agent.run_dir) if e["event"] == "decision"]
    assert [d["action"] for d in decisions] == ["restart", "finish"]


def test_loop_gives_up_with_a_diagnosis(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0, max_no_progress=2)
    scripted(agent, [(outcome(C.CRASH, "ValueError: v"), False)] * 2)
    assert agent.loop() == EXIT_FAILED and agent.state is RunState.FAILED
    diagnosis = [line for line in agent.display.lines if line.startswith("diagnosis:")]
    assert diagnosis == [f"diagnosis: crash: ValueError: v; read {tmp_path / 'run' / 'attempt-002'}/torchrun.log"]


def test_loop_gives_up_at_once_when_the_trainer_rejects_its_settings(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    bad = Outcome(C.REFUSED, "ConfigError: --total_batch_size=100 is not a multiple", exitcode=1, worker_exitcode=2)
    calls = scripted(agent, [(bad, False)])
    assert agent.loop() == EXIT_USAGE and calls == [1]  # exit 2, as for any bad setting


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED)])
def test_loop_stop_exit_codes(tmp_path, sig, code):
    agent = make_agent(tmp_path)
    agent.signals.append(sig)
    scripted(agent, [(outcome(C.STOPPED), True)])
    assert agent.loop() == code and agent.state is RunState.STOPPED


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_PREEMPTED)])
def test_a_signal_during_backoff_stops_without_another_attempt(tmp_path, sig, code):
    agent = make_agent(tmp_path, backoff=60.0)
    calls = scripted(agent, [(outcome(C.CRASH), True)] * 2, on_attempt=lambda n: agent.signals.append(sig))
    assert agent.loop() == code
    assert calls == [1] and agent.state is RunState.STOPPED


def test_loop_passes_the_cuda_oom_overrides_to_the_next_attempt(tmp_path):
    agent = make_agent(tmp_path, backoff=0.0)
    agent.batch = Batch(8, 4096, 64, 2)
    scripted(agent, [(outcome(C.CUDA_OOM), True), (outcome(C.COMPLETED), True)])
    assert agent.loop() == EXIT_OK
    assert agent.overrides == {"device_batch_size": "4", "total_batch_size": "4096"}


# ---------------------------------------------------------------------------------------------------------------
# CLI usage errors: one line on stderr, exit 2, no traceback


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
    "negative startup-timeout": (["train", "--startup-timeout", "-1"], ["--startup-timeout must be >= 0"]),
    "negative grace-period": (["train", "--grace-period", "-1"], ["--grace-period must be >= 0"]),
    "not a number": (["train", "--max-restarts", "many"], ["--max-restarts"]),
    "keep 0": (["prune", "--keep", "0", "--checkpoint-dir", "{tmp}"], ["--keep must be >= 1"]),
    "missing dir (prune)": (["prune", "--checkpoint-dir", "{tmp}/nope"], ["no checkpoint dir at", "nope"]),
    "missing dir (status)": (["status", "--checkpoint-dir", "{tmp}/nope"], ["no checkpoint dir at", "nope"]),
    "no checkpoints": (["prune", "--keep", "1", "--checkpoint-dir", "{ckpt}"], ["no checkpoints in", "nothing"]),
    "bad trainer setting": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--depth=0"], ["--depth must be >= 1"]),
    "unknown trainer setting": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--detph=2"], ["did you mean --depth"]),
    "bad fault spec": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--debug_fault=boom"], ["not a fault spec"]),
    "bad trainer value": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--save_every=x"], ["trainer setting"]),
    "save-every not steps": (["train", "--checkpoint-dir", "{tmp}/c", "--save-every", "x"], ["or auto, got 'x'"]),
    "mtbf not positive": (["train", "--checkpoint-dir", "{tmp}/c", "--", "--mtbf=-1"], ["--mtbf must be a number of"]),
    "tag escapes (train)": (["train", "--model-tag", "../../c"], ["--model_tag='../../c' must be a plain name"]),
    "tag escapes (status)": (["status", "--model-tag", "a/../../c"], ["--model-tag='a/../../c' must be a plain"]),
    "tag escapes (prune)": (["prune", "--model-tag", ".."], ["--model-tag='..' must be a plain name"]),
    "tag is the phase folder (train)": (["train", "--model-tag", "."], ["--model_tag='.' must be a plain name"]),
    "tag is the phase folder (status)": (["status", "--model-tag", "."], ["--model-tag='.' must be a plain name"]),
    "tag is the phase folder (speedrun)": (["speedrun", "--model-tag", "."], ["--model-tag='.' must be a plain name"]),
    "tag with a dot path (prune)": (["prune", "--model-tag", "./x"], ["--model-tag='./x' must be a plain name"]),
    "tag like an option (train)": (["train", "--model-tag=-x"], ["--model_tag='-x' must be a plain name"]),
    "tag is a run dir (status)": (["status", "--model-tag", "d4.run"], ["--model-tag='d4.run' must be a plain"]),
    "nnodes not a number": (["train", "--nnodes", "abc"], ["--nnodes must be N or MIN:MAX", "'abc'"]),
    "nnodes max below min": (["train", "--nnodes", "4:2"], ["--nnodes must be N or MIN:MAX"]),
    "zero workers": (["train", "--nproc-per-node", "0"], ["--nproc-per-node must be >= 1", "got 0"]),
    "negative workers": (["train", "--nproc-per-node", "-1"], ["--nproc-per-node must be >= 1"]),
    "negative node rank": (["train", "--node-rank", "-1"], ["--node-rank must be >= 0"]),
    "zero progress interval": (["train", "--progress-every", "0"], ["--progress-every must be > 0"]),
    "negative backoff cap": (["train", "--backoff-cap", "-1"], ["--backoff-cap must be >= 0"]),
    "no such script": (["train", "--script", "no.such.module"], ["--script 'no.such.module': no such Python"]),
    "missing run dir (status)": (["status", "--run-dir", "{tmp}/nope"], ["no run dir at", "nope"]),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_cli_usage_errors(monkeypatch, capsys, tmp_path, empty_ckpt, case):
    args, needles = USAGE_CASES[case]
    args = [a.format(tmp=tmp_path, ckpt=empty_ckpt) for a in args]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert_usage_error(code, err, *needles)
    assert not (tmp_path / "c").exists()  # a rejected run leaves nothing behind
    assert not (tmp_path / "c.run").exists()


def float_options() -> list[tuple[str, str]]:
    """(command, --option) for every float option of every command, read from the app: a new one is tested too."""
    found = []
    for info in cli.app.registered_commands:
        for name, hint in typing.get_type_hints(info.callback, include_extras=True).items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if float in (typing.get_args(base) or (base,)):
                found.append((info.name or info.callback.__name__, f"--{name.replace('_', '-')}"))
    return found


@pytest.mark.parametrize("command, option", float_options())
def test_cli_float_options_refuse_nan_and_infinity(monkeypatch, capsys, tmp_path, command, option):
    """nan passes every range check (`nan < 0` is false): --hang-timeout nan once killed every attempt as hung."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for raw in ("nan", "inf", "-inf", "1e999"):
        code, out, err = run_cli(monkeypatch, capsys, command, f"{option}={raw}")
        assert_usage_error(code, err, f"Invalid value for '{option}': expected a finite number, got '{raw}'")
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_cli_float_options_are_all_found():
    found = float_options()
    for option in ("--hang-timeout", "--startup-timeout", "--grace-period", "--backoff", "--backoff-cap",
                   "--progress-every"):  # fmt: skip
        assert ("train", option) in found and ("speedrun", option) in found
    assert ("train", "--node-timeout") in found and ("status", "--interval") in found


def test_cli_usage_error_from_the_real_console_script(tmp_path, env):
    script = Path(sys.executable).with_name("nanochat-run")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]
    proc = subprocess.run([*cmd, "train", "--max-restarts", "-1"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert_usage_error(proc.returncode, proc.stderr, "--max-restarts must be >= 0")
    proc = subprocess.run([*cmd, "prune", "--keep", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert_usage_error(proc.returncode, proc.stderr, "--keep must be >= 1")


def test_cli_help_version_and_a_bare_command_exit_0(tmp_path, env):
    script = Path(sys.executable).with_name("nanochat-run")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]
    for args in ([], ["-h"], ["--help"], ["train", "-h"]):
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage: nanochat-run"), (args, proc.stderr)
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and re.fullmatch(r"nanochat-run \d+\.\d+\.\d+\n", proc.stdout), proc.stdout


def test_cli_train_dry_run_prints_the_command_and_settings_and_starts_nothing(monkeypatch, capsys, tmp_path):
    d = tmp_path / "ckpt"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--depth", "3", "--checkpoint-dir", str(d), "--dry-run",
                             "--", "--max_seq_len=128", "--resume=False")  # fmt: skip
    assert code == 0, err
    command, *rest = out.splitlines()
    assert "-m torch.distributed.run --standalone --nproc-per-node=1 --max-restarts=0" in command
    assert command.endswith(f"--resume=False --checkpoint_dir={d} --heartbeat_file={d}.run/heartbeat.json")
    assert "  depth = 3" in rest and "  max_seq_len = 128" in rest and "  resume = False" in rest
    assert rest[-1].startswith("supervisor: --max-restarts=5 --grace-period=2100s")
    assert not d.exists() and not (tmp_path / "ckpt.run").exists()
    code, out, _ = run_cli(monkeypatch, capsys, "train", "--", "--help")  # the trainer's settings
    assert code == 0 and out.startswith("settings of TrainConfig")


def test_cli_prune_off_a_terminal_refuses_without_yes(tmp_path, env):
    from nanochat import checkpoint

    d = tmp_path / "ckpt"
    for step in (2, 4):
        save(d, step)
    script = Path(sys.executable).with_name("nanochat-run")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "supervisor.cli"]
    proc = subprocess.run([*cmd, "prune", "--keep", "1", "--checkpoint-dir", str(d)], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert_usage_error(proc.returncode, proc.stderr, "refusing to delete without --yes (not a terminal)")
    assert [c.step for c in checkpoint.scan(d)] == [2, 4]  # nothing deleted


def test_cli_prune_refuses_while_a_trainer_holds_the_dir(monkeypatch, capsys, tmp_path):

    d = tmp_path / "ckpt"
    for step in (2, 4):
        save(d, step)
    lock = DirLock(d, "trainer")
    lock.acquire()
    try:
        code, _, err = run_cli(monkeypatch, capsys, "prune", "--keep", "1", "--yes", "--checkpoint-dir", str(d))
    finally:
        lock.release()
    assert_usage_error(code, err, f"a trainer (pid {os.getpid()}) is writing to", "--force")


def test_cli_status_of_an_empty_checkpoint_dir(monkeypatch, capsys, empty_ckpt):
    code, out, err = run_cli(monkeypatch, capsys, "status", "--json", "--checkpoint-dir", str(empty_ckpt))
    assert code == 0, err
    info = json.loads(out)
    assert info["checkpoints"] == [] and info["newest_valid_step"] is None and info["complete"] is False
    assert info["attempts"] == [] and info["supervisor"] is None
    assert info["run_dir"] == str(empty_ckpt.resolve().with_name("ckpt.run"))


@pytest.fixture
def launched(monkeypatch) -> list[TrainOptions]:
    """`train` runs up to the agent; the agent records its options instead of running (the launch is the edge)."""
    seen: list[TrainOptions] = []

    def run(self: Agent) -> int:
        seen.append(self.opts)
        return 0

    monkeypatch.setattr(Agent, "run", run)
    return seen


def test_cli_grace_period_defaults_to_the_trainers_dist_timeout_plus_300(monkeypatch, capsys, tmp_path, launched):
    ckpt = str(tmp_path / "c")
    code, out, err = run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", ckpt)
    assert code == 0, err
    assert launched[-1].grace_period == 2100 and "warning" not in out
    code, out, err = run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", ckpt, "--", "--dist_timeout=600")
    assert code == 0 and launched[-1].grace_period == 900
    code, out, err = run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", ckpt, "--grace-period", "60")
    assert code == 0 and launched[-1].grace_period == 60
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "--grace-period=60s is not longer than the trainer's --dist_timeout=1800s" in out


def test_cli_zero_timeouts_mean_off_and_resume_false_is_honoured(monkeypatch, capsys, tmp_path, launched):
    args = ["train", "--checkpoint-dir", str(tmp_path / "c"), "--hang-timeout", "0", "--startup-timeout", "0"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--num-iterations", "20", "--", "--resume=False")
    assert code == 0, err
    opts = launched[-1]
    assert (opts.hang_timeout, opts.startup_timeout, opts.fresh_start, opts.num_iterations) == (0, 0, True, 20)
    assert "--resume=False" in opts.trainer_args  # and the agent adds --resume=False/True per attempt after it
    run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", str(tmp_path / "c"))
    assert launched[-1].fresh_start is False and launched[-1].num_iterations is None


def test_zero_timeouts_never_call_a_run_hung(tmp_path):
    opts = TrainOptions("s", [], tmp_path / "c", tmp_path / "r", hang_timeout=0, startup_timeout=0)
    a = dict(healthy=False, started=0.0, last_progress=0.0, heartbeat={})
    assert hang_reason(opts, **a, now=1e9) == ""
    a["healthy"] = True
    assert hang_reason(opts, **a, now=1e9) == ""


def test_a_save_is_not_a_hang_before_the_grace_period(tmp_path):
    opts = TrainOptions("s", [], tmp_path / "c", tmp_path / "r", hang_timeout=10, startup_timeout=30, grace_period=100)
    a = dict(healthy=True, started=0.0, last_progress=0.0, heartbeat={"phase": "saving", "step": 9})
    assert hang_reason(opts, **a, now=50) == ""  # 50 s into a save: past --hang-timeout, within the grace period
    assert "no progress for 100s in a save" in hang_reason(opts, **a, now=101)
    a["heartbeat"] = {"phase": "training", "step": 9}
    assert hang_reason(opts, **a, now=11) == "no progress for --hang-timeout=10s at step 9"
    a["healthy"] = False
    assert hang_reason(opts, **a, now=29) == ""
    assert hang_reason(opts, **a, now=31) == "no training step within --startup-timeout=30s"


def test_status_says_why_a_live_supervisor_waits(tmp_path):
    run = RunDir(tmp_path / "run")
    append_event(run, "attempt_end", attempt=3)
    assert report.waiting(read_events(run)) is None
    append_event(run, "decision", attempt=3, action="restart", reason="crash: restarting with resume", delay=40.0,
                 next_attempt=4)  # fmt: skip
    wait = report.waiting(read_events(run))
    assert wait["attempt"] == 4 and 35 < wait["seconds"] <= 40 and wait["reason"] == "crash: restarting with resume"
    append_event(run, "attempt_start", attempt=4)
    assert report.waiting(read_events(run)) is None  # it is no longer waiting


def test_cli_status_prints_the_backoff_of_a_live_supervisor(monkeypatch, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    lock = DirLock(ckpt, "supervisor")
    lock.acquire()
    try:
        append_event(RunDir(tmp_path / "ckpt.run"), "decision", attempt=2, action="restart", delay=300.0,
                     reason="signal: restarting with resume", next_attempt=3)  # fmt: skip
        code, out, err = run_cli(monkeypatch, capsys, "status", "--checkpoint-dir", str(ckpt))
        assert code == 0, err
        line = " ".join(out.split())
        assert re.search(r"supervisor: running, pid \d+ on \S+, waiting (29\d|300)s before attempt 3: signal:", line)
        code, out, err = run_cli(monkeypatch, capsys, "status", "--json", "--checkpoint-dir", str(ckpt))
        assert json.loads(out)["waiting"]["attempt"] == 3
    finally:
        lock.release()


def test_cli_prune_snapshots_removes_only_what_no_run_needs(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(tmp_path / "shm"))
    top = tmp_path / "shm" / f"nanochat-snapshots-{os.getuid()}"
    orphan, debris = top / "0123456789abcdef", top / "fedcba9876543210"
    for d in (top, orphan, debris):
        d.mkdir(parents=True, mode=0o700)
        d.chmod(0o700)
    (orphan / "origin").write_text(f"{tmp_path / 'gone'}\n")  # its checkpoint dir no longer exists
    (orphan / "slot0").mkdir()
    (orphan / "slot0" / "model_000004.pt").write_bytes(b"x" * 1000)
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--snapshots", "--dry-run")
    assert code == 0, err
    assert f"would remove {orphan}" in out and f"{tmp_path / 'gone'} no longer exists" in out
    assert f"would remove {debris}" in out and orphan.exists() and debris.exists()
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--snapshots", "--yes")
    assert code == 0, err
    assert "removed 2 snapshot folders" in out and not orphan.exists() and not debris.exists()
    code, out, err = run_cli(monkeypatch, capsys, "prune", "--snapshots")
    assert code == 0 and "no stale in-memory snapshots" in out


def test_cli_train_refuses_the_cpu_when_nvidia_smi_sees_gpus_torch_cannot_use(monkeypatch, capsys, tmp_path):
    """The CPU build of torch on a GPU machine (`make install` first, the GPU later) must not quietly train one CPU
    worker: one line naming `make install-cuda`. An explicit --device_type=cpu is the user's choice."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch can use a GPU here: there is nothing to refuse")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # a stand-in: what the real one prints with -L on an 8-GPU node
    smi.write_text(
        '#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    d = str(tmp_path / "ckpt")
    code, out, err = run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", d, "--dry-run")
    assert_usage_error(code, err, "nvidia-smi lists 8 GPU(s) but torch", "make install-cuda", "--device_type=cpu")
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--checkpoint-dir", d, "--dry-run", "--", "--device_type=cpu"
    )
    assert code == 0 and "torch.distributed.run" in out, err
    assert not (tmp_path / "ckpt").exists()


def test_cli_train_help_shows_the_trainer_defaults_that_matter(monkeypatch, capsys):
    """Each phase's defaults, read from its config: --save-every is 60 for RL, --device-batch-size 4 for SFT."""
    from nanochat.settings import RLConfig, SFTConfig, TrainConfig

    code, out, err = run_cli(monkeypatch, capsys, "train", "--help")
    assert code == 0, err
    text = " ".join(out.split())  # the help is wrapped to the terminal's width
    d, sft, rl = TrainConfig(), SFTConfig(), RLConfig()
    shown = [f"Default: {d.depth}.", f"Default: {d.keep_last_n_checkpoints}."]
    shown += [f"Default: {d.save_every} (rl: {rl.save_every}).", f"{d.target_param_data_ratio:g} tokens per parameter"]
    shown += [f"Default: {d.device_batch_size} (sft: {sft.device_batch_size}, rl: {rl.device_batch_size})."]
    shown += [f"max_seq_len {d.max_seq_len}", f"eval_every {d.eval_every} steps", "eval_tokens auto"]
    for needle in shown:
        assert needle in text, needle
    assert d.eval_tokens == -1
