"""The trainer under hostile conditions, end to end with real processes: its torchrun dies (at start-up, mid-run),
a second trainer starts on the same checkpoint dir (even in the middle of the first one's save), the heartbeat
cannot be written, the step budget is lowered below a checkpoint, a checkpoint dir is deleted under its snapshots.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint
from nanochat.checkpoint import TMP_PREFIX, snapshots
from tests.runs import LONG, assert_finished, copy, one_line_error, steps, temp_files, train

pytestmark = pytest.mark.slow


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait for the processes to end (a zombie counts as ended); returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    return alive


def _workers_appear(t, n: int = 2, timeout: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = t.workers()
        if len(found) == n:
            return found
        time.sleep(0.02)
    pytest.fail(f"{n} workers did not appear; output:\n{t.output}")


def test_workers_die_with_torchrun_killed_during_start_up(tmp_path: Path, start) -> None:
    """The parent-death signal is armed before the workers' imports: killed torchrun, no orphan, even though
    torchrun starts every worker in a session of its own (so nothing else would reach them)."""
    t = start(tmp_path / "ckpt", *LONG, nproc=2)
    workers = _workers_appear(t)
    sessions = {os.getsid(w.pid) for w in workers}
    os.kill(t.proc.pid, signal.SIGKILL)  # torchrun only: its workers are in other sessions
    t.proc.wait()
    assert t.proc.pid not in sessions  # so a sweep of torchrun's session would never have found them
    left = _gone(workers, 30)
    assert not left, f"workers outlived torchrun: {[p.pid for p in left]}"
    assert "step 00001/" not in t.output  # killed during start-up indeed


def test_workers_save_and_exit_when_torchrun_is_killed_mid_run(tmp_path: Path, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG, nproc=2)
    t.wait_for(r"^step 00003/")
    workers = t.workers()
    os.kill(t.proc.pid, signal.SIGKILL)
    left = _gone(workers, 60)
    assert not left, f"workers outlived torchrun: {[p.pid for p in left]}"
    ckpts = checkpoint.scan(d, verify=True)
    assert len(ckpts) == 1 and ckpts[0].valid and ckpts[0].step >= 3  # saved where they were
    assert ckpts[0].meta["stop_reason"] == "signal:SIGTERM" and len(ckpts[0].meta["ranks"]) == 2
    assert temp_files(d) == []


def test_a_second_trainer_waits_for_the_first_ones_save_and_never_deletes_its_temp_file(tmp_path: Path, start) -> None:
    """A trainer that is still saving (its supervisor died, say) owns the directory: a second trainer waits for the
    trainer lock instead of deleting the in-flight temp file as debris, then resumes from the save it waited for."""
    d = tmp_path / "ckpt"
    first = start(d, *LONG, "--debug_fault=sleep@save:6")
    first.wait_for(r"^step 00002/")
    first.proc.send_signal(signal.SIGTERM)  # save on stop: 6 s in the middle of writing the model file
    first.wait_for(r"^debug_fault: sleeping 6s inside the save")
    in_flight = [p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert in_flight, "the first trainer's save should be mid-write"
    second = start(d, "--num_iterations=100000", "--save_every=0")
    second.wait_for(rf"waiting up to 60s for pid {first.proc.pid} \(a trainer still running\)", timeout=60)
    assert first.finish() == 128 + signal.SIGTERM
    saved = checkpoint.find_resume_point(d, pytest.fail)[1]
    assert saved.meta["stop_reason"] == "signal:SIGTERM" and saved.valid
    second.wait_for(rf"^resumed from step {saved.step} in ", timeout=60)
    second.proc.send_signal(signal.SIGTERM)
    assert second.finish() == 128 + signal.SIGTERM
    assert "removed .tmp." not in second.output and "Traceback" not in second.output


def test_an_unwritable_heartbeat_only_warns_once(tmp_path: Path, menv) -> None:
    hb = tmp_path / "missing-dir" / "heartbeat.json"
    d = tmp_path / "ckpt"
    proc = train(menv, d, f"--heartbeat_file={hb}")
    assert_finished(proc, d)
    warnings = [line for line in proc.stderr.splitlines() if "heartbeat" in line]
    assert len(warnings) == 1 and f"cannot write the heartbeat file {hb}" in warnings[0], proc.stderr


def test_a_budget_lowered_below_a_checkpoint_is_refused_and_a_reached_one_is_done(crashed_1, tmp_path, menv) -> None:
    """Both the trainer and the supervisor must agree: past the budget without a final checkpoint is a refusal
    (exit 2, never restarted), a final checkpoint at the budget is 'nothing to do' (exit 0)."""
    d = copy(crashed_1, tmp_path)
    error = one_line_error(train(menv, d, "--num_iterations=6"))
    assert "the checkpoint at step 8 in" in error and "is already at or past --num_iterations=6" in error
    assert steps(d) == [4, 8]
    assert_finished(train(menv, d), d)  # to the final 12
    again = train(menv, d)
    assert again.returncode == 0 and "nothing to do: the final checkpoint at step 12" in again.stdout


def test_a_deleted_checkpoint_dir_does_not_resurrect_through_its_snapshots(tmp_path: Path, menv, monkeypatch) -> None:
    """`rm -rf` of a run's checkpoints, then a fresh run at the same path: it must start from scratch, not from
    the old run's in-memory snapshot, and it removes that snapshot."""
    shm = tmp_path / "shm"
    env = {**menv, "NANOCHAT_SHM_DIR": str(shm)}
    d = tmp_path / "ckpt"
    crashed = train(env, d, "--snapshot_every=2", "--save_every=0", "--debug_fault=sigkill@step:7!")
    assert crashed.returncode == -signal.SIGKILL
    monkeypatch.setenv("NANOCHAT_SHM_DIR", str(shm))
    assert snapshots.newest(d, checkpoint.run_id(d))[1].step == 6
    shutil.rmtree(d)
    proc = train(env, d, "--snapshot_every=0")
    assert "dropped in-memory snapshots left by an earlier run" in proc.stdout
    assert "no checkpoint to resume from" in proc.stdout and "resume: the in-memory snapshot" not in proc.stdout
    assert_finished(proc, d)
    assert not snapshots.slots(d)[0].parent.exists()


def test_the_collective_timeout_is_the_dist_timeout_setting(tmp_path: Path, menv) -> None:
    """Rank 0 writes the checkpoint while rank 1 waits in the save's agreement: --dist_timeout bounds that wait.
    A 3 s timeout against an 8 s save proves the setting reaches the process group (the default covers 30 min)."""
    d = tmp_path / "ckpt"
    proc = train(menv, d, "--dist_timeout=3", "--debug_fault=sleep@save:8", nproc=2, timeout=120)
    assert proc.returncode != 0
    assert "debug_fault: sleeping 8s inside the save" in proc.stdout
    assert re.search(r"[Tt]imed out|[Tt]imeout", proc.stdout + proc.stderr), proc.stderr[-3000:]


def test_a_stop_in_the_final_evaluation_ends_it_within_a_batch_and_a_rerun_evaluates(tmp_path: Path, start, menv):
    """The final checkpoint is durable before its evaluation starts; a stop then must not wait for an evaluation
    of minutes (the ranks agree on it after every batch, so a signal to one rank is enough), and the exit status
    says "stopped". The next run evaluates that checkpoint and records its val bpb."""
    d = tmp_path / "ckpt"
    slow = ["--num_iterations=4", "--eval_tokens=1000000", "--debug_fault=sleep@eval:1"]  # minutes of evaluation
    t = start(d, *slow, nproc=2)
    t.wait_for(r"^step 00004 \| saved checkpoint .* \(completed\)")
    time.sleep(1.5)  # into the evaluation
    t.workers()[-1].send_signal(signal.SIGINT)  # one rank only
    signalled = time.monotonic()
    t.wait_for(r"stopped by SIGINT at step 4 in the final evaluation; run again to evaluate it", timeout=60)
    assert t.finish() != 0
    assert time.monotonic() - signalled < 30, "the evaluation went on after the stop"
    final = checkpoint.find_resume_point(d, pytest.fail)[1]
    assert final.step == 4 and final.final and final.meta["val_bpb"] is None
    again = train(menv, d, "--num_iterations=4")
    assert again.returncode == 0 and "step 00004 | validation bpb" in again.stdout, again.stdout + again.stderr
    assert checkpoint.find_resume_point(d, pytest.fail)[1].meta["val_bpb_step"] == 4
    third = train(menv, d, "--num_iterations=4")
    assert "nothing to do: the final checkpoint at step 4" in third.stdout and "validation bpb" not in third.stdout
