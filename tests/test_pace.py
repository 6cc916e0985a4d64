"""--hang-timeout auto (supervisor/pace.py, attempt.hang_reason): deadlines from made-up heartbeat sequences."""

from __future__ import annotations

import json
import os

import pytest
import typer

from nanochat.locks import DirLock
from nanochat.train_loop import Heartbeat
from supervisor.attempt import hang_reason
from supervisor.launch import TrainOptions
from supervisor.options import hang_timeout
from supervisor.pace import FALLBACK, Pace
from supervisor.records import EventLog, RunDir, append_event, read_events
from supervisor.watch import Watcher
from tests.helpers import run_cli


def opts(tmp_path, **kw) -> TrainOptions:
    return TrainOptions("s", [], tmp_path / "c", tmp_path / "r", hang_timeout=None, **kw)


def feed(pace: Pace, beats: list[tuple[float, dict]]) -> None:
    """What the watcher does: each move of the heartbeat, timed from when the beat before it was first seen."""
    for (t0, before), (t1, after) in zip(beats, beats[1:], strict=False):
        pace.moved(before, after, t1 - t0)


def training(step: int) -> dict:
    return {"phase": "training", "step": step}


def test_auto_is_the_default_and_parses(tmp_path):
    assert TrainOptions("s", [], tmp_path, tmp_path).hang_timeout is None
    assert hang_timeout("auto") is None and hang_timeout("AUTO") is None and hang_timeout("30") == 30.0
    with pytest.raises(typer.BadParameter, match="expected auto or a number of seconds, got 'soon'"):
        hang_timeout("soon")
    for bad in ("nan", "inf"):
        with pytest.raises(typer.BadParameter, match="expected a finite number"):
            hang_timeout(bad)


def test_a_stall_is_caught_after_the_multiple_of_the_median_step(tmp_path):
    pace, o = Pace(), opts(tmp_path)
    feed(pace, [(t * 0.5, training(t)) for t in range(1, 6)])  # 0.5 s a step
    state = dict(healthy=True, started=0.0, last_progress=10.0, heartbeat=training(5), pace=pace)
    assert hang_reason(o, **state, now=10.0 + 19.9) == ""  # the floor: 10 x 0.5 s is under 20 s
    why = hang_reason(o, **state, now=10.0 + 20.1)
    assert why.startswith("no progress for 20s training at step 5 (--hang-timeout auto: 10x the median step")
    feed(pace, [(t * 4.0, training(t)) for t in range(5, 60)])  # slower now: 4 s a step, the median follows
    assert len(pace.steps) == 50
    pace.moved(training(60), training(64), 16.0)  # beats the watcher missed: their steps share the time
    assert pace.steps[-1] == 4.0
    assert hang_reason(o, **state, now=10.0 + 39) == ""
    assert "no progress for 40s" in hang_reason(o, **state, now=10.0 + 41)


def test_before_enough_steps_the_old_limit_holds(tmp_path):
    pace, o = Pace(), opts(tmp_path)
    feed(pace, [(0.0, training(1)), (0.5, training(2))])  # one step time: too few
    assert pace.steps == [0.5]
    pace.moved(training(2), {"phase": "saving", "step": 2, "reason": "periodic"}, 0.01)  # no step: not a step time
    assert pace.steps == [0.5]
    state = dict(healthy=True, started=0.0, last_progress=0.0, heartbeat=training(2), pace=pace)
    assert hang_reason(o, **state, now=FALLBACK - 1) == ""
    assert "no progress for 1800s" in hang_reason(o, **state, now=FALLBACK + 1)


def test_a_slow_but_progressing_save_or_evaluation_is_never_a_hang(tmp_path):
    pace, o = Pace(), opts(tmp_path, grace_period=2100)
    save = {"phase": "saving", "step": 10, "reason": "periodic", "disk": True}
    feed(pace, [(t * 0.1, training(t)) for t in range(1, 11)] + [(1.0, save), (91.0, training(11))])  # a 90 s save
    assert pace.saves == {"saving:periodic:disk": 90.0}
    state = dict(healthy=True, started=0.0, last_progress=0.0, heartbeat=save, pace=pace)
    assert hang_reason(o, **state, now=449) == ""  # 5 x 90 s
    assert "no progress for 450s saving at step 10" in hang_reason(o, **state, now=451)
    # a kind of save not seen yet (the final one) keeps the old rule: the longer of 1800 s and the grace period
    final = dict(state, heartbeat={**save, "reason": "completed"})
    assert hang_reason(o, **final, now=2099) == "" and "no progress for 2100s" in hang_reason(o, **final, now=2101)
    # an evaluation whose batches take 30 s each: every beat is progress, each wait is judged against 10 x 30 s
    evals = [(100.0 + 30 * i, {"phase": "evaluating", "step": 11, "eval_batch": i}) for i in range(20)]
    feed(pace, evals)
    last = dict(healthy=True, started=0.0, last_progress=evals[-1][0], heartbeat=evals[-1][1], pace=pace)
    assert hang_reason(o, **last, now=evals[-1][0] + 299) == ""
    assert "evaluating at step 11" in hang_reason(o, **last, now=evals[-1][0] + 301)
    # the steps between stayed fast: the step deadline is still the floor
    assert "no progress for 20s training" in hang_reason(o, **dict(last, heartbeat=training(11)), now=1e4)


def test_start_up_follows_the_longest_seen_within_startup_timeout(tmp_path):
    pace, o = Pace(), opts(tmp_path, startup_timeout=3600)
    state = dict(healthy=False, started=0.0, last_progress=0.0, heartbeat={}, pace=pace)
    assert hang_reason(o, **state, now=3599) == ""  # nothing measured: --startup-timeout
    pace.started(100.0)
    assert hang_reason(o, **state, now=499) == ""
    assert hang_reason(o, **state, now=501).startswith("no training step within 500s (--hang-timeout auto: 5x")
    pace.started(900.0)  # 5 x 900 s is past --startup-timeout: that stays the limit
    assert hang_reason(o, **state, now=3599) == "" and hang_reason(o, **state, now=3601)
    assert hang_reason(opts(tmp_path, startup_timeout=0), **state, now=1e9) == ""  # 0 is off


def test_a_number_keeps_the_fixed_rule(tmp_path):
    pace = Pace(steps=[0.1] * 10)
    o = TrainOptions("s", [], tmp_path / "c", tmp_path / "r", hang_timeout=600)
    state = dict(healthy=True, started=0.0, last_progress=0.0, heartbeat=training(3), pace=pace)
    assert hang_reason(o, **state, now=599) == ""
    assert hang_reason(o, **state, now=601) == "no progress for --hang-timeout=600s at step 3"


def test_status_shows_the_deadline_of_the_live_phase(monkeypatch, capsys, tmp_path):
    ckpt, run = tmp_path / "ckpt", RunDir(tmp_path / "ckpt.run")
    o = TrainOptions("s", [], ckpt, run.path, hang_timeout=None)
    watcher = Watcher(o, run, EventLog(run, warn=print), None, "run-1")  # type: ignore[arg-type]
    lock = DirLock(ckpt, "supervisor")
    lock.acquire()
    try:
        append_event(run, "run_start", pid=os.getpid(), checkpoint_dir=str(ckpt), run_id="run-1")
        feed(watcher.pace, [(t * 0.5, training(t)) for t in range(1, 6)])
        watcher._record_deadlines()
        watcher._record_deadlines()  # nothing moved: not logged again
        assert [e["event"] for e in read_events(run)].count("hang_deadlines") == 1
        Heartbeat(str(run.heartbeat), True)(step=5, phase="training")
        code, out, err = run_cli(monkeypatch, capsys, "status", "--checkpoint-dir", str(ckpt))
        assert code == 0, err
        assert "hang deadline: 20s without progress while training (--hang-timeout auto: 10x the median step" in out
        Heartbeat(str(run.heartbeat), True)(step=5, phase="saving", reason="periodic", disk=True)
        code, out, err = run_cli(monkeypatch, capsys, "status", "--json", "--checkpoint-dir", str(ckpt))
        deadline = json.loads(out)["hang_deadline"]
        assert (deadline["phase"], deadline["seconds"]) == ("saving", 2100)  # no save timed yet: the old rule
        assert deadline["deadlines"]["training"]["seconds"] == 20
    finally:
        lock.release()
