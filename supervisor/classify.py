"""Turn the end of an attempt into one AttemptClass with evidence. Never raises: a classifier that crashes would
take the supervisor down with the run it protects.

Sources of evidence, best first: the trainer's exit status (2 refused, 74 storage), the per-rank error files that
`@record` writes (exception type, message, timestamp), torchrun's "Root Cause" summary in the attempt log (the
first failed rank, its pid and exit code or signal), the workers' exit statuses as the supervisor saw them, the
OOM evidence for the process that died (its memory cgroup's OOM-kill counter, the kernel log, the host-wide
counter with the tree's memory near the limit) and the free space of the checkpoint and run dirs' filesystems.
Every source is read from the attempt at hand only: its own log and its own dir.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import safefile
from nanochat.common import EXIT_DIVERGED, EXIT_REFUSED, EXIT_STORAGE
from supervisor.memory import nearly_full
from supervisor.procs import signal_name
from supervisor.states import AttemptClass, Outcome

_ROOT = re.compile(r"Root Cause \(first observed failure\):(.*?)(?:={10,}|\Z)", re.S)
_RANK = re.compile(r"rank\s*:\s*(\d+)")
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)(?:\s*\(pid:\s*(\d+)\))?")
_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)(?:\s*\(pid:\s*(\d+)\))?", re.S)
_ERRFILE = re.compile(r"error_file\s*:\s*(\S+)")
_WORKER_LINE = re.compile(r"^\[default\d+\]:", re.M)  # --tee prefixes every worker's output line with this
_TRAINER_ERROR = re.compile(r"\b(?:base_train|mid_train|chat_sft|chat_rl): error: (.+)")
_TIMEOUT_WORDS = ("watchdog caught collective operation timeout", "collective operation timeout", "timed out")


@dataclass
class Evidence:
    """Raw inputs gathered by the agent when the attempt ended (torchrun and every worker gone)."""

    exitcode: int | None  # torchrun's exit status (negative: the signal that killed it)
    attempt_log: Path
    log_dir: Path
    torchrun_pid: int | None = None
    stop_requested: bool = False
    saved_on_stop: bool = False  # a checkpoint with a signal stop_reason appeared during this attempt
    hang: str = ""  # why we decided it hung, if we did
    killed: str = ""  # why the supervisor itself killed torchrun, if it did
    budget_reached: bool = False
    workers: list[dict] = field(default_factory=list)  # {pid, rank, exitcode (None: not seen), ended}
    oom_cgroup: dict[int, int] = field(default_factory=dict)  # pid -> OOM kills in its memory cgroup meanwhile
    oom_kernel: dict[int, str] = field(default_factory=dict)  # pid -> the kernel log line that OOM-killed it
    oom_host: int | None = 0  # OOM kills on the whole host meanwhile (None: unreadable)
    peak_rss: int = 0
    memory_limit: int = 0
    disks: list[dict] = field(default_factory=list)  # {path, free, total}: checkpoint and run dirs' filesystems


def read_error_files(log_dir: Path) -> list[dict]:
    """Every rank's @record error file under torchrun's --log-dir, earliest first."""
    found = []
    for path in sorted(log_dir.rglob("error.json")) if log_dir.exists() else []:
        try:
            data = json.loads(safefile.read_bytes(path, limit=1 << 20))
            msg = data.get("message", {})
            if isinstance(msg, str):
                text, stamp = msg, 0
            else:
                text = msg.get("message", "")
                stamp = int(msg.get("extraInfo", {}).get("timestamp", 0) or 0)
            if not isinstance(text, str):
                raise TypeError(f"the message is a {type(text).__name__}")
            rank = int(path.parent.name) if path.parent.name.isdigit() else None
            found.append({"path": str(path), "message": text, "timestamp": stamp, "local_rank": rank})
        except (OSError, ValueError, AttributeError, TypeError):  # a damaged file must not hide the others
            continue
    return sorted(found, key=lambda e: e["timestamp"])


def _read_log(attempt_log: Path) -> str:
    try:
        return safefile.read_text(attempt_log, errors="replace")[-200_000:]
    except OSError:
        return ""


def root_cause(attempt_log: Path) -> dict:
    """torchrun's own verdict: rank, pid, exit code and error file of the first observed failure."""
    text = _read_log(attempt_log)
    blocks = _ROOT.findall(text)
    if not blocks:
        return {}
    block = blocks[-1]
    out: dict = {}
    if m := _RANK.search(block):
        out["rank"] = int(m.group(1))
    if m := _EXIT.search(block):
        out["exitcode"] = int(m.group(1))
        if m.group(2):
            out["pid"] = int(m.group(2))
    if (m := _ERRFILE.search(block)) and m.group(1) != "<N/A>":
        out["error_file"] = m.group(1)
    # torchrun orders failures by whole-second timestamps, so a rank that raised "peer gone" in the same second
    # as the SIGKILL of its peer can be named first. torchrun itself never SIGKILLs first (it sends SIGTERM), so
    # a worker that died by SIGKILL is the root cause whenever one is listed.
    summary = text[text.rfind("Failures:") :] if "Failures:" in text else block
    for rank, code, pid in _FAILURE.findall(summary):
        if int(code) == -signal.SIGKILL and out.get("exitcode") != -signal.SIGKILL:
            return {"rank": int(rank), "exitcode": int(code), **({"pid": int(pid)} if pid else {})}
    return out


def trainer_error(attempt_log: Path) -> str:
    """The last `base_train: error: <message>` line the trainer printed (exit 2 and 74 print one)."""
    found = _TRAINER_ERROR.findall(_read_log(attempt_log))
    return found[-1].strip() if found else ""


def _observed_cause(ev: Evidence) -> dict:
    """The first worker the supervisor saw die with a non-zero status: the root cause when torchrun could not
    print one (a full disk swallows its log)."""
    failed = [w for w in ev.workers if w.get("exitcode") not in (None, 0)]
    if not failed:
        return {}
    w = min(failed, key=lambda w: w.get("ended") or 0)
    return {"rank": w.get("rank"), "pid": w.get("pid"), "exitcode": w["exitcode"]}


def classify(ev: Evidence) -> Outcome:
    try:
        return _classify(ev)
    except Exception as e:  # noqa: BLE001 - see the module docstring
        return Outcome(AttemptClass.CRASH, f"unclassifiable exit ({type(e).__name__}: {e})", ev.exitcode)


def _classify(ev: Evidence) -> Outcome:
    code = ev.exitcode
    if ev.budget_reached and code == 0:
        return Outcome(AttemptClass.COMPLETED, "the step budget is reached", code)
    if ev.budget_reached and ev.stop_requested:  # the stop cut the final evaluation short; a rerun evaluates
        return Outcome(AttemptClass.STOPPED, "stopped on request after the final checkpoint, before its evaluation"
                       " ended (run again to evaluate it)", code)  # fmt: skip
    if ev.stop_requested:
        how = "saved a checkpoint and exited" if ev.saved_on_stop else "exited without a new checkpoint"
        killed = f"; {ev.killed}" if ev.killed else ""
        return Outcome(AttemptClass.STOPPED, f"stopped on request: the trainer {how}{killed}", code)
    if ev.hang:
        return Outcome(AttemptClass.HANG, ev.hang, code)
    if code == 0:
        return Outcome(AttemptClass.CRASH, "the trainer exited 0 before the step budget was reached", code)

    torchrun_killed = code is not None and code < 0  # it printed no summary: it had no chance
    cause = {} if torchrun_killed else root_cause(ev.attempt_log) or _observed_cause(ev)
    errors = read_error_files(ev.log_dir)
    worker_code, rank = cause.get("exitcode"), cause.get("rank")
    pid = cause.get("pid") or next((w["pid"] for w in ev.workers if rank is not None and w["rank"] == rank), None)
    first_error = errors[0] if errors else None
    if cause.get("error_file"):
        first_error = next((e for e in errors if e["path"] == cause["error_file"]), first_error)
    error_line = _last_line(first_error["message"]) if first_error else ""
    base = dict(exitcode=code, rank=rank, worker_exitcode=worker_code)
    if first_error:
        base["error_file"] = first_error["path"]
    full = "; ".join(f"disk full: {d['path']} has {d['free']} bytes free" for d in ev.disks if nearly_full(d))
    evidence = {"disks": ev.disks} if full else {}

    if worker_code == EXIT_REFUSED:
        msg = error_line or trainer_error(ev.attempt_log) or "the trainer refused its settings (exit 2)"
        return Outcome(AttemptClass.REFUSED, msg, **base)
    if worker_code == EXIT_DIVERGED:
        msg = error_line or trainer_error(ev.attempt_log) or "the run diverged (exit 65)"
        return Outcome(AttemptClass.DIVERGED, msg, **base)
    if worker_code == EXIT_STORAGE or error_line.startswith("StorageError"):
        msg = error_line or trainer_error(ev.attempt_log) or "storage error (the trainer exited 74)"
        return Outcome(AttemptClass.STORAGE, "; ".join(filter(None, [msg, full])), evidence=evidence, **base)

    killed_by, who = None, ""
    if torchrun_killed:
        killed_by, who, pid = signal_name(code), f"torchrun (pid {ev.torchrun_pid})", ev.torchrun_pid
    elif worker_code is not None and (worker_code < 0 or worker_code > 128) and not cause.get("error_file"):
        # the other ranks' error files ("connection closed by peer") are consequences, not causes
        killed_by, who = signal_name(worker_code), "a worker (" + ", ".join(_named(rank, pid)) + ")"
        base.pop("error_file", None)
    if killed_by == "SIGKILL" and not ev.killed and (oom := _oom(ev, pid)):
        return Outcome(AttemptClass.HOST_OOM, f"{who} was SIGKILLed by the kernel OOM killer ({oom[0]})",
                       evidence=oom[1], **base)  # fmt: skip
    if killed_by:
        msg = f"{who} was killed by {killed_by}" + (f" (by the supervisor: {ev.killed})" if ev.killed else "")
        if ev.saved_on_stop:
            msg += "; its workers saved a checkpoint on the way out"
        return Outcome(AttemptClass.SIGNAL, msg, **base)
    if first_error:
        text = first_error["message"]
        kind = AttemptClass.CRASH
        if "OutOfMemoryError" in text or "CUDA out of memory" in text:
            kind = AttemptClass.CUDA_OOM
        elif any(w in text.lower() for w in _TIMEOUT_WORDS):
            kind = AttemptClass.NCCL_TIMEOUT
        return Outcome(kind, "; ".join(filter(None, [error_line[:500], full])), evidence=evidence, **base)
    if full:  # a failure that left no error file, on a full filesystem: the error file could not be written
        return Outcome(AttemptClass.STORAGE, full, evidence=evidence, **base)
    no_worker = not ev.workers and not _WORKER_LINE.search(_read_log(ev.attempt_log))
    if no_worker and not torchrun_killed and (tail := log_tail(ev.attempt_log)):
        # torchrun failed on its own (a rendezvous that cannot bind, a broken install): its log says why
        return Outcome(AttemptClass.CRASH, f"torchrun exited with status {code} before starting any worker: {tail[-1]}",
                       evidence={"log_tail": tail}, **base)  # fmt: skip
    status = f"exit status {worker_code}" if worker_code is not None else f"torchrun exit status {code}"
    return Outcome(AttemptClass.CRASH, f"the trainer failed ({status}) and left no error file", **base)


def log_tail(attempt_log: Path, n: int = 10) -> list[str]:
    """The last `n` non-blank lines of the attempt log."""
    return [line for line in _read_log(attempt_log)[-20_000:].splitlines() if line.strip()][-n:]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "unknown error"


def _named(rank: int | None, pid: int | None) -> list[str]:
    return [s for s in (f"rank {rank}" if rank is not None else "", f"pid {pid}" if pid else "") if s] or ["?"]


def _oom(ev: Evidence, pid: int | None) -> tuple[str, dict] | None:
    """(how we know, evidence) if the kernel's OOM killer took `pid` (None: any process of the attempt)."""
    pids = [pid] if pid is not None else sorted(set(ev.oom_cgroup) | set(ev.oom_kernel))
    for p in pids:
        if ev.oom_cgroup.get(p, 0) > 0:
            n = ev.oom_cgroup[p]
            return f"its memory cgroup's oom_kill counter went up by {n}", {"source": "cgroup", "oom_kills": n}
    for p in pids:
        if p in ev.oom_kernel:
            return f"kernel log: {ev.oom_kernel[p][:200]}", {"source": "kernel log", "line": ev.oom_kernel[p]}
    near = ev.memory_limit > 0 and ev.peak_rss >= 0.9 * ev.memory_limit
    if near and (ev.oom_host is None or ev.oom_host > 0):
        pct, gib = 100 * ev.peak_rss / ev.memory_limit, ev.memory_limit / 2**30
        counter = f"host oom_kill counter +{ev.oom_host}" if ev.oom_host else "no OOM counter readable"
        return f"memory at {pct:.0f}% of the {gib:.1f} GiB limit, {counter}", {
            "source": "host", "oom_kills": ev.oom_host, "peak_rss": ev.peak_rss}  # fmt: skip
    return None
