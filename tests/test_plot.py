"""Pictures of a run (supervisor/plot.py): `nanochat-run plot` and `status --plot` on real runs, a SIGKILLed and
resumed one and a supervised one that crashed. The tests check the data series a picture was drawn from (one loss
point per step, each restart at its step with its cause and the steps it lost), and of the PNG only that it is one,
of the promised size; bad input is one line."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nanochat import metrics
from supervisor import plot
from supervisor.plot import Restart
from tests.helpers import assert_usage_error, run_cli
from tests.runs import assert_finished, copy, train
from tests.supervised import Run, assert_one_line_error, cli, supervisor_runs


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header: the signature, then the IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_restart_takes_its_cause_from_every_attempt_since_the_previous_start():
    starts = [
        {"step": 0, "attempt": 1, "reached": None},
        {"step": 4, "attempt": 3, "reached": 7},  # attempt 2 died before its first step: no start line
        {"step": 8, "attempt": 4, "reached": None},
    ]
    ended = {1: "crash", 2: "crash", 3: "host_oom"}
    assert plot.restarts(starts, ended) == [Restart(4, "crash", 5, 7), Restart(8, "host_oom", 9, 8)]
    assert plot.restarts(starts, {1: "cuda_oom", 2: "crash"})[0].cause == "cuda_oom, crash"
    assert plot.restarts(starts, {})[1].cause == plot.UNSUPERVISED  # no event log: an unsupervised run
    resumed = [{"step": 6, "attempt": None, "reached": None}]  # the log begins with a resume: still a restart
    assert plot.restarts(resumed, {}) == [Restart(6, "restart", 7, 6)]
    assert plot.restarts(resumed, {})[0].lost == 0 and plot.restarts(starts, ended)[0].lost == 3


def test_bad_input_is_one_line(monkeypatch, capsys, tmp_path: Path):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(monkeypatch, capsys, "plot", "--checkpoint-dir", str(missing))
    assert_usage_error(code, err, f"no checkpoint dir at {missing}")
    empty = tmp_path / "ckpt"
    empty.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "plot", "--checkpoint-dir", str(empty))
    assert_usage_error(code, err, f"no {empty / metrics.FILE}")
    code, _, err = run_cli(monkeypatch, capsys, "status", "--plot", "--json", "--checkpoint-dir", str(empty))
    assert_usage_error(code, err, "--plot", "--json")
    code, out, err = run_cli(monkeypatch, capsys, "status", "--plot", "--checkpoint-dir", str(empty))
    assert code == 0 and err == "", err  # the status itself is fine; the curve is one line saying why not
    assert out.splitlines()[-1].startswith(f"no loss curve: no {empty / metrics.FILE}: the trainer writes it")


# ---------------------------------------------------------------------------------------------------------------
# real runs


@pytest.mark.slow
def test_plot_of_a_sigkilled_and_resumed_run(tmp_path: Path, menv: dict, crashed_1: Path):
    d = copy(crashed_1, tmp_path)  # SIGKILLed right after step 10; checkpoints at 4 and 8
    assert_finished(train(menv, d), d)
    proc = cli(menv, "plot", "--checkpoint-dir", str(d), "--compare", str(crashed_1))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"{d / 'plot.png'}\n"  # unsupervised: no run dir, so beside the checkpoints
    assert png_size(d / "plot.png") == (plot.WIDTH * plot.DPI, plot.HEIGHT * plot.DPI)

    run = plot.series(d)
    assert run.loss.steps == list(range(1, 13)) and all(v > 0 for v in run.loss.values)
    assert run.tok_per_s.steps == list(range(1, 13)) and all(v > 0 for v in run.tok_per_s.values)
    assert run.restarts == [Restart(step=8, cause="restart", lost_from=9, lost_to=10)]
    assert run.eval_name == "val_bpb" and run.evals.steps == [12]
    assert run.title == f"{d.parent.name}/ckpt"  # not under a phase's folder: no phase to name
    old = plot.series(crashed_1)
    assert old.loss.steps == list(range(1, 11)) and old.restarts == []
    assert plot.labels([run, old]) == [f"{d.parent.name}/ckpt", f"{crashed_1.parent.name}/ckpt"]  # both "ckpt"

    out = tmp_path / "pictures" / "run.png"
    assert cli(menv, "plot", "--checkpoint-dir", str(d), "--out", str(out)).stdout == f"{out}\n"
    assert png_size(out) == (1200, 800)
    bad = cli(menv, "plot", "--checkpoint-dir", str(d), "--compare", str(tmp_path / "nowhere"))
    assert_one_line_error(bad, f"no checkpoint dir at {tmp_path / 'nowhere'}")


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


@pytest.mark.slow
def test_plot_and_status_plot_of_a_supervised_run_that_crashed(supervise, env: dict, monkeypatch):
    run = supervise("--nproc-per-node", "1", iters=12, save_every=4, trainer=("--debug_fault=raise@step:7",))
    run.finish(0)
    assert [e["class"] for e in run.events("attempt_end")] == ["crash", "completed"]

    proc = cli(env, "plot", "--checkpoint-dir", str(run.ckpt))
    picture = run.run_dir.path / "plot.png"
    assert proc.returncode == 0 and proc.stdout == f"{picture}\n", proc.stderr
    assert png_size(picture) == (1200, 800)
    series = plot.series(run.ckpt, run.run_dir.path)
    assert series.loss.steps == list(range(1, 13))
    assert series.restarts == [Restart(step=4, cause="crash", lost_from=5, lost_to=7)]  # the class from the events
    assert series.steps_lost == 3
    led = series.goodput  # the ledger the bar below the curves is drawn from: the crash's lost steps are in it
    assert led is not None and led.parts["lost steps"] > 0 and led.parts["detection"] > 0 and 0 < led.ratio < 1

    status = cli({**env, "COLUMNS": "100"}, "status", "--plot", "--checkpoint-dir", str(run.ckpt))
    assert status.returncode == 0, status.stderr
    curve = status.stdout.split("supervisor: not running", 1)[1]  # after the status
    assert f"12 steps, 1 restart, 3 steps lost, goodput {100 * led.ratio:.1f}%" in curve
    assert "training loss (smoothed)" in curve
    assert "restarts (|): crash at 4" in curve
    assert sum("┤" in line for line in curve.splitlines()) >= 4  # a y axis with ticks: a drawn curve
    assert max(len(line) for line in curve.splitlines()) <= 100
    monkeypatch.setitem(sys.modules, "plotext", None)  # not installed: one line instead of the curve
    assert plot.terminal(run.ckpt, run.run_dir.path) == (
        "no loss curve here: the terminal plot needs plotext (pip install plotext)"
    )
