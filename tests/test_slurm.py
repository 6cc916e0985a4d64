"""`nanochat-run` under SLURM: the SLURM_* defaults (supervisor/slurm.py), and scripts/slurm/nanochat.sbatch on a real
one-node SLURM started here, preempted after a save, requeued, resumed and finished bit-identical to a run that was
never stopped.

The `slurm` fixture installs nothing (`make slurm` does, as root; CI runs it): where munged, slurmctld and slurmd
exist it starts all three on localhost with their own key, config, ports and state under the test's tmp dir, and
skips when they cannot start, except with NANOCHAT_REQUIRE_SLURM set (CI), where that fails.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import cli, slurm
from supervisor.launch import UsageProblem
from supervisor.records import RunDir, read_events
from tests.runs import assert_same_final_state, free_port
from tests.supervised import NANOCHAT_RUN, REPO_ROOT, TINY

SBATCH = REPO_ROOT / "scripts" / "slurm" / "nanochat.sbatch"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons, off a user's PATH


def tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
BUDGET, SAVE_EVERY = 200, 20  # ~35 ms a step on 2 CPU cores: the stop lands well before the end


# ---- the SLURM_* defaults ------------------------------------------------------------------------------------


def test_node_lists_expand_like_scontrol_show_hostnames():
    assert slurm.expand("vm") == ["vm"]
    assert slurm.expand("node[01-03,07],gpu7") == ["node01", "node02", "node03", "node07", "gpu7"]
    assert slurm.expand("a[1-2]-ib[3,5]") == ["a1-ib3", "a1-ib5", "a2-ib3", "a2-ib5"]
    assert slurm.expand("x[8-10]") == ["x8", "x9", "x10"]
    for bad in ("", "a,,b", "a[1-2", "a]b", "a[]", "a[3-1]", "a[x]", "a[[1]]"):
        with pytest.raises(ValueError):
            slurm.expand(bad)


def test_outside_slurm_nothing_is_set():
    assert slurm.from_env({"PATH": "/usr/bin"}) == {}


def test_a_one_node_job_needs_no_rendezvous():
    assert slurm.from_env({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"}) == {"rdzv_id": "slurm-7"}


STEP = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[01-04]",
        "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "8"}  # fmt: skip


def test_a_multi_node_step_meets_at_its_first_node():
    assert slurm.from_env(STEP) == {"rdzv_id": "slurm-42", "nproc_per_node": 8, "nnodes": "4", "node_rank": 2,
                                    "rdzv_endpoint": f"gpu01:{slurm.RDZV_PORT}"}  # fmt: skip


def test_a_multi_node_job_outside_srun_or_with_a_task_per_gpu_is_refused():
    batch_shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(UsageProblem, match="srun --ntasks-per-node=1"):
        slurm.from_env(batch_shell)
    assert "nnodes" not in slurm.from_env(batch_shell, rendezvous=False)  # the user chose --nnodes themselves
    with pytest.raises(UsageProblem, match="exactly one per node"):
        slurm.from_env({**STEP, "SLURM_STEP_NUM_TASKS": "32"})


def test_train_takes_only_what_the_command_line_left_out(tmp_path: Path, monkeypatch, capsys):
    def dry_run(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["nanochat-run", "train", "--dry-run", "--depth", "1", "--checkpoint-dir",
                                          str(tmp_path / "c"), *args])  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            cli.main()
        out, err = capsys.readouterr()
        assert exc.value.code == 0, err
        return out.splitlines()[0]

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for name, value in STEP.items():
        if name != "SLURM_GPUS_ON_NODE":  # on the CPU: one worker
            monkeypatch.setenv(name, value)
    line = dry_run()
    assert "--nnodes=4 --rdzv-backend=c10d --rdzv-endpoint=gpu01:29500" in line and "--node-rank=2" in line
    line = dry_run("--node-rank", "3", "--rdzv-endpoint", "head:1234", "--nnodes", "4")
    assert "--rdzv-endpoint=head:1234" in line and "--node-rank=3" in line
    assert "--standalone" in dry_run("--nnodes", "1")


# ---- a real SLURM --------------------------------------------------------------------------------------------


class Slurm:
    """A one-node SLURM of our own: its client commands run with `env` (SLURM_CONF pointing at our config)."""

    def __init__(self, root: Path, sockets: Path):
        self.root, self.sockets = root, sockets
        self.conf = root / "slurm.conf"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # in case pytest runs in a job
        self.env = {**clean, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.jobs: list[str] = []

    def start(self) -> str | None:
        """Start munged, slurmctld and slurmd; None once the node is idle, else why not."""
        node = socket.gethostname().split(".")[0]  # slurmctld insists on its own short host name
        key = self.root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        munge_socket = self.sockets / "munge.socket"
        self.daemon("munged", "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                    f"--log-file={self.root / 'munged.log'}", f"--pid-file={self.root / 'munged.pid'}",
                    f"--seed-file={self.root / 'munged.seed'}")  # fmt: skip
        if not wait_until(lambda: munge_socket.exists(), 10):
            return "munged did not start:\n" + self.logs()
        for d in ("state", "log"):
            (self.root / d).mkdir()
        (self.sockets / "spool").mkdir()
        (self.root / "plugstack.conf").write_text("")
        ctld_port = free_port()  # the daemons bind them: see free_port for how small the race is
        node_port = ctld_port + 1
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text(CONF.format(root=self.root, sockets=self.sockets, node=node, cpus=cpus,
                                          memory=memory_mb(), ctld_port=ctld_port, node_port=node_port))  # fmt: skip
        self.daemon("slurmctld", "-D", "-f", str(self.conf))
        self.daemon("slurmd", "-D", "-f", str(self.conf), "-N", node)

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout
            return out.strip() == "idle"

        if not wait_until(idle, 30, alive=self.daemons):
            return "the node never became idle in sinfo:\n" + self.logs()
        return None

    def daemon(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.out", "wb") as out:
            self.daemons.append(subprocess.Popen([tool(name), *args], stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self.env))  # fmt: skip

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, env=self.env, timeout=30)
        if check and proc.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return proc

    def submit(self, *args: str, env: dict[str, str]) -> str:
        proc = subprocess.run([tool("sbatch"), "--parsable", *args], capture_output=True, text=True, timeout=30,
                              env={**env, "SLURM_CONF": str(self.conf)}, cwd=REPO_ROOT)  # fmt: skip
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{self.logs()}"
        self.jobs.append(proc.stdout.strip().split(";")[0])
        return self.jobs[-1]

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        parts = []
        for f in sorted([*self.root.glob("*.out"), *self.root.glob("log/*.log"), self.root / "munged.log"]):
            if f.exists():
                parts.append(f"--- {f.name}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for job in self.jobs:
            self.run("scancel", "--full", "--signal=KILL", job, check=False)
        for p in reversed(self.daemons):  # slurmd first, munged last
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # whatever the jobs left (slurmstepd, a batch shell, trainers): every process that inherited our SLURM_CONF
        ours = [p for p in psutil.process_iter() if p.pid != os.getpid() and self.owns(p)]
        for p in ours:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(ours, timeout=10)

    def owns(self, p: psutil.Process) -> bool:
        try:
            return p.environ().get("SLURM_CONF") == str(self.conf)
        except (psutil.Error, OSError):
            return False


# Everything SLURM needs on one machine without systemd or cgroups: processes tracked by their parent chain
# (proctrack/linuxproc), no task binding, no accounting, whole-node allocations. The spool dir holds slurmstepd's
# unix sockets, so it lives in a short path (a socket path has at most 107 bytes).
CONF = """\
ClusterName=nanochat
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sockets}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={sockets}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/linear
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def memory_mb() -> int:
    """A little under what slurmd will find (a node configured with more memory than it has is drained)."""
    kb = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
    return kb * 95 // 100 // 1024


def wait_until(ready: Callable[[], bool], timeout: float, alive: list[subprocess.Popen] = ()) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if any(p.poll() is not None for p in alive):
            return False
        time.sleep(0.2)
    return False


@pytest.fixture
def slurm_cluster(tmp_path: Path) -> Iterator[Slurm]:
    unavailable = pytest.fail if os.environ.get("NANOCHAT_REQUIRE_SLURM") else pytest.skip
    missing = [name for name in TOOLS if tool(name) is None]
    if missing:
        unavailable(f"no {', '.join(missing)}: install SLURM and munge (`make slurm`, as root)")
    if os.geteuid() != 0:
        unavailable("the SLURM test runs its own slurmd, which starts jobs as root: run it as root")
    root = tmp_path / "slurm"
    root.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="nc-slurm-", dir="/tmp"))
    sockets.chmod(0o755)  # munged wants its socket's dir reachable by everyone
    cluster = Slurm(root, sockets)
    try:
        problem = cluster.start()
        if problem:
            unavailable(f"SLURM did not start here: {problem}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def train_args(ckpt: Path) -> list[str]:
    return ["--depth", "1", "--num-iterations", str(BUDGET), "--save-every", str(SAVE_EVERY), "--checkpoint-dir",
            str(ckpt), "--nproc-per-node", "2", "--backoff", "0", "--", *TINY]  # fmt: skip


@pytest.mark.slow
def test_a_preempted_job_saves_requeues_and_resumes_exactly(slurm_cluster: Slurm, menv: dict, tmp_path: Path):
    env = {k: v for k, v in menv.items() if not k.startswith("SLURM_")}
    # the reference: the same run, never stopped (alongside the SLURM job)
    reference = tmp_path / "reference"
    with open(tmp_path / "reference.out", "wb") as out:
        plain = subprocess.Popen([*NANOCHAT_RUN, "train", *train_args(reference)], stdout=out,
                                 stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)  # fmt: skip

    ckpt, log = tmp_path / "ckpt", tmp_path / "job.out"
    job = slurm_cluster.submit(f"--output={log}", str(SBATCH), *train_args(ckpt),
                               env={**env, "NANOCHAT_RUN": NANOCHAT_RUN[0]})  # fmt: skip

    def output() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    def state() -> dict[str, str]:
        return slurm_cluster.job(job)

    def wait_for(what: str, ready: Callable[[], bool], timeout: float = 90) -> None:
        if not wait_until(ready, timeout):
            pytest.fail(f"no {what} in {timeout}s; job: {state()}\n{output()[-5000:]}\n{slurm_cluster.logs()}")

    wait_for("first checkpoint", lambda: (ckpt / "latest_step.txt").exists() or state()["JobState"] in ENDED)
    assert state()["JobState"] == "RUNNING", f"{state()}\n{output()}"
    # what a preemption or the time limit (--signal=B:TERM@120) does: TERM to the batch shell alone
    slurm_cluster.run("scancel", "--signal=TERM", "--batch", job)
    wait_for("requeue", lambda: state()["JobState"] == "PENDING" and state()["Restarts"] == "1")
    # SLURM holds a requeued job back for two minutes (its BeginTime); let it start sooner, but not at once: slurmd
    # refuses a job credential issued within a second or two of the one the requeue revoked
    time.sleep(3)
    wait_for("release", lambda: slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now",
                                                  check=False).returncode == 0, 20)  # fmt: skip
    wait_for("the end of the job", lambda: state()["JobState"] in ENDED, 120)

    out, final = output(), state()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{out}"
    assert final["Restarts"] == "1", final
    assert "start 1 on" in out and "start 2 on" in out, out
    assert "Exited with exit code 75" in out and "requeueing job" in out, out

    # the first start: the supervisor stopped the trainer after a save and exited 75; the second resumed from it
    events = read_events(RunDir(ckpt.with_name(ckpt.name + ".run")))
    ends = [e for e in events if e["event"] == "run_end"]
    assert [e["exit_code"] for e in ends] == [75, 0], ends
    attempts = [e for e in events if e["event"] == "attempt_end"]
    assert [e["class"] for e in attempts] == ["stopped", "completed"], attempts
    stopped, completed = attempts
    saved = stopped["checkpoint_step"]
    assert SAVE_EVERY <= saved < BUDGET, f"the stop came too late to test a resume: saved at step {saved}"
    second = [e for e in events if e["event"] == "attempt_start"][1]
    assert second["start_step"] == saved
    assert f"resumed from step {saved} in {ckpt}" in (Path(second["log_dir"]) / "torchrun.log").read_text()
    assert completed["checkpoint_step"] == BUDGET

    assert plain.wait(120) == 0, (tmp_path / "reference.out").read_text()
    assert_same_final_state(ckpt, reference, step=BUDGET)
