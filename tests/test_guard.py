"""Bad numbers (nanochat/guard.py): the spike rule, a NaN rolled back with its data skipped (bit-identical to a run
told to skip that data up front), a spike rolled back, a NaN that a rerun does not reproduce (the hardware is
suspect: the supervisor restarts), and a run that keeps producing NaNs (diverged: not restarted)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint, metrics
from nanochat.common import DistInfo
from nanochat.guard import Guard, is_spike
from supervisor import plot
from tests.runs import assert_finished, assert_same_final_state, one_line_error, train
from tests.supervised import Run, cli, supervisor_runs


def test_a_spike_is_far_above_a_full_window():
    window = [3.0, 3.1, 2.9, 3.0, 3.05, 2.95]
    assert is_spike(3.2, window, 6.0) is None  # noise
    assert is_spike(9.0, window, 6.0) > 6.0
    assert is_spike(1.0, window, 6.0) is None  # far below is not a spike
    assert is_spike(9.0, [3.0] * 6, 6.0) is None  # no spread: nothing to measure against


def test_the_guard_agrees_on_nan_and_spikes_and_keeps_its_window_in_the_counters():
    guard = Guard(DistInfo(0, 0, 1, torch.device("cpu")), spike_window=3, spike_z=6.0)
    w = torch.nn.Parameter(torch.ones(2))
    w.grad = torch.ones(2)
    window: list[float] = []
    for loss in (3.0, 3.1, 2.9, 3.0):  # the window fills, then keeps the newest 3
        assert guard.check(torch.tensor(loss), [w], window).kind == "ok"
    assert window == pytest.approx([3.1, 2.9, 3.0])
    spike = guard.check(torch.tensor(30.0), [w], window)
    assert spike.kind == "spike" and spike.z > 6 and window == pytest.approx([3.1, 2.9, 3.0])  # not in the window
    assert guard.check(torch.tensor(float("nan")), [w], window).ranks == (0,)
    w.grad = torch.tensor([1.0, float("inf")])  # a finite loss with a non-finite gradient is bad too
    assert guard.check(torch.tensor(3.0), [w], window).kind == "nan"


def test_bad_guard_settings_are_one_line(menv: dict, tmp_path: Path):
    for bad, needle in (("--skip_data=7:5", "--skip_data='7:5'"), ("--on_nan=ignore", "--on_nan and --on_spike")):
        assert needle in one_line_error(train(menv, tmp_path / "ckpt", bad))


@pytest.mark.slow
def test_a_nan_is_rerun_rolled_back_and_its_data_skipped_as_a_run_told_so(menv: dict, tmp_path: Path):
    rolled, told = tmp_path / "rolled", tmp_path / "told"
    proc = train(menv, rolled, "--debug_fault=nan@step:7", nproc=2)  # checkpoints every 4 steps
    assert_finished(proc, rolled, world=2)
    assert "rerunning the step" in proc.stdout and "again on the rerun; rolled back to step 4" in proc.stderr
    assert checkpoint.find_latest_valid(rolled, pytest.fail).meta.rollbacks == [{"skipped": [5, 7], "reason": "nan"}]
    lines = metrics.read(rolled)
    assert [r for r in lines if r["kind"] == "rollback"][0]["at"] == 7
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 13))  # one line per step, no stale ones
    assert_finished(train(menv, told, "--skip_data=5:7", nproc=2), told, world=2)
    assert_same_final_state(rolled, told)  # the same data, the same weights, bit for bit


@pytest.mark.slow
def test_a_spike_rolls_back_under_on_spike_rollback(menv: dict, tmp_path: Path):
    d = tmp_path / "ckpt"
    proc = train(menv, d, "--debug_fault=spike@step:10", "--on_spike=rollback", "--spike_window=4",
                 "--spike_z=20")  # fmt: skip
    assert_finished(proc, d)
    assert "a loss spike" in proc.stderr and "rolled back to step 8" in proc.stderr
    assert checkpoint.find_latest_valid(d, pytest.fail).meta.rollbacks == [{"skipped": [9, 10], "reason": "spike"}]


@pytest.mark.slow
def test_a_nan_under_on_nan_warn_skips_its_update_and_is_recorded_everywhere(menv: dict, tmp_path: Path):
    d = tmp_path / "ckpt"
    proc = train(menv, d, "--debug_fault=nan@step:6", "--on_nan=warn")
    assert_finished(proc, d)
    assert "step 6: a non-finite loss or gradient, again on the rerun; update skipped (--on_nan=warn)" in proc.stderr
    want = [{"at": 6, "reason": "nan", "action": "update skipped"}]
    assert checkpoint.find_latest_valid(d, pytest.fail).meta.rollbacks == want  # the meta
    assert [(r["step"], r["action"]) for r in metrics.read(d) if r["kind"] == "anomaly"] == [(6, "update skipped")]
    status = cli(menv, "status", "--checkpoint-dir", str(d))
    assert "bad numbers at step 6: a nan, update skipped (--on_nan=warn)" in status.stdout, status.stdout
    assert plot.series(d).anomalies == [(6, "nan, update skipped")]  # what the picture draws


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


@pytest.mark.slow
def test_a_nan_a_rerun_does_not_reproduce_restarts_naming_the_rank(supervise):
    run = supervise(iters=12, save_every=4, trainer=("--debug_fault=flip@step:6,rank=1",))
    run.finish(0)
    first, second = run.events("attempt_end")
    assert (first["class"], second["class"]) == ("crash", "completed")
    message = first["outcome"]["message"]
    assert "rank 1 (node 0)" in message and "silent data corruption" in message, message


@pytest.mark.slow
def test_more_rollbacks_than_allowed_is_diverged_and_not_restarted(supervise):
    run = supervise("--nproc-per-node", "1", iters=12, save_every=4,
                    trainer=("--debug_fault=nan@step:6!", "--max_rollbacks=1"))  # fmt: skip
    out = run.finish(1)
    [end] = run.events("attempt_end")
    assert end["class"] == "diverged" and "after 1 rollbacks (--max_rollbacks=1)" in end["outcome"]["message"], end
    assert "the run diverged" in out
