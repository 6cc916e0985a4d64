"""`nanochat-run train` end to end: real supervisor processes driving real torchrun with 2 gloo workers on a tiny
model, with faults injected through the trainer's --debug_fault. Every test also checks that nothing the run
started outlives the supervisor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint, metrics
from nanochat.locks import LOCKS, DirLock
from supervisor import procs
from tests.runs import assert_same_final_state
from tests.supervised import (
    NANOCHAT_RUN,
    Run,
    assert_no_orphans,
    assert_one_line_error,
    cli,
    describe,
    join_cgroup,
    kill_leftovers,
    last_value,
    leftovers,
    make_env,
    memory_cgroup_of,
    newest,
    supervisor_runs,
    torchrun_of,
    train_cmd,
    workers_of,
)

pytestmark = pytest.mark.slow
LOCK_NAME = LOCKS["supervisor"]


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


# ---------------------------------------------------------------------------------------------------------------
# 1. a transient crash: classified, restarted with resume, completed (shared with the status/prune test)


@pytest.fixture(scope="module")
def crashed_run(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    ckpt = tmp_path_factory.mktemp("crash") / "ckpt"
    cmd = train_cmd(ckpt, "--keep-last-n", "-1", trainer=("--debug_fault=raise@step:12,rank=1",))
    run = Run(cmd, ckpt, make_env(base_dir))
    run.wait(240)
    yield run
    kill_leftovers(str(ckpt))


def test_crash_is_classified_restarted_and_resumed_to_completion(crashed_run: Run):
    run = crashed_run
    assert run.code == 0, run.output[-6000:]
    assert_no_orphans(run.ckpt)
    ends = run.events("attempt_end")
    assert [e["class"] for e in ends] == ["crash", "completed"]
    crash = ends[0]["outcome"]
    assert crash["message"] == "RuntimeError: debug_fault: injected crash at step 12"
    # exit code 1, or SIGABRT when gloo's C++ teardown aborts after the exception (the error file still names it)
    assert crash["rank"] == 1 and crash["worker_exitcode"] in (1, -signal.SIGABRT)
    assert crash["error_file"].endswith("/1/error.json")
    assert ends[0]["checkpoint_step"] == 10 and ends[0]["step_reached"] == 12 and ends[0]["steps_lost"] == 2
    starts = run.events("attempt_start")
    assert [s["start_step"] for s in starts] == [None, 10]
    assert [d["action"] for d in run.events("decision")] == ["restart", "finish"]
    # the node passed its health check before each attempt (on the CPU: disk and memory; the device check is the
    # GPUs', test_health.py drills it on the CPU)
    assert [(h["ok"], h["device"]) for h in run.events("health")] == [(True, False), (True, False)]
    assert "resumed from step 10" in run.attempt_log(2)
    final = newest(run.ckpt)
    assert final.step == 30 and final.final and final.meta["stop_reason"] == "completed"
    assert [c.step for c in checkpoint.scan(run.ckpt)] == [5, 10, 15, 20, 25, 30]
    end = run.events("run_end")[-1]
    assert (end["state"], end["exit_code"]) == ("succeeded", 0)
    out = run.output
    assert "attempt 1 ended: crash: RuntimeError: debug_fault: injected crash at step 12" in out
    assert "healthy -> succeeded" in out
    # the end-of-run summary, and no failure wording about the workers that end one by one on success
    assert re.search(
        r"summary: succeeded in [\d.]+ ?(?:s|min): step 30/30, train loss \d\.\d{4}, val bpb \d\.\d{4} \(step 30\)", out
    )
    assert "attempts: 2 (crash, completed); steps lost to failures: 2" in out
    assert out.count("torchrun is stopping the others") <= 1  # the crash's, never the success's
    # metrics.jsonl: one line per step of the one history, and where each attempt began and what it cost
    lines = metrics.read(run.ckpt)
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 31))
    starts = [(r["step"], r["attempt"], r["reached"]) for r in lines if r["kind"] == "start"]
    assert starts == [(0, 1, None), (10, 2, 12)]


# ---------------------------------------------------------------------------------------------------------------
# 2, 3. Ctrl+C and SIGTERM: save at the current step, no restart, 130 / 75


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_stop_signal_saves_at_the_current_step_and_exits(supervise, sig, code):
    run = supervise(iters=100000, save_every=100000)
    run.wait_for_step(3)
    run.proc.send_signal(sig)
    out = run.finish(code, timeout=120)
    name = signal.Signals(sig).name
    m = re.search(rf"stopped by {name} at step (\d+)", run.attempt_log(1))
    assert m, run.attempt_log(1)[-3000:]
    stopped_at = int(m.group(1))
    ckpts = checkpoint.scan(run.ckpt, verify=True)
    assert [c.step for c in ckpts] == [stopped_at] and ckpts[0].valid  # the only save is the one on stop
    assert ckpts[0].meta["stop_reason"] == f"signal:{name}" and not ckpts[0].final
    assert run.classes() == ["stopped"] and len(run.events("attempt_start")) == 1
    assert [d["action"] for d in run.events("decision")] == ["stop"]
    assert run.events("run_end")[-1]["exit_code"] == code
    assert "-> stopping" in out and "-> stopped" in out
    if sig == signal.SIGINT:
        # a budget lowered below this (non-final) checkpoint: the trainer refuses (exit 2), and that is the end
        lower = supervise(ckpt=run.ckpt, iters=stopped_at - 1, save_every=100000)
        out = lower.finish(2, timeout=120)  # a refusal exits 2, like any bad setting
        ends = lower.own("attempt_end")
        assert [e["class"] for e in ends] == ["refused"], out[-3000:]
        assert ends[0]["outcome"]["worker_exitcode"] == 2 and "past --num_iterations" in ends[0]["outcome"]["message"]
        assert [d["action"] for d in lower.own("decision")] == ["give_up"] and "diagnosis: refused:" in out


def test_ctrl_c_waits_for_a_save_longer_than_torchruns_30s(supervise):
    # torchrun SIGKILLs its workers 30 s after relaying a signal; the supervisor signals the workers itself and
    # waits for the save (up to --grace-period), so a 35 s save still completes
    run = supervise(iters=100000, save_every=100000, trainer=("--debug_fault=sleep@save:35",))
    run.wait_for_step(3)
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    run.finish(130, timeout=150)
    assert time.monotonic() - t0 >= 35
    m = re.search(r"stopped by SIGINT at step (\d+)", run.attempt_log(1))
    assert m and "debug_fault: sleeping 35s inside the save" in run.attempt_log(1)
    ckpt = newest(run.ckpt)
    assert ckpt.step == int(m.group(1)) and ckpt.meta["stop_reason"] == "signal:SIGINT"
    assert run.classes() == ["stopped"] and len(run.events("attempt_start")) == 1


# ---------------------------------------------------------------------------------------------------------------
# 4. a hang: stacks dumped into the attempt's logs, killed, restarted


def test_hang_dumps_stacks_and_restarts(supervise):
    run = supervise("--hang-timeout", "5", trainer=("--debug_fault=hang@step:7",))
    out = run.finish(0, timeout=180)
    assert run.classes() == ["hang", "completed"]
    hang = run.events("attempt_end")[0]
    assert "no progress for --hang-timeout=5s at step 7" in hang["outcome"]["message"]
    assert hang["checkpoint_step"] == 5
    logs = run.attempt_log(1) + "".join(
        p.read_text(errors="replace") for p in run.run_dir.attempt(1).rglob("stderr.log"))  # fmt: skip
    assert re.search(r"Thread 0x[0-9a-f]+|Current thread 0x[0-9a-f]+", logs), logs[-3000:]
    assert re.search(r'File ".*base_train\.py", line \d+ in main', logs), logs[-3000:]
    assert re.search(r'File ".*faults\.py", line \d+ in fire', logs)  # where it hangs
    assert "dumping stacks (SIGUSR1)" in out
    assert newest(run.ckpt).final


def test_a_stopped_worker_is_caught_by_the_default_auto_deadline(supervise):
    # no --hang-timeout: auto. No save or evaluation comes due, so the stall is judged by the step deadline.
    run = supervise(iters=100000, save_every=100000)
    timed = lambda: [e for e in run.events("hang_deadlines") if e["deadlines"]["training"]["seconds"] < 1800]  # noqa: E731
    run.wait_for("a step deadline from timed steps", lambda: bool(timed()))
    assert timed()[0]["deadlines"]["training"]["why"].startswith("10x the median step")
    rank1 = next(w for w in workers_of(torchrun_of(run)) if w.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGSTOP)  # a stuck collective: rank 0 waits for it forever
    t0 = time.time()
    run.wait_for("the hang", lambda: bool(run.events("attempt_end")), timeout=120)
    hang = run.events("attempt_end")[0]
    assert hang["class"] == "hang", hang
    assert "(--hang-timeout auto: 10x the median step" in hang["outcome"]["message"], hang
    print(f"the hang was caught {hang['exited_at'] - t0:.1f}s after the SIGSTOP")
    assert hang["exited_at"] - t0 < 40  # the 20 s floor, the stack dump and the load of a shared machine
    run.proc.send_signal(signal.SIGINT)  # it restarts as after any hang: that is the other hang test's
    run.finish(130, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# 5. a real host OOM, in a memory cgroup of its own


CGROUP_LIMIT = 1536 << 20  # a normal tiny run with 2 workers peaks near 0.9 GB (checked with memory.max_usage)


@pytest.fixture
def memory_cgroup(tmp_path: Path) -> Iterator[Path]:
    yield from memory_cgroup_of(tmp_path, CGROUP_LIMIT)


def cgroup_oom_kills(cg: Path) -> int:
    for line in (cg / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def test_host_oom_in_a_memory_cgroup(supervise, memory_cgroup: Path):
    run = supervise(trainer=("--debug_fault=memhog@step:3",), preexec_fn=join_cgroup(memory_cgroup))
    out = run.finish(0, timeout=180)
    assert cgroup_oom_kills(memory_cgroup) >= 1
    assert run.classes() == ["host_oom", "completed"], out[-4000:]
    oom = run.events("attempt_end")[0]["outcome"]
    assert oom["worker_exitcode"] == -9 and oom["rank"] == 0
    # the worker's own memory cgroup is the best evidence, and the one named
    assert "OOM killer" in oom["message"] and oom["evidence"] == {"source": "cgroup", "oom_kills": 1}
    assert "debug_fault: memhog at step 3" in run.attempt_log(1)
    assert run.events("decision")[0]["overrides"]["device_batch_size"] == "1"  # on the CPU: as for a CUDA OOM
    assert newest(run.ckpt).final


# ---------------------------------------------------------------------------------------------------------------
# 6. CUDA OOM: the next attempt halves the device batch and pins the total batch


def test_cuda_oom_halves_the_device_batch(supervise):
    run = supervise(trainer=("--debug_fault=oom@step:7",))
    run.finish(0, timeout=180)
    assert run.classes() == ["cuda_oom", "completed"]
    oom = run.events("attempt_end")[0]["outcome"]
    assert oom["message"] == "OutOfMemoryError: debug_fault: injected CUDA out of memory at step 7"
    assert run.events("decision")[0]["overrides"] == {"device_batch_size": "1", "total_batch_size": "256"}
    first, second = (s["cmd"] for s in run.events("attempt_start"))
    assert (last_value(first, "device_batch_size"), last_value(first, "total_batch_size")) == ("2", "256")
    assert (last_value(second, "device_batch_size"), last_value(second, "total_batch_size")) == ("1", "256")
    final = newest(run.ckpt)
    assert final.step == 30 and final.final
    assert final.meta["train_config"]["device_batch_size"] == 1 and final.meta["total_batch_size"] == 256


# ---------------------------------------------------------------------------------------------------------------
# 7, 8. giving up: a crash loop, and --max-restarts


def test_deterministic_crash_gives_up_with_a_diagnosis(supervise):
    run = supervise("--max-no-progress", "2", trainer=("--debug_fault=raise@step:3!",))
    out = run.finish(1, timeout=180)
    assert run.classes() == ["crash", "crash"]
    give_up = run.events("decision")[-1]
    assert give_up["action"] == "give_up" and "crash loop" in give_up["reason"]
    log = run.run_dir.attempt(2) / "torchrun.log"
    assert f"diagnosis: crash: RuntimeError: debug_fault: injected crash at step 3; read {log}" in out
    assert "RuntimeError: debug_fault: injected crash at step 3" in log.read_text()
    assert "-> failed" in out and run.events("run_end")[-1]["exit_code"] == 1


def test_max_restarts_is_honoured(supervise):
    # the fault fires whenever a run reaches step 7; the checkpoint at step 5 makes the first attempt progress,
    # so the crash-loop limit (3 attempts without progress) is not what stops the second one: --max-restarts is.
    # Saves are synchronous here: a background write of step 5 could still be in flight at the kill on a loaded
    # machine, and then the first attempt would not have progressed.
    run = supervise("--max-restarts", "1", trainer=("--debug_fault=sigkill@step:7!", "--async_save=False"))
    out = run.finish(1, timeout=180)
    assert run.classes() == ["signal", "signal"]
    ends = run.events("attempt_end")
    assert [e["progressed"] for e in ends] == [True, False]
    assert all(e["outcome"]["worker_exitcode"] == -9 and e["outcome"]["rank"] == 0 for e in ends)
    assert "--max-restarts=1 used up" in run.events("decision")[-1]["reason"]
    assert len(run.events("attempt_start")) == 2
    assert re.search(r"diagnosis: signal: a worker \(rank 0, pid \d+\) was killed by SIGKILL", out), out[-3000:]
    assert newest(run.ckpt).step == 5


def test_save_every_auto_on_two_ranks_and_the_restart_gets_the_observed_mtbf(supervise):
    # rank 0 picks the steps and both ranks save them (a rank that saved another step would hang in the saver's
    # gather); after the crash the next attempt gets the failure rate seen so far as its --mtbf
    fault = "--debug_fault=raise@step:12,rank=1"
    run = supervise("--keep-last-n", "-1", iters=20, save_every="auto", trainer=("--mtbf=0.1", fault))
    run.finish(0, timeout=240)
    assert run.classes() == ["crash", "completed"]
    mtbf = run.events("decision")[0]["overrides"]["mtbf"]
    assert float(mtbf) >= 1 and f"mtbf = {float(mtbf)}" in run.attempt_log(2)  # the trainer applied it
    assert re.search(r"--save_every=auto: a save every \d+ steps .*MTBF 0.1s", run.attempt_log(1))
    assert re.search(rf"--save_every=auto: a save every \d+ steps .*MTBF {mtbf}s", run.attempt_log(2))
    saved = {c.step: len(c.meta.ranks) for c in checkpoint.scan(run.ckpt)}
    assert len([s for s in saved if s < 12]) >= 2 and 20 in saved and set(saved.values()) == {2}, saved


def test_a_restart_takes_the_warm_spare_and_resumes_exactly(supervise, crashed_run: Run):
    # --spare: once attempt 1 trains, attempt 2's torchrun is started and its workers wait after their imports; the
    # SIGKILL at step 12 restarts into it (saves synchronous: step 10 is on disk by then, however loaded the
    # machine). Same settings as crashed_run (the crash at step 12 too): the same final state, to the bit
    fault = "--debug_fault=sigkill@step:12,rank=1"
    run = supervise("--spare", "on", "--keep-last-n", "-1", trainer=(fault, "--async_save=False"))
    out = run.finish(0, timeout=240)
    assert run.classes() == ["signal", "completed"]
    starts = run.events("attempt_start")
    assert [s["spare"] for s in starts] == [False, True] and starts[1]["start_step"] == 10
    assert re.search(r"attempt 2: torchrun pid \d+ \(the warm spare\), resuming from step 10", out), out[-3000:]
    assert "resumed from step 10" in run.attempt_log(2) and "startup: " in run.attempt_log(2)
    assert_same_final_state(run.ckpt, crashed_run.ckpt, step=30)
    # its records name the attempt it became, not the spare's own tag
    lines = metrics.read(run.ckpt)
    assert [(r["step"], r["attempt"]) for r in lines if r["kind"] == "start"] == [(0, 1), (10, 2)]
    assert {r["attempt"] for r in lines if r["kind"] == "step" and r["step"] > 12} == {2}
    # nothing of a spare is left: the one the restart took trained and exited, the next one (started once
    # attempt 2 trained) was killed at the end; its folder is gone and no process carries this run's tag
    run_id = run.events("run_start")[0]["run_id"]
    tagged = [p for p in psutil.process_iter() if _tag(p).startswith(f"{run_id}-")]
    assert not tagged, describe(tagged)
    assert not (run.run_dir.path / "spare").exists()
    assert sorted(p.name for p in run.run_dir.path.glob("attempt-*")) == ["attempt-001", "attempt-002"]


def _tag(p: psutil.Process) -> str:
    try:
        return p.environ().get(procs.ATTEMPT_ENV, "") if p.status() != psutil.STATUS_ZOMBIE else ""
    except (psutil.Error, OSError):
        return ""


# ---------------------------------------------------------------------------------------------------------------
# 9. one supervisor per checkpoint dir; a dead one's lock is taken over


def test_lock_contention_and_stale_lock_takeover(supervise, env):
    first = supervise(iters=100000, save_every=100000)
    first.wait_for_step(1)
    second = cli(env, *train_cmd(first.ckpt)[len(NANOCHAT_RUN) :])
    assert_one_line_error(second, f"pid {first.pid} ", "another supervisor", str(first.ckpt))
    assert first.proc.poll() is None  # the first run is untouched
    assert len(leftovers(str(first.ckpt))) >= 4  # supervisor, torchrun, 2 workers: the helper does see them

    # the supervisor dies hard: its flock goes with it, its pid stays in the lock file; torchrun gets SIGTERM
    # (parent death signal) and takes the workers down after they save
    first.proc.kill()
    first.wait(10)
    deadline = time.monotonic() + 60
    while leftovers(str(first.ckpt)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_no_orphans(first.ckpt)
    assert json.loads((first.ckpt / LOCK_NAME).read_text())["pid"] == first.pid

    resume_at = max((c.step for c in checkpoint.scan(first.ckpt) if c.valid), default=0)
    third = supervise(ckpt=first.ckpt, iters=resume_at + 10, save_every=100000)
    out = third.finish(0, timeout=180)
    assert f"took over a stale lock from pid {first.pid} (no longer running)" in out
    assert newest(first.ckpt).step == resume_at + 10
    assert (first.ckpt / LOCK_NAME).read_text() == ""  # released cleanly


# ---------------------------------------------------------------------------------------------------------------
# 10. status and prune


def test_status_and_prune(crashed_run: Run, supervise, env, tmp_path: Path):
    assert crashed_run.code == 0
    ckpt = tmp_path / "ckpt"
    shutil.copytree(crashed_run.ckpt, ckpt)
    shutil.copytree(crashed_run.run_dir.path, tmp_path / "ckpt.run")

    st = cli(env, "status", "--json", "--checkpoint-dir", str(ckpt))
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["checkpoint_dir"] == str(ckpt.resolve()) and info["run_dir"] == str((tmp_path / "ckpt.run").resolve())
    assert [(c["step"], c["valid"], c["final"]) for c in info["checkpoints"]] == [
        (5, True, False), (10, True, False), (15, True, False), (20, True, False), (25, True, False), (30, True, True)
    ]  # fmt: skip
    assert info["checkpoints"][-1]["stop_reason"] == "completed"
    assert (info["newest_valid_step"], info["num_iterations"], info["complete"]) == (30, 30, True)
    assert [(a["attempt"], a["class"]) for a in info["attempts"]] == [(1, "crash"), (2, "completed")]
    assert info["attempts"][0]["message"] == "RuntimeError: debug_fault: injected crash at step 12"
    assert info["attempts"][0]["checkpoint_step"] == 10
    assert info["supervisor"] is None
    assert info["latest_marker"] == 30

    table = cli(env, "status", "--checkpoint-dir", str(ckpt))
    assert table.returncode == 0, table.stderr
    run_id = crashed_run.events("run_start")[0]["run_id"]
    for text in ("valid (final)", "checkpoint at step 30 of 30 (100.0%), complete (the final checkpoint)",
                 "latest_step.txt: 30", f"last run: {run_id} succeeded (exit 0); started",
                 "attempt 1: crash: RuntimeError: debug_fault: injected crash at step 12 (checkpoint 10, 2 steps lost)",
                 "attempt 2: completed", "supervisor: not running"):  # fmt: skip
        assert text in " ".join(table.stdout.split()), table.stdout  # rich wraps long lines off a terminal
    by_run_dir = cli(env, "status", "--json", "--run-dir", str(tmp_path / "ckpt.run"))
    assert json.loads(by_run_dir.stdout)["attempts"] == info["attempts"]  # the original run's dirs via its events

    files = sorted(p.name for p in ckpt.iterdir())
    dry = cli(env, "prune", "--keep", "1", "--dry-run", "--checkpoint-dir", str(ckpt))
    assert dry.returncode == 0, dry.stderr
    assert [int(s) for s in re.findall(r"would delete step (\d+):", dry.stdout)] == [5, 10, 15, 20, 25]
    assert "would free" in dry.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == files  # nothing deleted

    # continue the run to 40 steps, saving only at the end (slowly); meanwhile prune refuses and status names it
    more = supervise("--keep-last-n", "-1", ckpt=ckpt, iters=40, save_every=0, trainer=("--debug_fault=sleep@save:10",))
    more.wait_for("the final save", lambda: more.heartbeat().get("phase") == "saving")
    live = json.loads(cli(env, "status", "--json", "--checkpoint-dir", str(ckpt)).stdout)
    assert live["supervisor"]["pid"] == more.pid and live["supervisor"]["alive"] is True
    assert live["invocations"][-1]["outcome"] == "running" and live["heartbeat"]["phase"] == "saving"
    assert live["num_iterations"] == 40 and not live["complete"]  # the budget asked for now, not the checkpoint's
    text = " ".join(cli(env, "status", "--checkpoint-dir", str(ckpt)).stdout.split())
    assert "live: step 40 of 40, saving" in text and "attempt 3: running" in text, text
    rank0 = cli(env, "logs", "--checkpoint-dir", str(ckpt), "--rank", "0")  # torchrun's real per-rank layout
    assert rank0.returncode == 0 and "==> attempt 3, rank 0, stdout: " in rank0.stdout, rank0.stderr
    assert "==> attempt 3, rank 0, stderr: " in rank0.stdout and "base_train: world size 2" in rank0.stdout
    refused = cli(env, "prune", "--keep", "1", "--yes", "--checkpoint-dir", str(ckpt))
    assert_one_line_error(refused, f"a supervisor (pid {more.pid}) is running on", "--force")
    assert more.proc.poll() is None, "the run ended before the checks: they proved nothing"
    watched = cli(env, "status", "--watch", "--json", "--interval", "0.5", "--checkpoint-dir", str(ckpt), timeout=180)
    assert watched.returncode == 0, watched.stderr
    refreshes = [json.loads(line) for line in watched.stdout.splitlines()]
    assert refreshes[0]["active"] and not refreshes[-1]["active"]  # watched the run, returned once it ended
    assert refreshes[-1]["invocations"][-1]["outcome"] == "succeeded" and refreshes[-1]["complete"]
    more.finish(0, timeout=180)
    assert [c.step for c in checkpoint.scan(ckpt)] == [5, 10, 15, 20, 25, 30, 40]

    # a live lock holder (this test process) blocks a real prune, --force overrides
    lock = DirLock(ckpt, "supervisor")
    lock.acquire()
    try:
        refused = cli(env, "prune", "--keep", "1", "--yes", "--checkpoint-dir", str(ckpt))
        assert_one_line_error(refused, f"a supervisor (pid {os.getpid()}) is running on")
        assert len(checkpoint.scan(ckpt)) == 7
        forced = cli(env, "prune", "--keep", "1", "--yes", "--force", "--checkpoint-dir", str(ckpt))
    finally:
        lock.release()
    assert forced.returncode == 0, forced.stderr
    assert [int(s) for s in re.findall(r"delete step (\d+):", forced.stdout)] == [5, 10, 15, 20, 25]
    assert "deleted 10 files" in forced.stdout  # older checkpoints are weights only (--keep_optim_last_n=1)
    kept = checkpoint.scan(ckpt, verify=True)
    assert [(c.step, c.valid, c.final) for c in kept] == [(30, True, True), (40, True, True)]  # final + newest
    again = cli(env, "prune", "--keep", "1", "--yes", "--checkpoint-dir", str(ckpt))
    assert again.returncode == 0 and "nothing to prune" in again.stdout
