"""--hang-timeout auto (supervisor/pace.py, attempt.hang_reason): deadlines from made-up heartbeat sequences, the
pace carried to a rerun of the same configuration, the deadline on the live panel; end to end, a supervised run
whose final upload beats its progress and a rerun that starts from the pace the first one measured."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
import typer
from rich.console import Console

from nanochat.locks import DirLock
from nanochat.train_loop import Heartbeat
from supervisor.attempt import deadline, hang_reason
from supervisor.display import Display, LiveDisplay, View
from supervisor.launch import TrainOptions
from supervisor.options import hang_timeout
from supervisor.pace import FALLBACK, Pace, adopt, config_of, seed
from supervisor.records import EventLog, RunDir, append_event, read_events
from supervisor.watch import Watcher
from tests.helpers import run_cli
from tests.supervised import Run, make_env, train_cmd


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


def test_the_final_upload_is_held_to_the_throughput_of_earlier_uploads_and_each_file_sent_is_progress(tmp_path):
    pace, o = Pace(), opts(tmp_path)
    flushing = {"phase": "done", "step": 12, "uploading": 12, "upload_sent": 0, "upload_bytes": 10**9}
    state = dict(healthy=True, started=0.0, last_progress=0.0, heartbeat=flushing, pace=pace)
    assert deadline(o, healthy=True, heartbeat=flushing, pace=pace)[:2] == ("uploading", FALLBACK)  # none timed yet
    # the uploader's last upload, in every beat: 1 GB in 200 s, then one in 500 s (a slower link): the slowest counts
    for seconds in (200.0, 500.0, 200.0):
        pace.seen({**training(4), "remote_sent_bytes": 10**9, "remote_sent_seconds": seconds})
    pace.seen({**training(5), "remote_sent_bytes": None, "remote_sent_seconds": None})  # nothing uploaded yet
    assert (pace.upload_bytes, pace.upload_rate) == (10**9, 2e6)
    assert hang_reason(o, **state, now=2499) == ""  # 5 x 500 s
    assert hang_reason(o, **state, now=2501) == (
        "no progress for 2500s uploading at step 12 (--hang-timeout auto: 5x the largest checkpoint (1000.0 MB) at"
        " the slowest upload's rate (500.00s), at least 300s)"
    )
    pace.seen({**training(6), "remote_sent_bytes": 10**6, "remote_sent_seconds": 0.1})  # small and fast: the floor
    assert Pace(upload_bytes=10**6, upload_rate=1e7).limits(0, 0)["uploading"][0] == 300
    # a stop's save, then its upload: the upload's deadline, not the save's
    stopping = {"phase": "saving", "reason": "signal:SIGTERM", "step": 7, "uploading": 7}
    assert deadline(o, healthy=True, heartbeat=stopping, pace=pace)[:2] == ("uploading", 2500)
    pace.moved(stopping, {**stopping, "upload_sent": 10}, 900.0)  # a slow file of that upload is not a save's time
    assert pace.saves == {}
    assert deadline(o, healthy=True, heartbeat={**flushing, "uploading": None}, pace=pace)[0] == "done"


BEAT = {"world_size": 2, "device": "cpu", "device_batch_size": 2, "total_batch_size": 256, "max_seq_len": 64,
        "flops_per_token": 1.5e6}  # fmt: skip


def test_a_rerun_starts_from_the_recorded_pace_only_with_the_same_configuration(tmp_path):
    run = RunDir(tmp_path / "ckpt.run")
    watcher = Watcher(opts(tmp_path), run, EventLog(run, warn=print), None, "run-1")  # type: ignore[arg-type]
    assert watcher._earlier is None  # a new run dir: nothing to start from
    watcher._record_deadlines()  # before any heartbeat: no configuration, nothing measured
    watcher.pace, said = adopt(watcher.pace, {**BEAT, **training(1)}, None)
    assert said == "" and watcher.pace.config == config_of(BEAT)
    feed(watcher.pace, [(t * 0.5, {**BEAT, **training(t)}) for t in range(1, 6)])
    watcher.pace.seen({**BEAT, "remote_sent_bytes": 10**9, "remote_sent_seconds": 100.0})
    watcher._record_deadlines()
    # the next invocation: the last record with a configuration (an earlier one, or a later one logged before any
    # heartbeat, has none)
    EventLog(run, warn=print).append("hang_deadlines", deadlines={}, pace=Pace().__dict__)
    earlier = seed(read_events(run))
    assert earlier == watcher.pace and earlier.steps == [0.5] * 4 and earlier.upload_rate == 1e7
    pace, said = adopt(Pace(), {**BEAT, "phase": "starting", "step": 5}, earlier)
    assert pace is earlier and "from the pace an earlier invocation measured" in said
    assert deadline(opts(tmp_path), healthy=True, heartbeat=training(6), pace=pace)[1] == 20  # no steps needed
    # another batch (an OOM restart, a rerun with other settings): measured afresh
    fresh, said = adopt(Pace(), {**BEAT, "device_batch_size": 1, "phase": "starting"}, earlier)
    assert fresh.steps == [] and fresh.config["device_batch_size"] == 1 and said == ""
    again, said = adopt(pace, {**BEAT, "flops_per_token": 3e6}, earlier)  # the model changed within an invocation
    assert again.steps == [] and said.endswith("the configuration changed (flops_per_token): measuring the pace afresh")
    assert adopt(pace, {**BEAT, **training(9)}, None)[0] is pace  # the same configuration keeps its pace
    for bad in ({"steps": "x", "config": {}}, {"steps": [0.5], "saves": {"k": None}, "config": {}}, {"nope": 1}):
        EventLog(run, warn=print).append("hang_deadlines", deadlines={}, pace=bad)
        assert seed(read_events(run)) is None  # the newest record is malformed: nothing to start from


def test_the_live_panel_and_the_progress_line_show_the_hang_deadline(capsys):
    v = View(max_attempts=3)
    v.beat({"step": 12, "num_iterations": 20, "phase": "done", "uploading": 12, "upload_sent": 2 * 10**6,
            "upload_bytes": 5 * 10**6})  # fmt: skip
    assert v.doing == "uploading step 12 (2.0/5.0 MB)"
    v.hang_after, v.hang_why, v.quiet = 23.0, "10x the median step (2.30s), at least 20s", 3.4
    assert v.hang == "after 23s without progress (quiet 3s; 10x the median step (2.30s), at least 20s)"
    Display(every=0).update(v)
    assert capsys.readouterr().out.rstrip().endswith("uploading step 12 (2.0/5.0 MB), hang after 23s")
    screen = io.StringIO()
    live = LiveDisplay(Console(file=screen, width=160))
    live.update(v)
    live.close()
    assert re.search(r"hang +after 23s without progress \(quiet 3s; 10x the median step", screen.getvalue())
    v.hang_after, v.hang_why = 0.0, "--hang-timeout"
    assert v.hang == "never (off: --hang-timeout)"


@pytest.mark.slow
def test_the_final_upload_beats_its_progress_and_a_rerun_starts_from_the_measured_pace(tmp_path, base_dir):
    """Two invocations on one run dir with a file:// remote whose uploads are slow (2 s each) but progress: the
    first one's final upload beats its progress and is held to the upload deadline the earlier uploads set; the
    second starts from the pace the first measured (the same configuration)."""
    ckpt, url, env = tmp_path / "ckpt", f"file://{tmp_path / 'remote'}", make_env(base_dir)
    # every checkpoint kept whole, so that none is pruned under its upload: the step 16 one is sent (and timed) while
    # the trainer trains on, or already waits for the step 48 one (32 is skipped if 48 comes first: the newest wins).
    # 48 steps: the watcher (0.1 s tick) times enough of the fast steps (~40 ms) on a loaded host.
    trainer = ("--debug_fault=sleep@upload:2", "--keep_optim_last_n=-1")
    first = Run(train_cmd(ckpt, "--remote-dir", url, "--progress-every", "0.2", "--keep-last-n", "-1", iters=48,
                          save_every=16, trainer=trainer), ckpt, env)  # fmt: skip
    seen: list[dict] = []

    def flushing() -> bool:
        hb = first.heartbeat()
        seen.extend([hb] if hb.get("uploading") == 48 and hb.get("upload_bytes") else [])  # (None between uploads)
        return bool(seen)

    first.wait_for("the final upload in the heartbeat", flushing, timeout=120)
    out = first.finish(0)
    assert first.classes() == ["completed"]
    # the supervisor's progress line while the trainer waits: the upload's progress and the deadline it is held to
    held = re.findall(r"uploading step 48 \(\d+\.\d/\d+\.\d MB\), hang after (\d+)s", out)
    assert "300" in held and set(held) <= {"300", "1800"}, out  # the fallback until an earlier upload was timed
    assert seen[0]["phase"] == "done" and seen[0]["upload_bytes"] > seen[0]["upload_sent"] >= 0, seen
    last = [e for e in first.events("hang_deadlines") if e["pace"]["config"]][-1]  # what the rerun starts from
    assert last["deadlines"]["uploading"]["why"].startswith("5x the largest checkpoint"), last
    measured = seed(first.events())
    assert measured and measured.upload_rate > 0 and measured.config["world_size"] == 2 and len(measured.steps) >= 3
    assert (first.heartbeat().get("uploading"), first.heartbeat().get("remote_step")) == (None, 48)

    second = Run(train_cmd(ckpt, iters=52, save_every=16), ckpt, env)
    out = second.finish(0)
    assert "hang deadlines: from the pace an earlier invocation measured (the same configuration)" in out, out
    own = [e for e in second.own("hang_deadlines") if e["pace"]["config"]]
    assert own and own[0]["pace"]["steps"][: len(measured.steps)] == measured.steps
    assert own[0]["deadlines"]["training"]["seconds"] < FALLBACK and own[0]["deadlines"]["uploading"]["seconds"] == 300
