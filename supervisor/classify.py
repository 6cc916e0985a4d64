"""Turn the end of an attempt into one AttemptClass with evidence. Never raises: a classifier that crashes would
take the supervisor down with the run it protects.

Sources of evidence, best first: the per-rank error files that `@record` writes (exception type, message,
timestamp), torchrun's "Root Cause" summary in the attempt log (the first failed rank and its exit code or
signal), the kernel's OOM-kill counters (cgroup and host) before and after, and the tree's sampled memory.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from supervisor.states import AttemptClass, Outcome

_ROOT = re.compile(r"Root Cause \(first observed failure\):(.*?)(?:={10,}|\Z)", re.S)
_RANK = re.compile(r"rank\s*:\s*(\d+)")
_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_ERRFILE = re.compile(r"error_file\s*:\s*(\S+)")
_TIMEOUT_WORDS = ("watchdog caught collective operation timeout", "collective operation timeout", "timed out")


@dataclass
class Evidence:
    """Raw inputs gathered by the agent when torchrun exited (or was stopped by us)."""

    exitcode: int | None
    attempt_log: Path
    log_dir: Path
    stop_requested: bool = False
    saved_on_stop: bool = False  # a checkpoint with a signal stop_reason appeared during this attempt
    hang: str = ""  # why we decided it hung, if we did
    budget_reached: bool = False
    oom_kills: int = 0  # increase of the kernel's OOM-kill counters during the attempt
    peak_rss: int = 0
    memory_limit: int = 0


def read_error_files(log_dir: Path) -> list[dict]:
    """Every rank's @record error file under torchrun's --log-dir, earliest first."""
    found = []
    for path in sorted(log_dir.rglob("error.json")) if log_dir.exists() else []:
        try:
            data = json.loads(path.read_text())
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


def root_cause(attempt_log: Path) -> dict:
    """torchrun's own verdict: rank, exit code and error file of the first observed failure."""
    try:
        text = attempt_log.read_text(errors="replace")[-200_000:]
    except OSError:
        return {}
    blocks = _ROOT.findall(text)
    if not blocks:
        return {}
    block = blocks[-1]
    out: dict = {}
    if m := _RANK.search(block):
        out["rank"] = int(m.group(1))
    if m := _EXIT.search(block):
        out["exitcode"] = int(m.group(1))
    if (m := _ERRFILE.search(block)) and m.group(1) != "<N/A>":
        out["error_file"] = m.group(1)
    # torchrun orders failures by whole-second timestamps, so a rank that raised "peer gone" in the same second
    # as the SIGKILL of its peer can be named first. torchrun itself never SIGKILLs first (it sends SIGTERM), so
    # a worker that died by SIGKILL is the root cause whenever one is listed.
    summary = text[text.rfind("Failures:") :] if "Failures:" in text else block
    for rank, code in _FAILURE.findall(summary):
        if int(code) == -signal.SIGKILL and out.get("exitcode") != -signal.SIGKILL:
            return {"rank": int(rank), "exitcode": int(code)}
    return out


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code if code < 0 else code - 128).name
    except ValueError:
        return f"signal {abs(code)}"


def classify(ev: Evidence) -> Outcome:
    try:
        return _classify(ev)
    except Exception as e:  # noqa: BLE001 - see the module docstring
        return Outcome(AttemptClass.CRASH, f"unclassifiable exit ({type(e).__name__}: {e})", ev.exitcode)


def _classify(ev: Evidence) -> Outcome:
    code = ev.exitcode
    if ev.budget_reached and (code == 0 or ev.stop_requested):
        return Outcome(AttemptClass.COMPLETED, "the step budget is reached", code)
    if ev.stop_requested:
        how = "saved a checkpoint and exited" if ev.saved_on_stop else "exited without a new checkpoint"
        return Outcome(AttemptClass.STOPPED, f"stopped on request: the trainer {how}", code)
    if ev.hang:
        return Outcome(AttemptClass.HANG, ev.hang, code)
    if code == 0:
        return Outcome(AttemptClass.CRASH, "the trainer exited 0 before the step budget was reached", code)

    cause = root_cause(ev.attempt_log)
    errors = read_error_files(ev.log_dir)
    worker_code = cause.get("exitcode")
    first_error = errors[0] if errors else None
    if cause.get("error_file"):
        first_error = next((e for e in errors if e["path"] == cause["error_file"]), first_error)
    base = dict(exitcode=code, rank=cause.get("rank"), worker_exitcode=worker_code)

    killed_by = None  # the other ranks' error files ("connection closed by peer") are consequences, not causes
    if worker_code is not None and (worker_code < 0 or worker_code > 128) and not cause.get("error_file"):
        killed_by = _signal_name(worker_code)
    elif worker_code is None and code is not None and code < 0:
        killed_by = _signal_name(code)  # torchrun itself was killed
    if killed_by == "SIGKILL":
        near_limit = ev.memory_limit and ev.peak_rss >= 0.9 * ev.memory_limit
        if ev.oom_kills > 0:
            msg = f"a worker was SIGKILLed by the kernel OOM killer (oom_kill counter +{ev.oom_kills})"
            return Outcome(AttemptClass.HOST_OOM, msg, evidence={"oom_kills": ev.oom_kills}, **base)
        if near_limit:
            pct = 100 * ev.peak_rss / ev.memory_limit
            msg = f"a worker was SIGKILLed with memory at {pct:.0f}% of the {ev.memory_limit / 2**30:.1f} GiB limit"
            return Outcome(AttemptClass.HOST_OOM, msg, evidence={"peak_rss": ev.peak_rss}, **base)
    if killed_by:
        return Outcome(AttemptClass.SIGNAL, f"a worker was killed by {killed_by}", **base)
    if first_error:
        text = first_error["message"]
        line = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        kind = AttemptClass.CRASH
        if "OutOfMemoryError" in text or "CUDA out of memory" in text:
            kind = AttemptClass.CUDA_OOM
        elif any(w in text.lower() for w in _TIMEOUT_WORDS):
            kind = AttemptClass.NCCL_TIMEOUT
        return Outcome(kind, line[:500], error_file=first_error["path"], **base)
    return Outcome(AttemptClass.CRASH, f"torchrun exited with status {code} and no error file", **base)
