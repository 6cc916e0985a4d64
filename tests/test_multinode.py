"""Multi-node runs on one machine: two `nanochat-run train` supervisors as two "nodes" (`--nnodes 2
--nproc-per-node 1`, torchrun's c10d rendezvous on 127.0.0.1), sharing the checkpoint dir. The leader (node 0)
decides for both; a worker killed on either node restarts both together; the result is bit-identical to one node
with two processes; bad multi-node options are one line each."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint
from supervisor.records import RunDir, read_events
from tests.runs import TINY, assert_same_final_state, free_port
from tests.supervised import NANOCHAT_RUN, Run, assert_no_orphans, cli

pytestmark = pytest.mark.slow


def node(env: dict, ckpt: Path, rank: int, port: int, *trainer: str, nnodes: str = "2", timeout: int = 60) -> Run:
    cmd = [*NANOCHAT_RUN, "train", "--checkpoint-dir", str(ckpt), "--nproc-per-node", "1", "--nnodes", nnodes,
           "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", "--backoff", "0", "--progress-every",
           "600", "--node-timeout", str(timeout), "--", *TINY, *trainer]  # fmt: skip
    return Run(cmd, ckpt, env, out_dir=ckpt.parent)


def finish(nodes: list[Run], code: int, timeout: float = 180) -> list[str]:
    """Wait for every node's supervisor, then check each exit code and that nothing was left behind."""
    codes = [n.wait(timeout) for n in nodes]
    assert codes == [code] * len(nodes), "\n\n".join(n.output[-3000:] for n in nodes)
    assert_no_orphans(nodes[0].ckpt)
    return [n.output for n in nodes]


def classes(run_dir: Path) -> list[str]:
    return [e["class"] for e in read_events(RunDir(run_dir)) if e["event"] == "attempt_end"]


def test_two_nodes_complete_bit_identical_to_one_node_with_two_processes(tmp_path, menv, reference_2):
    ckpt, port = tmp_path / "ckpt", free_port()
    leader, follower = node(menv, ckpt, 0, port), node(menv, ckpt, 1, port)
    assert "the leader decides for every node" in finish([leader, follower], 0)[0]
    assert_same_final_state(ckpt, reference_2)
    run_dir = ckpt.with_name("ckpt.run")
    assert classes(run_dir) == ["completed"] and classes(run_dir / "node1") == ["completed"]
    assert (run_dir / "node1" / "heartbeat.json").exists()  # each node watches its own workers
    st = cli(menv, "status", "--checkpoint-dir", str(ckpt))  # the leader's status shows every node
    assert "node 1: step 12 (heartbeat" in st.stdout and "attempts 1, the last completed" in st.stdout, st.stdout


def test_a_worker_killed_on_one_node_restarts_both_nodes_together(tmp_path, menv, reference_2):
    """Global rank 1 is SIGKILLed after step 7 (on whichever node the rendezvous put it): that node records the
    signal, the other peer_failure; the leader decides one restart for both; the result is bit-identical."""
    ckpt, port = tmp_path / "ckpt", free_port()
    fault = "--debug_fault=sigkill@step:7,rank=1"
    leader, follower = node(menv, ckpt, 0, port, fault), node(menv, ckpt, 1, port, fault)
    finish([leader, follower], 0)
    run_dir = ckpt.with_name("ckpt.run")
    both = sorted([classes(run_dir), classes(run_dir / "node1")])
    assert both == [["peer_failure", "completed"], ["signal", "completed"]], both
    for d in (run_dir, run_dir / "node1"):
        events = read_events(RunDir(d))
        assert [e["action"] for e in events if e["event"] == "decision"] == ["restart", "finish"]
        assert [e["start_step"] for e in events if e["event"] == "attempt_start"] == [None, 4]
    assert_same_final_state(ckpt, reference_2)


def test_a_cuda_oom_on_one_node_halves_the_device_batch_on_both(tmp_path, menv):
    ckpt, port = tmp_path / "ckpt", free_port()
    fault = "--debug_fault=oom@step:7,rank=1"
    finish([node(menv, ckpt, 0, port, fault), node(menv, ckpt, 1, port, fault)], 0)
    run_dir = ckpt.with_name("ckpt.run")
    assert sorted([classes(run_dir), classes(run_dir / "node1")]) == [["cuda_oom", "completed"],
                                                                      ["peer_failure", "completed"]]  # fmt: skip
    for d in (run_dir, run_dir / "node1"):  # the leader's overrides, carried out by both nodes
        second = [e for e in read_events(RunDir(d)) if e["event"] == "attempt_start"][1]
        assert second["overrides"] == {"device_batch_size": "1", "total_batch_size": "128"}, second
    final = checkpoint.find_latest_valid(ckpt, pytest.fail)
    assert final.final and final.meta["train_config"]["device_batch_size"] == 1


def test_ctrl_c_to_the_leader_stops_every_node_at_the_same_step_and_a_rerun_resumes(tmp_path, menv, reference_2):
    ckpt, port = tmp_path / "ckpt", free_port()
    slow = ("--num_iterations=100000", "--save_every=0")
    leader, follower = node(menv, ckpt, 0, port, *slow), node(menv, ckpt, 1, port, *slow)
    leader.wait_for_step(3)
    leader.proc.send_signal(signal.SIGINT)
    finish([leader, follower], 130, timeout=120)
    (saved,) = checkpoint.scan(ckpt)
    assert saved.valid and saved.meta["stop_reason"] == "signal:SIGINT"
    run_dir = ckpt.with_name("ckpt.run")
    assert classes(run_dir) == ["stopped"] and classes(run_dir / "node1") == ["stopped"]
    budget, port = (f"--num_iterations={saved.step + 2}", "--save_every=0"), free_port()
    finish([node(menv, ckpt, 0, port, *budget), node(menv, ckpt, 1, port, *budget)], 0)
    assert checkpoint.find_latest_valid(ckpt, pytest.fail).step == saved.step + 2
    starts = [e for e in read_events(RunDir(run_dir / "node1")) if e["event"] == "attempt_start"]
    assert starts[-1]["start_step"] == saved.step  # both nodes resumed from the stop's checkpoint


def test_a_node_lost_for_good_under_nnodes_min_max_leaves_the_run_to_the_others(tmp_path, menv):
    """Node 1's supervisor, torchrun and worker are SIGKILLed mid-run and never come back: with --nnodes 1:2 the
    leader waits --node-timeout for its report, then goes on alone at the new world size, and says why."""
    ckpt, port, slow = tmp_path / "ckpt", free_port(), ("--num_iterations=40",)
    leader = node(menv, ckpt, 0, port, *slow, nnodes="1:2", timeout=5)
    follower = node(menv, ckpt, 1, port, *slow, nnodes="1:2", timeout=5)
    leader.wait_for_step(6)
    tree = [follower.proc, *psutil.Process(follower.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=10)
    finish([leader], 0, timeout=240)
    decisions = [e for e in read_events(RunDir(ckpt.with_name("ckpt.run"))) if e["event"] == "decision"]
    assert decisions[0]["action"] == "restart" and "going on with 1 node(s)" in decisions[0]["reason"]
    assert decisions[-1]["action"] == "finish"
    final = checkpoint.find_latest_valid(ckpt, pytest.fail)
    assert final.final and final.step == 40 and final.meta["world_size"] == 1


def test_node_local_checkpoint_dirs_are_refused_before_anything_runs(tmp_path, menv):
    port, dirs = free_port(), [tmp_path / "node0", tmp_path / "node1"]  # as if each node had its own disk
    for d in dirs:
        d.mkdir()
    outs = finish([node(menv, dirs[0] / "ckpt", 0, port), node(menv, dirs[1] / "ckpt", 1, port)], 2, timeout=120)
    for out in outs:
        assert "node(s) [1] do not see the checkpoint dir" in out and "or add --remote-dir" in out, out
    assert not list(dirs[0].glob("ckpt.run/attempt-*"))  # refused before any attempt


def test_multi_node_options_are_checked_up_front(tmp_path, menv):
    base = ["train", "--checkpoint-dir", str(tmp_path / "ckpt"), "--nproc-per-node", "1"]
    cases = [
        (["--nnodes", "2", "--node-rank", "0"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "host"], "--rdzv-endpoint must be HOST:PORT"),
        (["--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:29500"], "needs --node-rank on every node"),
    ]
    for args, message in cases:
        t0 = time.monotonic()
        proc = cli(menv, *base, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert time.monotonic() - t0 < 30  # before any torchrun starts
    assert_no_orphans(tmp_path / "ckpt")
