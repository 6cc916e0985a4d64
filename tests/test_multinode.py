"""Multi-node runs on one machine: two `nanochat-run train` supervisors as two "nodes" (`--nnodes 2
--nproc-per-node 1`, torchrun's c10d rendezvous on 127.0.0.1), sharing the checkpoint dir. The leader (node 0)
decides for both; a worker killed on either node restarts both together; the result is bit-identical to one node
with two processes; bad multi-node options are one line each."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from nanochat import checkpoint
from supervisor.agent import EXIT_FAILED
from supervisor.records import RunDir, read_events
from tests.runs import TINY, assert_same_final_state, free_port
from tests.supervised import NANOCHAT_RUN, Run, assert_no_orphans, cli

pytestmark = pytest.mark.slow
# torchrun's own rendezvous waits after a node is lost (last call, close: 30 s each by default) made short, through
# torchrun's environment form of --rdzv-conf: the tests are about our supervisors, not those waits
QUICK_RDZV = {"PET_RDZV_CONF": "last_call_timeout=2,close_timeout=3"}


def node(env: dict, ckpt: Path, rank: int, port: int, *trainer: str, nnodes: str = "2", timeout: int = 60,
         addr: str | None = None) -> Run:  # fmt: skip
    cmd = [*NANOCHAT_RUN, "train", "--checkpoint-dir", str(ckpt), "--nproc-per-node", "1", "--nnodes", nnodes,
           "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}", "--backoff", "0", "--progress-every",
           "600", "--node-timeout", str(timeout), *(["--local-addr", addr] if addr else []), "--", *TINY,
           *trainer]  # fmt: skip
    return Run(cmd, ckpt, env, out_dir=ckpt.parent)


def finish(nodes: list[Run], code: int, timeout: float = 180) -> list[str]:
    """Wait for every node's supervisor, then check each exit code and that nothing was left behind."""
    codes = [n.wait(timeout) for n in nodes]
    assert codes == [code] * len(nodes), "\n\n".join(n.output[-3000:] for n in nodes)
    for n in nodes:
        assert_no_orphans(n.ckpt)
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


@pytest.mark.parametrize("node1_memory", ["kept", "unusable"])
def test_in_memory_snapshots_are_per_machine_and_used_only_when_every_machine_holds_one(
    tmp_path, menv, reference_2, node1_memory
):
    """--snapshot_every=1: each "machine" (its own NANOCHAT_SHM_DIR) keeps its own snapshots. Global rank 1 is
    SIGKILLed after step 7 (before its save): both nodes resume from the snapshot of step 6, not the checkpoint at
    4. If node 1's shared memory is unusable (a folder others can enter: refused, its snapshots go off), the
    snapshot is not on every machine and both resume from disk. Either way the result is bit-identical."""
    ckpt, port = tmp_path / "ckpt", free_port()
    shm = [tmp_path / "shm0", tmp_path / "shm1"]
    for d in shm:
        d.mkdir()
    if node1_memory == "unusable":
        (shm[1] / f"nanochat-snapshots-{os.getuid()}").mkdir(mode=0o777)
        (shm[1] / f"nanochat-snapshots-{os.getuid()}").chmod(0o777)
    args = ("--debug_fault=sigkill@step:7,rank=1", "--snapshot_every=1")
    runs = [node({**menv, "NANOCHAT_SHM_DIR": str(shm[k])}, ckpt, k, port, *args) for k in (0, 1)]
    finish(runs, 0)
    logs = "".join(p.read_text() for p in sorted(ckpt.with_name("ckpt.run").glob("**/torchrun.log")))
    if node1_memory == "kept":
        assert "resume: the in-memory snapshot at step 6" in logs, logs[-3000:]
    else:
        assert "snapshots are off for this run" in logs and "resuming from disk instead" in logs, logs[-3000:]
        assert "resumed from step 4" in logs
    assert_same_final_state(ckpt, reference_2)
    assert not list(shm[0].glob("*/*/slot*"))  # the final checkpoint is durable: every machine's memory is freed


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
    leader = node(QUICK_RDZV | menv, ckpt, 0, port, *slow, nnodes="1:2", timeout=5)
    follower = node(QUICK_RDZV | menv, ckpt, 1, port, *slow, nnodes="1:2", timeout=5)
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


def test_a_node_lost_without_nnodes_min_max_makes_the_leader_give_up_naming_it(tmp_path, menv):
    ckpt, port, slow = tmp_path / "ckpt", free_port(), ("--num_iterations=40",)
    env = QUICK_RDZV | menv
    leader, follower = node(env, ckpt, 0, port, *slow, timeout=5), node(env, ckpt, 1, port, *slow, timeout=5)
    leader.wait_for_step(6)
    tree = [follower.proc, *psutil.Process(follower.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=10)
    out = finish([leader], EXIT_FAILED, timeout=120)[0]
    assert "waiting up to --node-timeout=5s for node(s) [1] to report" in out, out[-3000:]  # says why it waits
    assert "node(s) [1] did not report the end of attempt 1 within --node-timeout=5s" in out, out[-3000:]
    decisions = [e for e in read_events(RunDir(ckpt.with_name("ckpt.run"))) if e["event"] == "decision"]
    assert [d["action"] for d in decisions] == ["give_up"]


def test_node_local_checkpoint_dirs_are_refused_before_anything_runs(tmp_path, menv):
    port, dirs = free_port(), [tmp_path / "node0", tmp_path / "node1"]  # as if each node had its own disk
    for d in dirs:
        d.mkdir()
    outs = finish([node(menv, dirs[0] / "ckpt", 0, port), node(menv, dirs[1] / "ckpt", 1, port)], 2, timeout=120)
    for out in outs:
        assert "node(s) [1] do not see node 0's checkpoint dir" in out and "or add --remote-dir" in out, out
    assert not list(dirs[0].glob("ckpt.run/attempt-*"))  # refused before any attempt


def test_a_dir_per_node_keeps_a_copy_on_every_node_and_a_new_machine_restores_from_the_remote(
    tmp_path, menv, reference_2
):
    """No shared disk: each node has its own checkpoint dir, and a file:// remote. Node 1 has the lower
    --local-addr, so torchrun makes it global rank 0: the leader's supervisor (node 0) is not on rank 0's node.
    1. Global rank 1 (node 0's worker) is SIGKILLed after step 7: both nodes restart from step 4, each from its
       own copy, and finish bit-identical to one node with two processes; both dirs hold the same checkpoints.
    2. Node 1 comes back as a new machine (its disk wiped) and the remote has lost its newest checkpoint: node 0
       uploads it, rank 0 restores it, and the run goes on from step 12, not 8.
    3. The same for node 0: rank 0 uploads step 14 and node 0 downloads it."""
    homes, remote = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "remote"
    dirs = [h / "ckpt" for h in homes]
    addrs = ["127.0.0.2", "127.0.0.1"]

    def run(*trainer: str) -> list[str]:
        port, args = free_port(), (f"--remote_dir=file://{remote}", *trainer)
        return finish([node(menv, dirs[k], k, port, *args, addr=addrs[k]) for k in (0, 1)], 0)

    def logs(k: int) -> str:
        return "".join(p.read_text() for p in sorted(homes[k].glob("ckpt.run/**/torchrun.log")))

    def wipe(k: int, lose_remote_step: int) -> None:
        shutil.rmtree(homes[k])
        homes[k].mkdir()
        (remote / checkpoint.file_name("meta", lose_remote_step)).unlink()  # uncommitted there

    for h in homes:
        h.mkdir()
    outs = run("--debug_fault=sigkill@step:7,rank=1")
    assert all("every node has its own checkpoint dir" in out for out in outs), outs[0]
    assert sorted([classes(dirs[0].with_name("ckpt.run")), classes(dirs[1].with_name("ckpt.run") / "node1")]) == [
        ["peer_failure", "completed"], ["signal", "completed"]]  # fmt: skip
    for d in dirs:
        assert_same_final_state(d, reference_2)
        assert [c.step for c in checkpoint.scan(d) if c.valid] == [4, 8, 12]
    assert "resumed from step 4" in logs(1)  # rank 0, on node 1

    wipe(1, 12)
    run("--num_iterations=14")
    assert "uploaded step 12" in logs(0) and "resumed from step 12" in logs(1), logs(0)[-3000:]
    for d in dirs:
        assert checkpoint.find_latest_valid(d, pytest.fail).step == 14
    assert_same_final_state(dirs[0], dirs[1], 14)

    wipe(0, 14)
    outs = run("--num_iterations=16")
    assert "no checkpoint in this node's dir: the trainer gets the run's newest" in outs[0], outs[0]
    assert "uploaded step 14" in logs(1) and "downloaded step 14" in logs(0), logs(0)[-3000:]
    assert_same_final_state(dirs[0], dirs[1], 16)


def test_every_node_says_whose_token_it_sees_and_the_leader_decides_the_checkpoint_dirs_mode(tmp_path):
    """The start-up check of supervisor/nodes.py, three "nodes" as threads over a real TCPStore: one shared dir,
    a dir per node (with and without a remote), and a mix (nodes 0 and 1 share, node 2 does not)."""
    from supervisor.nodes import Coordinator

    def check(dirs: list[Path], remote: bool) -> list[tuple[str, bool]]:
        endpoint = f"127.0.0.1:{free_port()}"
        coords = [Coordinator.connect(k, len(dirs), endpoint) for k in range(len(dirs))]
        with ThreadPoolExecutor(len(dirs)) as pool:
            got = list(pool.map(lambda k: coords[k].check_dirs(dirs[k], remote, 20), range(len(dirs))))
        assert not [p for d in dirs for p in d.glob(".nodes-*")]  # every token is removed
        return got

    shared, mine = tmp_path / "shared", [tmp_path / f"node{k}" for k in range(3)]
    assert check([shared] * 3, remote=False) == [("", False)] * 3
    assert check(mine, remote=True) == [("", True)] * 3
    refused = check(mine[:2], remote=False)
    assert all(why.startswith("node(s) [1] do not see node 0's checkpoint dir") and "--remote-dir" in why
               for why, _ in refused), refused  # fmt: skip
    mixed = check([shared, shared, mine[2]], remote=True)
    assert all("the nodes see 2 different checkpoint dirs" in why for why, _ in mixed), mixed


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
