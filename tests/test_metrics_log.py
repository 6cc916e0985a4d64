"""metrics.jsonl (nanochat/metrics.py): one line per step of one consistent history across a SIGKILL and resume,
the restart recorded with the steps it lost; best effort when it cannot be written; archived by a fresh start.
(The supervised version, with attempt numbers, is in test_supervisor_e2e.py.)"""

from __future__ import annotations

import pytest

from nanochat import metrics
from tests.runs import assert_finished, copy, train


def test_a_torn_last_line_is_dropped_before_the_next_attempt_appends(tmp_path):
    """A crash in the middle of a line leaves a fragment without its newline: the next attempt must not glue its
    start line onto it."""
    (tmp_path / metrics.FILE).write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    log = metrics.MetricsLog(tmp_path, True, 1, pytest.fail)
    log.step(2, loss=1.0)
    log.file.flush()
    assert [(r["kind"], r["step"]) for r in metrics.read(tmp_path)] == [("step", 1), ("start", 1), ("step", 2)]


@pytest.mark.slow
def test_a_sigkill_and_resume_leave_one_line_per_step_and_the_restart(tmp_path, menv, crashed_1):
    d = copy(crashed_1, tmp_path)  # killed right after step 10; checkpoints at 4 and 8
    before = metrics.read(d)
    assert [r["step"] for r in before if r["kind"] == "step"] == list(range(1, 11))
    assert_finished(train(menv, d), d)
    lines = metrics.read(d)
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 13))
    assert [(r["step"], r["reached"]) for r in lines if r["kind"] == "start"] == [(0, None), (8, 10)]
    restart = [i for i, r in enumerate(lines) if r["kind"] == "start"][1]
    assert lines[:restart] == [r for r in before if r["step"] <= 8]  # the kept history is untouched
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [12] and lines[-1]["val_bpb"] > 0
    step = next(r for r in lines if r["kind"] == "step")
    assert {"loss", "lrm", "tok_per_s", "mfu", "dt", "attempt", "time"} <= set(step)
    again = train(menv, d)  # a rerun of the finished run does nothing, and writes nothing
    assert again.returncode == 0 and metrics.read(d) == lines


@pytest.mark.slow
def test_a_metrics_file_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, menv):
    d = tmp_path / "ckpt"
    (d / metrics.FILE).mkdir(parents=True)  # writing to it fails (EISDIR), even for root
    proc = train(menv, d)
    assert_finished(proc, d)
    assert proc.stderr.count("metrics.jsonl") == 1 and "training goes on without it" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_fresh_start_archives_the_old_history_with_the_old_checkpoints(tmp_path, menv, reference_1):
    d = copy(reference_1[0], tmp_path)
    old = metrics.read(d)
    proc = train(menv, d, "--resume=False", "--num_iterations=3")
    assert proc.returncode == 0, proc.stderr
    (archived,) = d.glob("archived-*")
    assert metrics.read(archived) == old
    assert [r["step"] for r in metrics.read(d) if r["kind"] == "step"] == [1, 2, 3]
