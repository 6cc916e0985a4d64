"""`nanochat-run train` end to end when the world misbehaves: torchrun killed under its workers, a stop before any
worker exists, a second invocation on a used run dir, a full disk, a fresh start over a finished run, and a new
supervisor racing the old one's trainer in the middle of a save. Real supervisor, real torchrun, 2 gloo workers.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint
from tests.supervised import Run, assert_no_orphans, last_value, newest, supervisor_runs, torchrun_of, workers_of

pytestmark = pytest.mark.slow


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


def attempt_heartbeat(run: Run, n: int) -> dict:
    """The heartbeat, if attempt n wrote it."""
    starts = [e for e in run.events("attempt_start") if e["attempt"] == n]
    hb = run.heartbeat()
    return hb if starts and hb.get("time", 0) >= starts[0]["time"] else {}


# ---------------------------------------------------------------------------------------------------------------
# torchrun killed under its workers: during their start-up, and mid-training


def test_killed_torchrun_leaves_no_orphans_and_its_workers_save_first(supervise):
    # no periodic checkpoint: only the stop-save and the final one; 300 steps, so that under load the kill after step
    # 3 cannot land after the last step (at ~10 ms a step, a 14-step run had sometimes finished by then)
    run = supervise(iters=300, save_every=1000)
    # (a) attempt 1: the workers exist but have not trained (no heartbeat): nothing to save, they must just go
    first = torchrun_of(run)
    run.wait_for("the workers", lambda: len(workers_of(first)) == 2 and not attempt_heartbeat(run, 1))
    early = [w.pid for w in workers_of(first)]
    first.kill()
    # (b) attempt 2, after step 3: the workers get SIGTERM from their parent-death signal, save, exit
    run.wait_for("attempt 2", lambda: len(run.events("attempt_start")) == 2)
    second = torchrun_of(run)
    run.wait_for("step 3 of attempt 2", lambda: (attempt_heartbeat(run, 2).get("step") or 0) >= 3)
    late = [w.pid for w in workers_of(second)]
    second.kill()
    out = run.finish(0, timeout=240)

    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in early + late)
    ends = run.events("attempt_end")
    assert [e["class"] for e in ends] == ["signal", "signal", "completed"], out[-4000:]
    for end, torchrun in zip(ends, (first, second)):
        assert end["outcome"]["exitcode"] == -signal.SIGKILL  # the real status, not the 0 of a reaped child
        assert end["outcome"]["message"].startswith(f"torchrun (pid {torchrun.pid}) was killed by SIGKILL")
    assert "its workers saved a checkpoint on the way out" in ends[1]["outcome"]["message"]
    saved = [c for c in checkpoint.scan(run.ckpt, verify=True) if c.meta.get("stop_reason") == "signal:SIGTERM"]
    assert len(saved) == 1 and saved[0].valid and saved[0].step >= 3
    assert ends[1]["checkpoint_step"] == saved[0].step and ends[1]["progressed"]
    assert run.events("attempt_start")[2]["start_step"] == saved[0].step
    assert f"resumed from step {saved[0].step}" in run.attempt_log(3)
    assert newest(run.ckpt).step == 300 and newest(run.ckpt).final
    assert "a worker" not in "\n".join(e["outcome"]["message"] for e in ends)


# ---------------------------------------------------------------------------------------------------------------
# a stop that arrives before torchrun has started any worker


def test_sigterm_before_any_worker_exists_stops_at_once(supervise):
    run = supervise(iters=100000, save_every=100000)
    run.wait_for("the attempt to start", lambda: bool(run.events("attempt_start")), timeout=60)
    torchrun = run.events("attempt_start")[0]["pid"]
    assert not workers_of(psutil.Process(torchrun))
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    out = run.finish(75, timeout=60)
    assert time.monotonic() - t0 < 15, out  # torchrun alone would wait 30 s, and a start-up takes longer still
    assert run.classes() == ["stopped"] and len(run.events("attempt_start")) == 1
    assert [d["action"] for d in run.events("decision")] == ["stop"]
    assert "-> stopping" in out and "-> stopped" in out


# ---------------------------------------------------------------------------------------------------------------
# a second invocation on the same run dir


def test_a_second_invocation_numbers_attempts_on_and_reads_only_its_own_evidence(supervise):
    first = supervise("--max-restarts", "0", trainer=("--debug_fault=oom@step:3!",))
    first.finish(1)
    assert first.classes() == ["cuda_oom"]
    second = supervise("--max-restarts", "0", ckpt=first.ckpt)
    torchrun = torchrun_of(second)
    second.wait_for("step 2 of attempt 2", lambda: (attempt_heartbeat(second, 2).get("step") or 0) >= 2)
    torchrun.kill()
    out = second.finish(1)
    starts = second.events("attempt_start")
    assert [s["attempt"] for s in starts] == [1, 2]
    assert len({s["log_dir"] for s in starts}) == 2 and all(Path(s["log_dir"]).is_dir() for s in starts)
    end = second.events("attempt_end")[-1]
    assert (end["attempt"], end["class"]) == (2, "signal"), out[-3000:]
    assert end["outcome"]["message"].startswith(f"torchrun (pid {torchrun.pid}) was killed by SIGKILL")
    assert end["outcome"]["error_file"] is None
    assert "OutOfMemoryError" not in second.attempt_log(2)  # a fresh log, not appended to attempt 1's
    assert "OutOfMemoryError" in second.attempt_log(1)


# ---------------------------------------------------------------------------------------------------------------
# a full disk under the checkpoints and the run dir


def fill(fs: Path) -> int:
    """Write a filler file until the filesystem is full; returns its size."""
    written, chunk = 0, b"\0" * (1 << 20)
    with open(fs / "filler", "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 2]


def test_a_full_disk_is_diagnosed_and_the_supervisor_survives_it(supervise, small_fs, tmp_path):
    fs = small_fs("64m")
    # the first save comes 8 steps after the fill begins: under load (two tests at a time) a save still writing
    # while the disk fills up would free its temp file on failure, and the event log would find room again
    run = supervise("--max-no-progress", "2", ckpt=fs / "ckpt", out_dir=tmp_path, iters=100000, save_every=10)
    run.wait_for_step(2)
    fill(fs)
    assert shutil.disk_usage(fs).free == 0
    out = run.finish(1, timeout=240)
    assert "Traceback" not in out
    # warned once at most, then went on without it (the failed save may free enough room for the few events left)
    assert out.count("cannot write the event log") <= 1, out[-3000:]
    ended = re.findall(r"attempt \d+ ended: (\w+): (.*)", out)
    assert [kind for kind, _ in ended] == ["storage"], out[-4000:]
    assert f"disk full: {fs / 'ckpt'} has" in ended[0][1], ended
    # no restart into the same full disk: the health check before it gives up (supervisor/health.py)
    diagnosis = [line for line in out.splitlines() if "diagnosis:" in line]
    assert len(diagnosis) == 1 and "diagnosis: unhealthy: disk check failed: 0 MiB free" in diagnosis[0], out[-3000:]
    assert "-> failed" in out


# ---------------------------------------------------------------------------------------------------------------
# --resume=False over a finished run


def test_resume_false_starts_fresh_once_then_resumes(supervise):
    done = supervise(iters=6, save_every=3)
    done.finish(0)
    run = supervise(ckpt=done.ckpt, iters=8, save_every=2, trainer=("--resume=False", "--debug_fault=raise@step:5"))
    out = run.finish(0, timeout=240)
    assert [e["class"] for e in run.own("attempt_end")] == ["crash", "completed"], out[-4000:]
    first, second = (s["cmd"] for s in run.own("attempt_start"))
    assert last_value(first, "resume") == "False" and last_value(second, "resume") == "True"
    archived = [p for p in run.ckpt.iterdir() if p.name.startswith("archived-")]
    assert len(archived) == 1 and (archived[0] / checkpoint.file_name("meta", 6)).exists()  # the old run, kept
    assert "resumed from step 4" in run.attempt_log(3)  # attempts count on from the first invocation's
    assert all(c.meta["num_iterations"] == 8 for c in checkpoint.scan(run.ckpt))  # only the new run's
    assert newest(run.ckpt).step == 8 and newest(run.ckpt).final
    assert "starting fresh (--resume=False)" in out


# ---------------------------------------------------------------------------------------------------------------
# a new supervisor while the dead one's trainer is still saving


def test_a_new_supervisor_waits_for_the_old_trainer_to_finish_its_save(supervise, tmp_path):
    slow = ("--debug_fault=sleep@save:20", "--async_save=False")
    first = supervise(iters=100000, save_every=2, trainer=slow)
    first.wait_for("a slow save", lambda: first.heartbeat().get("phase") == "saving", timeout=120)
    saving = first.heartbeat()["step"]
    rank0 = next(w for w in workers_of(torchrun_of(first)) if w.environ().get("RANK") == "0")
    first.proc.kill()  # the supervisor dies hard; its trainer lives on in the middle of its save
    killed = time.time()
    first.wait(10)
    second = supervise(ckpt=first.ckpt, iters=saving + 4, save_every=100000)
    second.wait_for("the wait", lambda: "waiting for the previous trainer" in second.output, timeout=30)
    assert rank0.is_running()  # it did wait, and the old trainer was still there to wait for
    psutil.wait_procs([rank0], timeout=120)
    gone = time.time()
    out = second.finish(0, timeout=240)
    assert f"waiting for the previous trainer pid {rank0.pid} to finish its save" in out
    assert f"took over a stale lock from pid {first.pid}" in out
    old = checkpoint.inspect(first.ckpt, saving)
    assert old.valid and old.meta["stop_reason"] == "periodic"  # the old save completed: nothing pulled from under it
    # torchrun died with the supervisor (SIGKILL, so it could not SIGKILL its workers 30 s after relaying a
    # SIGTERM); the workers' own parent-death SIGTERM made them save once more, 20 s again: over 30 s in all
    stop = checkpoint.inspect(first.ckpt, saving + 1)
    assert stop.valid and stop.meta["stop_reason"] == "signal:SIGTERM"
    assert gone - killed > 30
    # the new attempt started only after the old trainer's last save was committed (its lock goes at its exit;
    # `gone` is later still: an orphan is reaped by init when init gets to it)
    assert [s["time"] > stop.meta["saved_at"] for s in second.own("attempt_start")] == [True]
    assert newest(first.ckpt).step == saving + 4
    assert_no_orphans(first.ckpt)
