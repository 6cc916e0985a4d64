"""The supervisor's process handling with real processes and real signals, against a stand-in for torchrun: a
small Python script that starts "workers" the way torchrun does (each in a session of its own, RANK in its
environment) and then misbehaves on cue. Seconds per test, where the same situations with real torchrun and the
real trainer (tests/test_supervisor_e2e.py) take a minute. The supervisor's code runs unchanged; only the process
it launches is the stand-in (procs.launch is replaced, nothing else).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor import memory, procs
from supervisor.agent import Agent, TrainOptions
from supervisor.policy import Policy
from supervisor.records import EventLog, RunDir, append_event, read_events
from supervisor.states import AttemptClass
from supervisor.workers import Workers
from tests.helpers import Recorder

C = AttemptClass

# argv: heartbeat file, then a scenario; every worker writes "<rank> <signal>" lines to <heartbeat>.<rank>.got
FAKE_TORCHRUN = r"""
import json, os, signal, subprocess, sys, time
heartbeat, scenario = sys.argv[1], sys.argv[2]
WORKER = '''
import json, os, signal, sys, time
heartbeat, scenario, rank = sys.argv[1], sys.argv[2], os.environ["RANK"]
def on_signal(signum, frame):
    with open(f"{heartbeat}.{rank}.got", "a") as f:
        f.write(f"{signum}\\n")
    if scenario != "stubborn":
        time.sleep(0.5)  # "saving"
        os._exit(128 + signum)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # blocked until now: none is lost
if rank == "0" and scenario not in ("startup",):
    with open(heartbeat + ".tmp", "w") as f:
        json.dump({"time": time.time(), "pid": os.getpid(), "step": 1, "phase": "training"}, f)
    os.replace(heartbeat + ".tmp", heartbeat)
if scenario == "crash" and rank == "1":
    time.sleep(0.5)
    sys.exit(3)
if scenario == "success":
    time.sleep(0.5)
    sys.exit(0)
while True:
    time.sleep(0.05)
'''
if scenario == "late":  # workers appear only after a while (a slow rendezvous), SIGTERM ignored meanwhile
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(1.5)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
if scenario == "startup":  # torchrun before its workers exist
    time.sleep(60)
block = lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
kids = [subprocess.Popen([sys.executable, "-c", WORKER, heartbeat, scenario], start_new_session=True,
                         env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)}, preexec_fn=block)
        for r in range(2)]
if scenario in ("orphans", "stubborn"):
    while not os.path.exists(heartbeat):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)  # torchrun dies; its workers live on in their own sessions
if scenario == "crash":  # like torchrun: notice the failure (a little late), stop the others, exit 1
    time.sleep(1.0)
    for k in kids:
        if k.poll() is None:
            k.kill()
    sys.exit(1)
codes = [k.wait() for k in kids]
time.sleep(0.2)
sys.exit(0 if not any(codes) else 1)
"""


@pytest.fixture
def fake_torchrun(monkeypatch, tmp_path: Path):
    """make(scenario, **options) -> an Agent whose attempts launch FAKE_TORCHRUN instead of torchrun."""
    run_ids: list[str] = []

    def make(scenario: str, **options) -> Agent:
        opts = TrainOptions("scripts.base_train", [], tmp_path / "ckpt", tmp_path / "run", nproc_per_node=2,
                            policy=Policy(backoff=0), **options)  # fmt: skip
        agent = Agent(opts, Recorder())
        run_ids.append(agent.run_id)

        def launch(spec: procs.LaunchSpec, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
            with open(log_path, "wb") as log:
                cmd = [sys.executable, "-c", FAKE_TORCHRUN, str(agent.run_dir.heartbeat), scenario]
                return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        monkeypatch.setattr(procs, "launch", launch)
        return agent

    yield make
    for p in psutil.process_iter():  # nothing may be left even when a test fails
        try:
            if p.environ().get(procs.ATTEMPT_ENV, "").split("-")[0] in run_ids:
                p.kill()
        except psutil.Error:
            continue


def attempt_left(agent: Agent) -> list[psutil.Process]:
    return procs.attempt_processes(f"{agent.run_id}-{agent.attempt_no}")


def got(agent: Agent, rank: int) -> list[int]:
    path = Path(f"{agent.run_dir.heartbeat}.{rank}.got")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def run_attempt(agent: Agent, on_start=None):
    if on_start:
        on_start(agent)
    t0 = time.monotonic()
    out, summary = agent.attempt(agent.run_dir.next_attempt())
    return out, summary, time.monotonic() - t0


def test_orphaned_workers_get_the_grace_period_to_save_then_the_attempt_ends(fake_torchrun):
    agent = fake_torchrun("orphans", grace_period=30)
    out, summary, took = run_attempt(agent)
    lines = "\n".join(agent.display.lines)
    torchrun = read_events(agent.run_dir)[0]["pid"]
    assert f"torchrun (pid {torchrun}) is gone but its workers live on" in lines and "waiting up to 30s" in lines
    assert not attempt_left(agent), "a worker outlived its attempt"
    assert got(agent, 0) == [signal.SIGTERM] and got(agent, 1) == [signal.SIGTERM]  # saved on their way out
    assert took < 10  # they exited after their "save": no wait for the grace period
    # the real exit status of the killed torchrun, not the 0 a reaped-by-someone-else child reports
    assert out.kind is C.SIGNAL and out.exitcode == -signal.SIGKILL
    assert out.message == f"torchrun (pid {torchrun}) was killed by SIGKILL"
    assert summary.healthy and not summary.progressed
    assert "a worker" not in lines  # it was torchrun that died


def test_orphaned_workers_that_overrun_the_grace_period_are_killed(fake_torchrun):
    agent = fake_torchrun("stubborn", grace_period=1.5)
    out, _, took = run_attempt(agent)
    assert not attempt_left(agent)
    assert 1.5 <= took < 10
    assert any("the grace period is over: SIGKILL to" in line for line in agent.display.lines)
    assert got(agent, 0) == [signal.SIGTERM]


def test_a_stop_before_any_worker_exists_stops_torchrun_at_once(fake_torchrun):
    agent = fake_torchrun("startup")
    out, summary, took = run_attempt(agent, on_start=lambda a: a.signals.append(signal.SIGTERM))
    assert out.kind is C.STOPPED and took < 5
    assert any("before any worker started: stopping torchrun" in line for line in agent.display.lines)
    assert not attempt_left(agent)


def test_a_stop_reaches_workers_that_appear_after_it(fake_torchrun):
    # torchrun shrugs the stop off (SIGTERM ignored while it sets up), then starts its workers: each gets the
    # signal as it appears, and its own grace period from then
    agent = fake_torchrun("late", grace_period=30)
    out, _, took = run_attempt(agent, on_start=lambda a: a.signals.append(signal.SIGINT))
    assert out.kind is C.STOPPED and took < 10
    assert got(agent, 0) == [signal.SIGINT] and got(agent, 1) == [signal.SIGINT]
    assert not attempt_left(agent)


def test_a_second_stop_signal_kills_at_once(fake_torchrun):
    agent = fake_torchrun("stubborn", grace_period=60)

    def twice(a: Agent) -> None:
        a.signals.append(signal.SIGINT)
        a.signals.append(signal.SIGINT)

    out, _, took = run_attempt(agent, on_start=twice)
    assert out.kind is C.STOPPED and took < 10 and "a second stop signal" in out.message
    assert not attempt_left(agent)


def test_the_dead_worker_is_named_with_its_rank_and_success_is_silent(fake_torchrun):
    agent = fake_torchrun("crash")
    run_attempt(agent)
    dead = [line for line in agent.display.lines if "torchrun is stopping the others" in line]
    assert len(dead) == 1 and "(rank 1) exited with status 3" in dead[0], agent.display.lines
    ok = fake_torchrun("success")
    out, _, _ = run_attempt(ok)
    assert not [line for line in ok.display.lines if "torchrun is stopping the others" in line], ok.display.lines


# ---------------------------------------------------------------------------------------------------------------
# readers


def test_workers_are_tracked_with_ranks_and_found_by_their_tag_after_torchrun_dies(tmp_path):
    tag = f"test{os.getpid()}-1"
    env = procs.environ_for(tag)
    script = FAKE_TORCHRUN
    fake = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "hb"), "stubborn"], env=env,
                            start_new_session=True)  # fmt: skip
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=procs.environ_for("x-1"))
    try:
        workers = Workers(tag, expected=2)
        deadline = time.monotonic() + 20
        while len(workers.all) < 2 and time.monotonic() < deadline:
            workers.refresh(fake.pid)
            time.sleep(0.05)
        assert sorted(w.rank for w in workers.all) == [0, 1]
        assert workers.by_rank(1).name == f"pid {workers.by_rank(1).pid} (rank 1)"
        assert fake.wait(20) == -signal.SIGKILL  # it killed itself once the heartbeat was written
        left = {p.pid for p in workers.leftovers()}
        assert {w.pid for w in workers.all} | {stray.pid} == left  # orphans by tracking, the stray by its tag
        assert other.pid not in left
        workers.by_rank(0).proc.kill()
        deadline = time.monotonic() + 10
        while not (ended := workers.check_exits()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w.rank for w in ended] == [0] and ended[0].ended
    finally:
        for p in [*workers.leftovers(), psutil.Process(other.pid)]:
            p.kill()
        for p in (stray, other):
            p.wait()


def test_zombie_status_reads_the_exit_of_an_unreaped_child():
    exited = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.send_signal(signal.SIGKILL)
    for proc, expected in ((exited, 3), (killed, -9)):
        deadline = time.monotonic() + 20
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert procs.zombie_status(proc.pid) == expected
        assert proc.wait() == expected  # nothing was reaped by reading it
    assert procs.zombie_status(os.getpid()) is None  # alive


def test_kernel_log_oom_kills_name_only_our_pids_after_the_start(tmp_path):
    boot = psutil.boot_time()
    since = time.time() - 10
    us = lambda t: int((t - boot) * 1e6)  # noqa: E731
    log = tmp_path / "kmsg"
    log.write_text(
        f"6,100,{us(since - 100)},-;Out of memory: Killed process 4242 (python) total-vm:1kB\n"  # before: reused pid
        f"6,101,{us(since + 1)},-;Memory cgroup out of memory: Killed process 4343 (python) total-vm:1kB\n"
        " SUBSYSTEM=memory\n"
        f"6,102,{us(since + 2)},-;Out of memory: Killed process 999 (chrome)\n"
        f"6,103,{us(since + 3)},-;something else entirely\n"
    )
    found = memory.kernel_oom_kills({4242, 4343, 5}, since, path=str(log))
    assert list(found) == [4343] and found[4343].startswith("Memory cgroup out of memory: Killed process 4343")
    assert memory.kernel_oom_kills({1}, since, path=str(tmp_path / "missing")) == {}


def test_oom_counters_of_a_process_cgroup_and_disk_space(tmp_path):
    counters = memory.OomCounters()
    counters.watch(os.getpid())
    if memory.cgroup_oom_file(os.getpid()) is not None:
        assert counters.cgroup_increase() == {os.getpid(): 0}
    assert counters.host_increase() in (0, None)
    disks = memory.disk_space([tmp_path / "not" / "yet", tmp_path])
    assert len(disks) == 1 and disks[0]["path"] == str(tmp_path / "not" / "yet") and disks[0]["free"] > 0
    assert memory.nearly_full({"path": "/x", "free": 0, "total": 1 << 20})
    assert not memory.nearly_full({"path": "/x", "free": 2 << 30, "total": 100 << 30})
    assert memory.nearly_full({"path": "/x", "free": 500 << 20, "total": 100 << 30})  # < 1% of a big disk
    assert not memory.nearly_full({"path": "/x", "free": 1 << 20, "total": 64 << 20})


def test_event_log_is_best_effort_and_attempts_are_numbered_across_invocations(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.next_attempt() == 1
    (run.path / "attempt-001").mkdir(parents=True)
    assert run.next_attempt() == 2  # a dir without events (a supervisor killed at once) is never reused
    append_event(run, "attempt_start", attempt=7)
    assert run.next_attempt() == 8
    n, where, problem = run.make_attempt_dir(8)
    assert (n, where, problem) == (8, run.attempt(8), "")
    n, where, _ = run.make_attempt_dir(8)  # taken meanwhile: the next free number
    assert n == 9 and where == run.attempt(9)

    blocked = tmp_path / "file"
    blocked.write_text("a file where the run dir should be")
    warned: list[str] = []
    log = EventLog(RunDir(blocked / "run"), warned.append)
    log.append("run_start", pid=1)
    log.append("attempt_start", attempt=1)
    assert len(warned) == 1 and "going on without it" in warned[0]
    n, where, problem = RunDir(blocked / "run").make_attempt_dir(1)
    assert where.is_dir() and "cannot create" in problem and str(where) in problem
    where.rmdir()
    assert json.loads(run.events.read_text())["attempt"] == 7
