"""`nanochat-run status` and `logs` on run dirs built by hand with real files, real locks and real processes:
each invocation with its attempts, the live heartbeat, --watch, following logs, and a start without torch.
(test_supervisor_e2e.py::test_status_and_prune runs them against a real supervised run.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.locks import DirLock
from supervisor.records import RunDir, append_event
from tests.helpers import assert_usage_error, run_cli
from tests.runs import dead_pid

REPO_ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("nanochat-run")
NANOCHAT_RUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "supervisor.cli"]


def save(ckpt: Path, step: int, budget: int, final: bool = False) -> None:
    """A real, valid checkpoint (tiny tensors) saved under the step budget `budget`."""
    state = {"w": torch.arange(4.0) + step}
    checkpoint.make_dir(ckpt)
    checkpoint.write(ckpt, step, state, {"m": state["w"] * 2}, {"final": final, "num_iterations": budget})
    checkpoint.mark_latest(ckpt, step)


def invocation(run: RunDir, run_id: str, pid: int, ckpt: Path, attempts: list[tuple], end: tuple | None) -> None:
    """The events one `nanochat-run train` writes: attempts as (n, class or None, message, checkpoint step, lost)
    (class None: the attempt never ended), end as (state, exit code, last decision's reason) or None (killed)."""
    append_event(run, "run_start", pid=pid, checkpoint_dir=str(ckpt), run_id=run_id)
    for n, kind, message, step, lost in attempts:
        append_event(run, "attempt_start", attempt=n, attempt_id=f"{run_id}-{n}", pid=pid + n, cmd=[],
                     start_step=None, log_dir=str(run.attempt(n)))  # fmt: skip
        if kind is not None:
            append_event(run, "attempt_end", attempt=n, **{"class": kind}, outcome={"kind": kind, "message": message},
                         step_reached=(step or 0) + (lost or 0), checkpoint_step=step, steps_lost=lost)  # fmt: skip
            append_event(run, "decision", attempt=n, action="restart", reason=f"{kind}: restarting", delay=0.0)
    if end:
        append_event(run, "decision", attempt=attempts[-1][0], action="give_up", reason=end[2], delay=0.0)
        append_event(run, "run_end", state=end[0], exit_code=end[1])


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def test_status_shows_each_invocation_with_its_attempts_and_the_live_heartbeat(monkeypatch, capsys, ckpt):
    run = RunDir(ckpt.with_name("ckpt.run"))
    save(ckpt, 10, budget=40)
    crashes = [(1, "crash", "RuntimeError: boom [rank 1]", 10, 2), (2, "crash", "RuntimeError: boom [rank 1]", 10, 0)]
    invocation(run, "aaaa1111", dead_pid(), ckpt, crashes, ("failed", 1, "crash loop: 2 attempts"))
    invocation(run, "bbbb2222", dead_pid(), ckpt, [(3, None, "", None, None)], None)  # SIGKILLed supervisor
    lock = DirLock(ckpt, "supervisor")
    lock.acquire()
    try:
        invocation(run, "cccc3333", os.getpid(), ckpt, [(4, None, "", None, None)], None)
        beat = {"step": 17, "num_iterations": 40, "phase": "training", "loss": 3.21, "tok_per_s": 1234.5,
                "mfu": 41.5, "time": time.time() - 2}  # fmt: skip
        run.heartbeat.write_text(json.dumps(beat))
        code, out, err = run_cli(monkeypatch, capsys, "status", "--checkpoint-dir", str(ckpt))
        assert code == 0, err
        text = flat(out)
        for line in (
            "progress: checkpoint at step 10 of 40 (25.0%) last run: cccc3333 running; started",
            "live: step 17 of 40, training, loss 3.2100, 1,234 tok/s, mfu 41.5% (heartbeat 2s ago)",
            "run aaaa1111 failed (exit 1): crash loop: 2 attempts; started",
            "attempt 1: crash: RuntimeError: boom [rank 1] (checkpoint 10, 2 steps lost)",
            "attempt 2: crash: RuntimeError: boom [rank 1] (checkpoint 10)",
            "run bbbb2222 killed (no run_end); started",
            "attempt 3: no attempt_end (its supervisor died); started",
            "run cccc3333 running; started",
            "attempt 4: running; started",
            f"supervisor: running, pid {os.getpid()}",
        ):
            assert line in text, (line, out)
        assert "complete (the final checkpoint)" not in text
        code, out, err = run_cli(monkeypatch, capsys, "status", "--json", "--checkpoint-dir", str(ckpt))
    finally:
        lock.release()
    info = json.loads(out)
    runs = info["invocations"]
    assert [(r["run_id"], r["outcome"], r["exit_code"]) for r in runs] == [
        ("aaaa1111", "failed", 1), ("bbbb2222", "killed (no run_end)", None), ("cccc3333", "running", None)
    ]  # fmt: skip
    assert all(isinstance(r["started"], float) for r in runs) and isinstance(runs[0]["ended"], float)
    assert runs[1]["ended"] is None and runs[0]["reason"] == "crash loop: 2 attempts"
    assert [[a["attempt"] for a in r["attempts"]] for r in runs] == [[1, 2], [3], [4]]  # numbered across invocations
    finished = [(a["attempt"], a["run_id"], a["class"]) for a in info["attempts"]]  # as before: the ended ones
    assert finished == [(1, "aaaa1111", "crash"), (2, "aaaa1111", "crash")]
    assert info["heartbeat"]["step"] == 17 and 1 <= info["heartbeat"]["age"] < 60
    assert (info["num_iterations"], info["complete"], info["active"]) == (40, False, True)


def test_status_complete_only_by_the_checkpoint_and_the_last_run_on_its_own_line(monkeypatch, capsys, ckpt):
    run = RunDir(ckpt.with_name("ckpt.run"))
    save(ckpt, 12, budget=12, final=True)
    invocation(run, "aaaa1111", dead_pid(), ckpt, [(1, "completed", "the step budget is reached", 12, 0)],
               ("succeeded", 0, "the step budget is reached"))  # fmt: skip
    code, out, err = run_cli(monkeypatch, capsys, "status", "--checkpoint-dir", str(ckpt))
    assert code == 0, err
    assert "progress: checkpoint at step 12 of 12 (100.0%), complete (the final checkpoint)" in flat(out)
    assert "last run: aaaa1111 succeeded (exit 0); started" in flat(out)

    # a later `train --num-iterations 20` crashed: its trainer's heartbeat (newer than the checkpoint) holds the
    # budget asked for now, so the final checkpoint at 12 is no longer "complete"; the failure has its own line
    invocation(run, "bbbb2222", dead_pid(), ckpt, [(2, "crash", "RuntimeError: x", 12, 3)],
               ("failed", 1, "crash loop: 3 attempts without a new checkpoint"))  # fmt: skip
    run.heartbeat.write_text(json.dumps({"step": 15, "num_iterations": 20, "phase": "training", "time": time.time()}))
    code, out, err = run_cli(monkeypatch, capsys, "status", "--checkpoint-dir", str(ckpt))
    assert code == 0, err
    text = flat(out)
    assert "progress: checkpoint at step 12 of 20 (60.0%) last run: bbbb2222 failed (exit 1): crash loop" in text
    assert "complete (the final checkpoint)" not in text
    assert "live:" in text  # a heartbeat 0 s old: a trainer may still be at work (an orphan finishing its save)


def hold_lock(ckpt: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the supervisor lock for `seconds` (a short-lived supervisor), once it says so."""
    code = (
        "import time; from pathlib import Path; from nanochat.locks import DirLock; "
        f"DirLock(Path({str(ckpt)!r}), 'supervisor').acquire(); print('held', flush=True); time.sleep({seconds})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_status_watch_refreshes_until_the_run_ends(monkeypatch, capsys, ckpt):
    holder = hold_lock(ckpt, 2.0)
    try:
        code, out, err = run_cli(monkeypatch, capsys, "status", "--watch", "--interval", "0.2", "--checkpoint-dir",
                                 str(ckpt))  # fmt: skip
        assert code == 0, err
        assert holder.wait(timeout=10) == 0  # it returned because the lock holder is gone
    finally:
        holder.kill()
        holder.wait()
    blocks = out.split("latest_step.txt:")[1:]
    assert len(blocks) >= 3, out  # refreshed while the supervisor lived, then the final status once
    assert all(f"supervisor: running, pid {holder.pid}" in b for b in blocks[:-1])
    assert "supervisor: not running" in blocks[-1]
    code, out, err = run_cli(monkeypatch, capsys, "status", "--watch", "--json", "--checkpoint-dir", str(ckpt))
    assert code == 0 and json.loads(out)["active"] is False  # nothing running: the final status at once


def make_attempts(run: RunDir, n: int) -> None:
    """attempt-001..n as torchrun leaves them: torchrun.log, and per rank <rdzv id>_<x>/attempt_0/<rank>/*.log."""
    for k in range(1, n + 1):
        d = run.attempt(k)
        (d / "f00d-1234_abcd" / "attempt_0" / "0").mkdir(parents=True)
        (d / "torchrun.log").write_text(f"torchrun output of attempt {k}\n")
        (d / "f00d-1234_abcd" / "attempt_0" / "0" / "stdout.log").write_text(f"rank 0 says step {k}\n")
        (d / "f00d-1234_abcd" / "attempt_0" / "0" / "stderr.log").write_text(f"rank 0 warns {k}\n")


def test_logs_prints_an_attempts_torchrun_log_or_one_ranks_stdout_and_stderr(monkeypatch, capsys, ckpt):
    run = RunDir(ckpt.with_name("ckpt.run"))
    make_attempts(run, 2)
    code, out, err = run_cli(monkeypatch, capsys, "logs", "--checkpoint-dir", str(ckpt))
    assert code == 0, err
    assert out == f"==> attempt 2: {run.attempt(2) / 'torchrun.log'} <==\ntorchrun output of attempt 2\n"
    code, out, err = run_cli(monkeypatch, capsys, "logs", "--run-dir", str(run.path), "--attempt", "1")
    assert code == 0 and out.endswith("torchrun output of attempt 1\n"), err
    code, out, err = run_cli(monkeypatch, capsys, "logs", "--checkpoint-dir", str(ckpt), "--rank", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("==> attempt 2, rank 0, stdout: ") and lines[0].endswith("/0/stdout.log <==")
    assert lines[1] == "rank 0 says step 2"
    assert lines[2].startswith("==> attempt 2, rank 0, stderr: ") and lines[3] == "rank 0 warns 2"

    for args, needles in (
        (["--attempt", "7"], [f"no attempt 7 in {run.path}; attempts: 1-2"]),
        (["--rank", "5"], [f"no rank 5 in attempt 2 ({run.attempt(2)}); ranks: 0"]),
        (["--rank", "-1"], ["--rank must be >= 0"]),
    ):
        code, out, err = run_cli(monkeypatch, capsys, "logs", "--checkpoint-dir", str(ckpt), *args)
        assert_usage_error(code, err, *needles)
    code, out, err = run_cli(monkeypatch, capsys, "logs", "--checkpoint-dir", str(ckpt.with_name("nope")))
    assert_usage_error(code, err, "no run dir at", "nope.run")
    run.attempt(3).mkdir()  # torchrun never got to write its log
    code, out, err = run_cli(monkeypatch, capsys, "logs", "--checkpoint-dir", str(ckpt), "--attempt", "3")
    assert_usage_error(code, err, f"attempt 3 has no torchrun.log in {run.attempt(3)}")


def test_logs_follow_moves_to_a_newer_attempt_and_ends_with_the_supervisor(monkeypatch, capsys, ckpt):
    run = RunDir(ckpt.with_name("ckpt.run"))
    make_attempts(run, 2)
    lock = DirLock(ckpt, "supervisor")
    lock.acquire()

    def supervisor() -> None:  # the run goes on: more output, a restart, then the supervisor exits
        time.sleep(0.5)
        with open(run.attempt(2) / "torchrun.log", "a") as f:
            f.write("attempt 2 crashed\n")
        time.sleep(0.5)
        run.attempt(3).mkdir()
        (run.attempt(3) / "torchrun.log").write_text("attempt 3 resumes\n")
        time.sleep(0.5)
        with open(run.attempt(3) / "torchrun.log", "a") as f:
            f.write("attempt 3 completed\n")
        lock.release()

    writer = threading.Thread(target=supervisor)
    writer.start()
    try:
        code, out, err = run_cli(monkeypatch, capsys, "logs", "-f", "--checkpoint-dir", str(ckpt))
    finally:
        writer.join()
        lock.release()
    assert code == 0, err
    assert out == (
        f"==> attempt 2: {run.attempt(2) / 'torchrun.log'} <==\ntorchrun output of attempt 2\nattempt 2 crashed\n"
        f"==> attempt 3: {run.attempt(3) / 'torchrun.log'} <==\nattempt 3 resumes\nattempt 3 completed\n"
    )


def test_help_status_and_logs_start_without_torch_and_ctrl_c_ends_a_watch_quietly(tmp_path, ckpt):
    """The real console script: `--help`, `status` (with a checkpoint: checked by checksums) and `logs` never
    import torch (seconds); `status --verify` does, to load the weights. Ctrl+C ends --watch and -f with 130."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "PYTHONPROFILEIMPORTTIME": "1"}
    save(ckpt, 4, budget=8)
    make_attempts(RunDir(ckpt.with_name("ckpt.run")), 1)

    def imports_torch(*args: str) -> bool:
        proc = subprocess.run([*NANOCHAT_RUN, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import")]
        assert "supervisor.cli" in modules  # the profile is on: an empty list would prove nothing
        return "torch" in modules

    empty = tmp_path / "empty"
    empty.mkdir()
    light = [
        ["--help"],
        ["train", "--help"],
        ["status", "--json", "--checkpoint-dir", str(empty)],
        ["status", "--checkpoint-dir", str(ckpt)],
        ["logs", "--checkpoint-dir", str(ckpt), "--rank", "0"],
    ]
    for args in light:
        assert not imports_torch(*args), args
    assert imports_torch("status", "--verify", "--checkpoint-dir", str(ckpt))

    del env["PYTHONPROFILEIMPORTTIME"]
    lock = DirLock(ckpt, "supervisor")  # a live supervisor: neither would end on its own
    lock.acquire()
    try:
        for args in (["status", "--watch", "--interval", "0.2"], ["logs", "-f"]):
            # started as a script's background job is: SIGINT ignored (it must end on one all the same)
            proc = subprocess.Popen([*NANOCHAT_RUN, *args, "--checkpoint-dir", str(ckpt)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
            assert proc.stdout.readline()  # it is up and printing
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 130 and "Traceback" not in err, (args, err)
    finally:
        lock.release()
