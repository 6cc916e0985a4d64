"""The supervisor's classifier over attempt dirs laid out like torchrun's: every class, the evidence it names, and
that it never raises on garbage. (The e2e tests check the same classes with real processes.)"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from supervisor.classify import Evidence, classify, read_error_files, root_cause
from supervisor.states import AttemptClass, Outcome

C = AttemptClass

# ---------------------------------------------------------------------------------------------------------------
# classification over attempt dirs laid out like torchrun's


SEP = "=" * 60
LINE = "-" * 60


def failure_block(rank: int, exitcode: int, error_file: str | None, traceback: str = "") -> str:
    """One entry of torchrun's failure summary, as torch.distributed.elastic prints it."""
    pid = 1000 + rank
    name = signal.Signals(-exitcode).name if exitcode < 0 else ""
    return (
        f"  time      : 2026-01-01_00:00:00\n  host      : localhost\n"
        f"  rank      : {rank} (local_rank: {rank})\n"
        f"  exitcode  : {exitcode} (pid: {pid}) {f' ({name})' if name else ''}\n"
        f"  error_file: {error_file or '<N/A>'}\n"
        f"  traceback : {traceback or f'Signal {-exitcode} ({name}) received by PID {pid}'}\n"
    )


class Attempt:
    """An attempt dir as torchrun leaves it: torchrun.log plus <run id>/attempt_0/<local rank>/error.json."""

    def __init__(self, root: Path):
        self.dir = root / "attempt-001"
        self.ranks = self.dir / "5f0c-run_abc" / "attempt_0"
        self.ranks.mkdir(parents=True)
        self.log = self.dir / "torchrun.log"
        self.log.write_text("[default0]:step 00001/00030 | loss 6.2\n[default0]:step 00002/00030 | loss 6.1\n")

    def error_file(self, rank: int, exc_line: str, timestamp: int = 1700000000, raw: str | None = None) -> str:
        path = self.ranks / str(rank) / "error.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if raw is None:
            stack = f'Traceback (most recent call last):\n  File "scripts/base_train.py", line 1\n{exc_line}\n'
            extra = {"py_callstack": stack, "timestamp": str(timestamp)}
            raw = json.dumps({"message": {"message": exc_line, "extraInfo": extra}})
        path.write_text(raw)
        return str(path)

    def torchrun_failed(self, root: tuple[int, int, str | None], others: list[tuple[int, int, str | None]] = ()):
        """Append torchrun's ChildFailedError summary: other failures first, then the root cause."""
        text = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n" + SEP + "\n"
        text += "scripts.base_train FAILED\n" + LINE + "\nFailures:\n"
        if not others:
            text += "  <NO_OTHER_FAILURES>\n"
        for i, (rank, code, err) in enumerate(others, 1):
            text += f"[{i}]:\n" + failure_block(rank, code, err, "Traceback (most recent call last):\n  ...")
        text += LINE + "\nRoot Cause (first observed failure):\n[0]:\n"
        text += failure_block(*root, "" if root[1] < 0 else "Traceback (most recent call last):\n  ...")
        text += SEP + "\n"
        with open(self.log, "a") as f:
            f.write(text)

    def evidence(self, exitcode: int | None = 1, **kw) -> Evidence:
        return Evidence(exitcode=exitcode, attempt_log=self.log, log_dir=self.dir, **kw)


PEER_GONE = "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4567"


@pytest.fixture
def att(tmp_path: Path) -> Attempt:
    return Attempt(tmp_path)


def test_sigkilled_worker_with_its_cgroup_oom_counter_up_is_host_oom(att):
    # rank 1 notices its peer is gone and leaves an error file; the root cause is rank 0 (pid 1000), killed without
    peer = att.error_file(1, PEER_GONE, timestamp=1700000005)
    att.torchrun_failed(root=(0, -9, None), others=[(1, 1, peer)])
    out = classify(att.evidence(1, oom_cgroup={1000: 1, 1001: 0}, peak_rss=10, memory_limit=100))
    assert out.kind is C.HOST_OOM
    assert "a worker (rank 0, pid 1000) was SIGKILLed by the kernel OOM killer" in out.message
    assert "memory cgroup" in out.message and out.evidence == {"source": "cgroup", "oom_kills": 1}
    assert (out.rank, out.worker_exitcode, out.exitcode) == (0, -9, 1)
    # the counter of another worker's cgroup says nothing about rank 0
    out = classify(att.evidence(1, oom_cgroup={1000: 0, 1001: 1}, peak_rss=10, memory_limit=100))
    assert out.kind is C.SIGNAL


def test_sigkilled_worker_named_by_the_kernel_log_is_host_oom(att):
    att.torchrun_failed(root=(1, -9, None))
    line = "Memory cgroup out of memory: Killed process 1001 (python) total-vm:123kB"
    out = classify(att.evidence(1, oom_kernel={1001: line}, oom_host=1))
    assert out.kind is C.HOST_OOM and out.evidence == {"source": "kernel log", "line": line}
    assert "kernel log: Memory cgroup out of memory: Killed process 1001" in out.message
    out = classify(att.evidence(1, oom_kernel={4242: line.replace("1001", "4242")}, oom_host=1))
    assert out.kind is C.SIGNAL  # somebody else's OOM kill


def test_sigkilled_worker_near_the_memory_limit_with_the_host_counter_up_is_host_oom(att):
    att.torchrun_failed(root=(1, -9, None))
    out = classify(att.evidence(1, oom_host=1, peak_rss=95, memory_limit=100))
    assert out.kind is C.HOST_OOM and "95%" in out.message and out.rank == 1
    assert out.evidence["source"] == "host" and "host oom_kill counter +1" in out.message
    assert classify(att.evidence(1, oom_host=1, peak_rss=90, memory_limit=100)).kind is C.HOST_OOM  # the threshold
    out = classify(att.evidence(1, oom_host=None, peak_rss=95, memory_limit=100))
    assert out.kind is C.HOST_OOM and "no OOM counter readable" in out.message  # memory is all we know
    assert classify(att.evidence(1, oom_host=0, peak_rss=95, memory_limit=100)).kind is C.SIGNAL


def test_plain_kill_while_an_unrelated_process_was_oom_killed_is_signal(att):
    # `kill -9` of a worker while the host's OOM killer took something else: the host-wide counter went up, but
    # not the worker's cgroup, the kernel log names another pid, and memory was nowhere near the limit
    peer = att.error_file(1, PEER_GONE)
    att.torchrun_failed(root=(0, -9, None), others=[(1, 1, peer)])
    other = "Out of memory: Killed process 777 (chrome)"
    out = classify(att.evidence(1, oom_cgroup={1000: 0}, oom_kernel={777: other}, oom_host=1, peak_rss=80,
                                memory_limit=100))  # fmt: skip
    assert out.kind is C.SIGNAL and out.message == "a worker (rank 0, pid 1000) was killed by SIGKILL"
    assert (out.rank, out.worker_exitcode) == (0, -9) and out.error_file is None
    out = classify(att.evidence(1, peak_rss=99, memory_limit=0))  # unknown limit: no guess
    assert out.kind is C.SIGNAL


def test_sigkill_wins_when_torchrun_names_the_peer_that_raised_first(att):
    # same-second timestamps: torchrun may name rank 1's "peer gone" as the root cause of rank 0's SIGKILL
    peer = att.error_file(1, PEER_GONE)
    att.torchrun_failed(root=(1, 1, peer), others=[(0, -9, None)])
    out = classify(att.evidence(1, peak_rss=10, memory_limit=100))
    assert out.kind is C.SIGNAL and "SIGKILL" in out.message
    assert (out.rank, out.worker_exitcode) == (0, -9)


@pytest.mark.parametrize(("code", "name"), [(-15, "SIGTERM"), (-6, "SIGABRT"), (137, "SIGKILL"), (143, "SIGTERM")])
def test_other_signals_and_shell_style_exit_codes(att, code, name):
    att.torchrun_failed(root=(0, code, None))
    out = classify(att.evidence(1))
    assert out.kind is C.SIGNAL and name in out.message


def test_torchrun_itself_killed(att):
    # killed torchrun: it never printed a summary; an old error file in its dir would not be this attempt's
    out = classify(att.evidence(-9, torchrun_pid=4321))
    assert out.kind is C.SIGNAL and out.message == "torchrun (pid 4321) was killed by SIGKILL"
    assert out.worker_exitcode is None
    out = classify(att.evidence(-9, torchrun_pid=4321, killed="no progress for 5s", saved_on_stop=True))
    assert out.message == ("torchrun (pid 4321) was killed by SIGKILL (by the supervisor: no progress for 5s); its"
                           " workers saved a checkpoint on the way out")  # fmt: skip
    line = "Out of memory: Killed process 4321 (python)"
    assert classify(att.evidence(-9, torchrun_pid=4321, oom_kernel={4321: line})).kind is C.HOST_OOM


def test_trainer_exit_2_is_refused(att):
    msg = "CheckpointError: the checkpoint at step 20 is past --num_iterations=15; use --resume=False"
    err = att.error_file(0, msg)
    att.torchrun_failed(root=(0, 2, err))
    out = classify(att.evidence(1))
    assert out.kind is C.REFUSED and out.message == msg and out.worker_exitcode == 2
    # no error file (it could not be written): the trainer's one stderr line is the message
    att2 = Attempt(att.dir.parent / "second")
    with open(att2.log, "a") as f:
        f.write("[default0]:base_train: error: --depth=3 does not match the checkpoint's 2\n")
    att2.torchrun_failed(root=(0, 2, None))
    out = classify(att2.evidence(1))
    assert out.kind is C.REFUSED and out.message == "--depth=3 does not match the checkpoint's 2"


def test_trainer_exit_74_is_storage_and_names_a_full_disk(att):
    err = att.error_file(1, "StorageError: [Errno 28] No space left on device: '/ckpt/model_000004.pt'")
    att.torchrun_failed(root=(1, 74, err))
    disks = [{"path": "/ckpt", "free": 0, "total": 64 << 20}, {"path": "/run", "free": 10 << 30, "total": 20 << 30}]
    out = classify(att.evidence(1, disks=disks))
    assert out.kind is C.STORAGE and out.rank == 1 and out.worker_exitcode == 74
    assert out.message == ("StorageError: [Errno 28] No space left on device: '/ckpt/model_000004.pt'; disk full:"
                           " /ckpt has 0 bytes free")  # fmt: skip
    out = classify(att.evidence(1, disks=disks[1:]))  # an EIO, say, with space left: no disk-full claim
    assert out.kind is C.STORAGE and "disk full" not in out.message


def test_failure_without_evidence_on_a_full_disk_is_storage(att):
    # a full disk swallowed torchrun's log and the error files: the free space is the evidence
    disks = [{"path": "/fs/ckpt", "free": 4096, "total": 64 << 20}]
    out = classify(att.evidence(1, disks=disks))
    assert out.kind is C.STORAGE and out.message == "disk full: /fs/ckpt has 4096 bytes free"
    out = classify(att.evidence(1, disks=[{"path": "/fs/ckpt", "free": 32 << 20, "total": 64 << 20}]))
    assert out.kind is C.CRASH
    # the supervisor saw the worker exit 74 itself (torchrun could not log a summary)
    workers = [
        {"pid": 5, "rank": 0, "exitcode": 143, "ended": 2.0},
        {"pid": 6, "rank": 1, "exitcode": 74, "ended": 1.0},
    ]
    out = classify(att.evidence(1, workers=workers, disks=disks))
    assert out.kind is C.STORAGE and (out.rank, out.worker_exitcode) == (1, 74) and "disk full" in out.message


def test_cuda_oom_error_file(att):
    err = att.error_file(0, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    att.torchrun_failed(root=(0, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM
    assert out.message == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert out.error_file == err and out.rank == 0 and out.worker_exitcode == 1


def test_nccl_watchdog_timeout(att):
    msg = (
        "RuntimeError: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"
        " ran for 600000 milliseconds before timing out."
    )
    err = att.error_file(1, msg)
    att.torchrun_failed(root=(1, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.NCCL_TIMEOUT and "Watchdog caught collective operation timeout" in out.message
    assert out.rank == 1


def test_plain_exception_is_a_crash_with_the_exception_line(att):
    err = att.error_file(1, "RuntimeError: debug_fault: injected crash at step 12")
    att.torchrun_failed(root=(1, 1, err))
    out = classify(att.evidence(1))
    assert out.kind is C.CRASH and out.message == "RuntimeError: debug_fault: injected crash at step 12"
    assert out.error_file == err and out.rank == 1
    assert json.loads(json.dumps(out.to_dict()))["kind"] == "crash"


def test_multiline_exception_message_keeps_its_last_line(att):
    err = att.error_file(0, "ValueError: first line\nmore detail\nKeyError: 'the real one'")
    att.torchrun_failed(root=(0, 1, err))
    assert classify(att.evidence(1)).message == "KeyError: 'the real one'"


def test_root_cause_error_file_wins_over_earlier_ones(att):
    # a consequence can carry an earlier timestamp (clock skew, or a rank that failed on its own first);
    # torchrun's root cause names which file to believe
    att.error_file(0, PEER_GONE, timestamp=1700000000)
    err = att.error_file(1, "OutOfMemoryError: CUDA out of memory", timestamp=1700000009)
    att.torchrun_failed(root=(1, 1, err), others=[(0, 1, str(att.ranks / "0" / "error.json"))])
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM and out.error_file == err


def test_without_a_root_cause_the_earliest_error_file_is_used(att):
    att.error_file(1, PEER_GONE, timestamp=1700000009)
    first = att.error_file(0, "ZeroDivisionError: division by zero", timestamp=1700000001)
    out = classify(att.evidence(1))
    assert out.kind is C.CRASH and out.message == "ZeroDivisionError: division by zero" and out.error_file == first
    assert [e["local_rank"] for e in read_error_files(att.dir)] == [0, 1]


def test_nonzero_exit_without_any_evidence(att):
    out = classify(att.evidence(3))
    assert out.kind is C.CRASH and "status 3" in out.message and "no error file" in out.message


def test_hang(att):
    why = "no progress for --hang-timeout=5s at step 7"
    out = classify(att.evidence(-9, hang=why))
    assert out.kind is C.HANG and out.message == why


def test_stop_requested_is_stopped_whatever_the_exit(att):
    att.error_file(0, "KeyboardInterrupt")
    out = classify(att.evidence(1, stop_requested=True, saved_on_stop=True))
    assert out.kind is C.STOPPED and "saved a checkpoint" in out.message
    out = classify(att.evidence(-9, stop_requested=True, saved_on_stop=False))
    assert out.kind is C.STOPPED and "without a new checkpoint" in out.message


def test_budget_reached_is_completed(att):
    assert classify(att.evidence(0, budget_reached=True)).kind is C.COMPLETED
    # Ctrl+C after the final save, and the trainer still finished its evaluation: the run is done
    assert classify(att.evidence(0, budget_reached=True, stop_requested=True)).kind is C.COMPLETED
    # ... and when the stop cut the final evaluation short (the trainer exits 130): stopped, a rerun evaluates
    out = classify(att.evidence(130, budget_reached=True, stop_requested=True))
    assert out.kind is C.STOPPED and "before its evaluation ended" in out.message
    out = classify(att.evidence(0, budget_reached=False))
    assert out.kind is C.CRASH and "before the step budget" in out.message


def test_root_cause_parser(att):
    att.torchrun_failed(root=(1, -9, None), others=[(0, -15, "/x/0/error.json")])
    assert root_cause(att.log) == {"rank": 1, "exitcode": -9, "pid": 1001}
    att.torchrun_failed(root=(0, 1, "/x/0/error.json"))  # a later summary (torchrun printed twice): the last wins
    assert root_cause(att.log) == {"rank": 0, "exitcode": 1, "pid": 1000, "error_file": "/x/0/error.json"}
    assert root_cause(att.dir / "missing.log") == {}


GARBAGE_ERROR_FILES = [
    "",
    "not json",
    "[1, 2, 3]",
    '"a string"',
    "42",
    '{"message": 5}',
    '{"message": {"message": 5}}',
    '{"message": {"message": "x", "extraInfo": []}}',
    '{"message": {"message": "x", "extraInfo": {"timestamp": [1]}}}',
    '{"message": {"message": "x", "extraInfo": {"timestamp": "soon"}}}',
    '{"message": null}',
    "\x00\xff\xfe garbage",
]


@pytest.mark.parametrize("raw", GARBAGE_ERROR_FILES)
def test_classify_never_raises_on_garbage_error_files(att, raw):
    att.error_file(0, "", raw=raw)
    att.torchrun_failed(root=(0, 1, str(att.ranks / "0" / "error.json")))
    out = classify(att.evidence(1))
    assert isinstance(out, Outcome) and out.kind is C.CRASH and out.message


@pytest.mark.parametrize("raw", GARBAGE_ERROR_FILES)
def test_a_garbage_error_file_does_not_hide_a_good_one(att, raw):
    att.error_file(0, "", raw=raw)
    att.error_file(1, "OutOfMemoryError: CUDA out of memory")
    out = classify(att.evidence(1))
    assert out.kind is C.CUDA_OOM, out


def test_classify_never_raises_on_garbage_logs(tmp_path):
    rng = random.Random(0)
    (tmp_path / "dir.log").mkdir()
    logs = [tmp_path / "missing.log", tmp_path / "dir.log", tmp_path / "bin.log", tmp_path / "half.log"]
    logs[2].write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    logs[3].write_text("Root Cause (first observed failure):\n[0]:\n  rank      : x\n  exitcode  : -\n  error_file:")
    log_dirs = [tmp_path / "missing", tmp_path / "bin.log", tmp_path]
    for log in logs:
        for log_dir in log_dirs:
            for code in (None, 0, 1, -9, 137, 255, -1000, 10**6):
                for kw in ({}, {"oom_cgroup": {1: 3}}, {"oom_host": None, "peak_rss": 10, "memory_limit": 10},
                           {"memory_limit": -1}, {"disks": [{"path": "/", "free": 0, "total": 1}]}):  # fmt: skip
                    out = classify(Evidence(exitcode=code, attempt_log=log, log_dir=log_dir, **kw))
                    assert isinstance(out, Outcome) and isinstance(out.kind, AttemptClass) and out.message
    # wrong types altogether still come back as an Outcome
    out = classify(Evidence(exitcode="?", attempt_log=None, log_dir=None))  # type: ignore[arg-type]
    assert out.kind is C.CRASH and "unclassifiable" in out.message


def test_torchrun_failing_before_any_worker_is_diagnosed_from_its_log(att):
    att.log.write_text(
        "W1130 torch/distributed/run.py] starting\n\n"
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address."
        " port: 29400, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use\n"
    )
    out = classify(att.evidence(1, workers=[]))
    assert out.kind is C.CRASH and "before starting any worker" in out.message and "EADDRINUSE" in out.message
    assert len(out.evidence["log_tail"]) == 2  # blank lines left out
    # a worker ran: its silence is the trainer's, not torchrun's
    out = classify(att.evidence(1, workers=[{"pid": 5, "rank": 0, "exitcode": None, "ended": None}]))
    assert "left no error file" in out.message
