"""The node's health check before each attempt (supervisor/health.py): real filesystems, a real memory cgroup, the
real device subprocess (its answer perturbed by the NANOCHAT_DEBUG_HEALTH drill switch), and real supervised runs
that give up as `unhealthy` before any torchrun starts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import health, memory
from supervisor.lifecycle import EXIT_FAILED
from supervisor.policy import Policy, decide
from supervisor.records import RunDir, read_events
from supervisor.states import Action, AttemptClass, Outcome
from tests.runs import free_port
from tests.supervised import Run, join_cgroup, memory_cgroup_of, supervisor_runs
from tests.test_multinode import QUICK_RDZV, finish, node

TINY_CGROUP = 320 << 20  # room for the supervisor itself, well under health.MIN_FREE_MEMORY free beside it


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


def test_a_healthy_cpu_node_passes_every_check(tmp_path: Path):
    assert health.check_node(tmp_path / "ckpt", [tmp_path / "ckpt.run"], "cpu", 2) == []


def test_the_injected_wrong_answer_fails_the_device_check(monkeypatch):
    monkeypatch.setenv(health.DEBUG_ENV, "wrong-answer:0")
    (problem,) = health.device_problems("cpu", 1)
    assert problem.check == "device" and "integer matmul off by up to 1" in problem.detail
    monkeypatch.setenv(health.DEBUG_ENV, "wrong-answer:1")  # another device's fault: this CPU's answer is right
    assert health.device_problems("cpu", 1) == []


def test_xid_lines_are_read_from_the_kernel_log_after_the_start(tmp_path: Path):
    boot, since = psutil.boot_time(), time.time() - 10
    us = lambda t: int((t - boot) * 1e6)  # noqa: E731
    log = tmp_path / "kmsg"
    log.write_text(
        f"4,100,{us(since - 100)},-;NVRM: Xid (PCI:0000:3b:00): 13, pid=1, Graphics Exception\n"  # before the start
        f"4,101,{us(since + 1)},-;NVRM: Xid (PCI:0000:3b:00): 79, pid=2, GPU has fallen off the bus.\n"
        f"6,102,{us(since + 2)},-;something else entirely\n"
    )
    assert memory.kernel_xids(since, path=str(log)) == [
        "NVRM: Xid (PCI:0000:3b:00): 79, pid=2, GPU has fallen off the bus."
    ]


def test_only_failures_that_could_be_the_machines_check_the_devices_again():
    since = time.time()  # no Xid line on this machine after now
    machine = [
        Outcome(AttemptClass.NCCL_TIMEOUT, "gloo timed out"),
        Outcome(AttemptClass.CRASH, "RuntimeError: CUDA error: an illegal memory access was encountered"),
        Outcome(AttemptClass.CRASH, "torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp"),
    ]
    program = [
        Outcome(AttemptClass.CRASH, "RuntimeError: debug_fault: injected crash at step 12"),
        Outcome(AttemptClass.HOST_OOM, "killed by the OOM killer"),
        Outcome(AttemptClass.COMPLETED, ""),
    ]
    assert [health.suspicious(o, since) for o in machine + program] == [True] * 3 + [False] * 3


def test_an_unhealthy_node_gives_up_at_once():
    out = Outcome(AttemptClass.UNHEALTHY, "disk check failed: 2 MiB free")
    decision = decide(out, [], Policy())
    assert decision.action is Action.GIVE_UP and "disk check failed: 2 MiB free" in decision.reason


def assert_unhealthy(run: Run, check: str) -> str:
    """The run gave up (exit 1) before any attempt, with one diagnosis line naming `check`: that line."""
    out = run.finish(1, timeout=120)
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "diagnosis: " in line]
    assert len(lines) == 1 and f"diagnosis: unhealthy: {check} check failed: " in lines[0], out
    assert not run.events("attempt_start") and not run.run_dir.attempt(1).exists()
    (event,) = run.events("health")
    assert not event["ok"] and [p["check"] for p in event["problems"]] == [check]
    (decision,) = run.events("decision")  # what `status` shows as the run's reason
    assert decision["action"] == "give_up" and f"{check} check failed: " in decision["reason"]
    return lines[0]


@pytest.mark.slow
def test_a_full_disk_makes_the_run_give_up_unhealthy(supervise, small_fs, tmp_path: Path):
    fs = small_fs("2m")
    line = assert_unhealthy(supervise(ckpt=fs / "ckpt", out_dir=tmp_path), "disk")
    assert f"at {fs / 'ckpt'}" in line and "under the 16 MiB needed" in line


@pytest.mark.slow
def test_a_tiny_memory_cgroup_fails_the_memory_check(supervise, tmp_path: Path):
    cg = next(cgroups := memory_cgroup_of(tmp_path, TINY_CGROUP))
    try:
        line = assert_unhealthy(supervise(preexec_fn=join_cgroup(cg)), "memory")
        assert "under the 512 MiB needed (the minimum before any attempt)" in line
    finally:
        next(cgroups, None)  # kill anything left in it and remove it


@pytest.mark.slow
def test_a_wrong_device_answer_makes_the_run_give_up_unhealthy(supervise, env: dict[str, str]):
    env[health.DEBUG_ENV] = "wrong-answer:0"
    line = assert_unhealthy(supervise(), "device")
    assert "integer matmul off by up to 1" in line


@pytest.mark.slow
def test_an_unhealthy_node_under_nnodes_min_max_leaves_the_run_to_the_others(tmp_path: Path, menv: dict[str, str]):
    """Node 1 fails its device check before attempt 1: it exits naming the check, and the leader (--nnodes 1:2)
    trains alone and says why."""
    ckpt, port = tmp_path / "ckpt", free_port()
    sick = QUICK_RDZV | menv | {health.DEBUG_ENV: "wrong-answer:0"}
    leader = node(QUICK_RDZV | menv, ckpt, 0, port, nnodes="1:2", timeout=30)
    follower = node(sick, ckpt, 1, port, nnodes="1:2", timeout=30)
    assert follower.wait(120) == EXIT_FAILED, follower.output[-3000:]
    out = follower.output
    assert "diagnosis: unhealthy: device check failed: cpu" in out and "Traceback" not in out, out[-3000:]
    finish([leader], 0, timeout=240)
    decisions = [e for e in read_events(RunDir(ckpt.with_name("ckpt.run"))) if e["event"] == "decision"]
    assert [d["action"] for d in decisions] == ["finish"]
    assert "node 1 is unhealthy: device check failed: cpu" in decisions[0]["reason"]
    assert "going on with 1 node(s)" in decisions[0]["reason"]
