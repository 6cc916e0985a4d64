"""The goodput ledger (supervisor/goodput.py): the pure arithmetic of one attempt's parts, and a real supervised run
through a crash, a hang kill and a Ctrl+C + rerun whose ledger must add up to the wall time and match, part by
part, what this test timed itself."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nanochat import lifeline, metrics
from supervisor import goodput
from tests.supervised import Run, cli, supervisor_runs, torchrun_of, workers_of


def beat(**spent) -> dict:
    kept_at = {"10": 4.0, "15": 7.0}
    spent = {"began": 105.0, "train": 10.0, "save": 1.0, "eval": 2.0, "final": 0.0, "kept_at": kept_at, **spent}
    return {"time": 120.0, "step": 20, "spent": spent}


def test_an_attempt_splits_into_parts_that_add_up():
    """Start-up to the first step, the trainer's own parts, kept vs lost by the resume point, the tail."""
    parts = goodput.attempt_parts(beat(), started=100.0, ended=123.0, first=0, resumes_at=15, clean=False)
    assert parts["start-up"] == 5.0 and parts["evaluation"] == 2.0 and parts["save blocked"] == 1.0
    assert (parts["kept steps"], parts["lost steps"]) == (7.0, 3.0)  # the save at 15 had 7 s of steps behind it
    assert parts["detection"] == 3.0  # the last heartbeat at 120, the attempt down at 123
    assert sum(parts.values()) == pytest.approx(23.0 - 2.0)  # 2 s between the beats: the ledger's unexplained
    clean = goodput.attempt_parts(beat(), 100.0, 123.0, 0, 20, clean=True)
    assert clean["lost steps"] == 0 and clean["detection"] == 0 and clean["final save + flush"] == 3.0
    # a resume point before any save it remembers: nothing kept; one between them: in proportion
    assert goodput.attempt_parts(beat(), 100.0, 123.0, 0, 1, False)["kept steps"] == 0
    assert goodput.attempt_parts(beat(), 100.0, 123.0, 0, 5, False)["kept steps"] == pytest.approx(10.0 * 4 / 19)


def test_a_process_start_is_read_to_a_clock_tick():
    # where start-up counts from (the supervisor's, a trainer's, a bench's workers): psutil's create_time can read
    # a second early, lifeline.started_at within a tick and the fork's own time
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        after = time.time()
        assert before - 0.02 <= lifeline.started_at(child.pid) <= after + 0.02
    finally:
        child.kill()
        child.wait()


def test_an_attempt_that_never_trained_is_start_up_and_detection():
    old = {"time": 50.0, "step": 3}  # an earlier attempt's heartbeat: not evidence about this one
    assert goodput.attempt_parts(old, 100.0, 130.0, 0, None, clean=False)["start-up"] == 30.0
    starting = {"time": 110.0, "step": 3, "spent": {}}  # it beat "starting", then died silently
    parts = goodput.attempt_parts(starting, 100.0, 130.0, 3, 3, clean=False)
    assert (parts["start-up"], parts["detection"]) == (10.0, 20.0)


def test_invocations_add_waits_and_show_the_unexplained():
    runs = [
        {"started": 0.0, "ended": 50.0, "outcome": "failed", "attempts": [
            {"started": 1.0, "ended": 20.0, "ledger": {"start-up": 5.0, "kept steps": 10.0, "detection": 4.0}},
            {"started": 23.0, "ended": 49.0, "ledger": {"start-up": 6.0, "kept steps": 20.0}},
        ]},
        {"started": 80.0, "ended": None, "last_seen": 90.0, "outcome": "killed (no run_end)", "attempts": []},
    ]  # fmt: skip
    led = goodput.ledger(runs)
    assert led.wall == 60.0 and led.between == 30.0
    assert led.parts["start-up"] == 1.0 + 5.0 + 6.0 and led.parts["back-off"] == 3.0
    assert led.parts["unexplained"] == pytest.approx(60.0 - 49.0)  # 1 s after the last attempt, 10 s of the kill
    assert led.ratio == pytest.approx(30.0 / 60.0)
    assert goodput.Ledger.from_dict(led.to_dict()).parts == led.parts
    live = goodput.ledger([{**runs[0], "ended": None, "outcome": "running"}], now=55.0)  # in back-off since 49
    assert live.wall == 55.0 and live.parts["back-off"] == 3.0 + 6.0 and live.parts["unexplained"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


HANG_TIMEOUT, BACKOFF = 6.0, 1.0


def steps_timed(ckpt: Path) -> float:
    """The step times the trainer logged for the steps the run kept, less each attempt's first (start-up)."""
    records = metrics.read(ckpt)
    firsts = {r["step"] + 1 for r in records if r.get("kind") == "start"}
    return sum(r["dt"] for r in records if r.get("kind") == "step" and r["step"] not in firsts)


@pytest.mark.slow
def test_ledger_of_a_crash_a_hang_and_a_ctrl_c_rerun(supervise, env):
    args = ("--hang-timeout", str(HANG_TIMEOUT), "--backoff", str(BACKOFF))
    kw = {"iters": 80, "save_every": 10, "trainer": ("--debug_fault=sigkill@step:7",)}
    first = supervise(*args, **kw)
    first.wait_for("the restart after the crash", lambda: len(first.events("attempt_start")) >= 2)
    torchrun, rank1 = torchrun_of(first), []
    first.wait_for("rank 1", lambda: bool(rank1.extend(w for w in workers_of(torchrun) if w.environ()["RANK"] == "1")
                                          or rank1))  # fmt: skip
    first.wait_for_step(12)
    rank1[0].send_signal(signal.SIGSTOP)  # a stuck collective, between two saves (a save has its own deadline)
    first.wait_for("the hang kill's restart", lambda: len(first.events("attempt_start")) >= 3, timeout=60)
    first.wait_for_step(32)
    first.proc.send_signal(signal.SIGINT)
    first.finish(130)
    first_end = time.time()
    first_wall = first_end - first.started
    time.sleep(2.0)
    second = supervise(*args, **kw)
    second.finish(0)
    gap, second_wall = second.started - first_end, time.time() - second.started

    ends = {e["attempt"]: e for e in second.events("attempt_end")}
    assert [ends[n]["class"] for n in sorted(ends)] == ["signal", "hang", "stopped", "completed"]
    led = json.loads(cli(env, "status", "--checkpoint-dir", str(first.ckpt), "--json").stdout)["goodput"]
    parts = led["parts"]
    print(json.dumps(led, indent=1))
    # the sum: every second of the supervised time is in one part, and what nothing explains is small
    assert sum(parts.values()) == pytest.approx(led["wall_s"], abs=0.01)
    assert abs(parts["unexplained"]) < 2.0, parts
    # the wall: what this test timed, from each supervisor's process start (lifeline.started_at: to a clock tick,
    # after the test's clock began) to its run_end (its exit and the test's checks after)
    assert first_wall + second_wall - 8.0 < led["wall_s"] < first_wall + second_wall + 0.1
    assert gap - 2.0 < led["between_invocations_s"] < gap + 2.0  # from the first's run_end to the second's start
    # the parts
    assert ends[1]["ledger"]["detection"] < HANG_TIMEOUT  # a SIGKILL: seen at once, torchrun stops the other rank
    hang = ends[2]["ledger"]["detection"]
    assert HANG_TIMEOUT <= hang < HANG_TIMEOUT + 6.0  # the deadline, the 2 s stack dump, the teardown
    assert 2 * BACKOFF <= parts["back-off"] < 2 * BACKOFF + 1.5  # two restarts, each after --backoff
    assert ends[1]["ledger"]["lost steps"] > 0 and ends[2]["ledger"]["lost steps"] > 0
    assert ends[3]["ledger"]["lost steps"] == 0 and ends[3]["ledger"]["final save + flush"] > 0  # saved on stop
    timed = steps_timed(first.ckpt)  # the kept steps, as the trainer timed them one by one
    assert timed <= parts["kept steps"] < timed * 1.5 + 1.0, (timed, parts["kept steps"])
    assert all(e["ledger"]["start-up"] > 1.0 for e in ends.values())  # torchrun, imports, the first step
    assert led["ratio"] == pytest.approx(parts["kept steps"] / led["wall_s"], abs=1e-3)
    # the end-of-run summary: written before the run_end event that status counts the wall to, so its last digit
    # may differ
    shown = re.search(r"goodput (\d+\.\d)%: [\d.]+s of kept training", second.output)
    assert shown and float(shown.group(1)) == pytest.approx(100 * led["ratio"], abs=0.2), second.output[-2000:]
