"""What `nanochat-run status` shows: the checkpoints (read through nanochat.checkpoint), each invocation of
`nanochat-run train` with its attempts, and the live heartbeat (read through supervisor.records).

Torch-free unless asked to `verify`: status must answer in a blink, and torch's import alone takes seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from nanochat import checkpoint
from nanochat.checkpoint import snapshots
from nanochat.locks import lock_holder
from supervisor import goodput
from supervisor.pace import current
from supervisor.records import RunDir, read_events, read_heartbeat

LIVE_HEARTBEAT = 5.0  # seconds: a heartbeat younger than this means a trainer is still at work


def gather_status(ckpt_dir: Path, run_path: Path, verify: bool, this_dir_only: bool = False) -> dict:
    """Everything `status` reports, as plain data (`--json` prints it as is; times are Unix seconds).
    `this_dir_only`: the run dir serves several checkpoint dirs (a speedrun's phases); show this one's runs."""
    ckpts = checkpoint.scan(ckpt_dir, verify=verify)
    marker, marker_problem = checkpoint.read_latest_marker(ckpt_dir)
    warnings: list[str] = []
    # what a resume would start from; without --verify by checksums only (the weights_only load needs torch)
    point = checkpoint.find_resume_point(ckpt_dir, warn=warnings.append, load_check=verify)
    newest = point[1] if point else None
    run = RunDir(run_path)
    events = read_events(run)
    holder = lock_holder(ckpt_dir)
    trainer = lock_holder(ckpt_dir, "trainer")
    runs = [r for r in invocations(events, holder) if not this_dir_only or r["checkpoint_dir"] == str(ckpt_dir)]
    hb = read_heartbeat(run.heartbeat)
    age = time.time() - hb["time"] if hb and isinstance(hb.get("time"), (int, float)) else None
    live = hb is not None and age is not None and (holder is not None or age < LIVE_HEARTBEAT)
    steps = budget(newest, hb)
    return {
        "checkpoint_dir": str(ckpt_dir),
        "run_dir": str(run_path),
        "checkpoints": [
            {
                "step": c.step,
                "saved_at": c.meta.saved_at if c.meta else None,
                "val_bpb": c.meta.metric("val_bpb").value if c.meta else None,
                "val": metric(c.meta),
                "size": c.size,
                "valid": c.valid,
                "final": c.final,
                "weights_only": c.weights_only,
                "problem": c.problem,
                "stop_reason": c.meta.stop_reason if c.meta else None,
            }
            for c in ckpts
        ],
        "latest_marker": marker,
        "latest_marker_problem": marker_problem,
        "newest_valid_step": newest.step if newest else None,
        "resume_from": str(point[0]) if point else None,
        "resume_verified": "full" if verify else "checksums",
        "resume_warnings": warnings,
        "num_iterations": steps,
        "complete": bool(newest and newest.final and steps is not None and newest.step >= steps),
        "invocations": runs,
        "attempts": [a for r in runs for a in r["attempts"] if a["class"] is not None],  # the finished ones
        "heartbeat": {**hb, "age": round(age, 1)} if live else None,
        # what the trainer said last about its remote copies (kept after it ended: the end-of-run lag matters most)
        "remote_lag": remote_lag([c.step for c in ckpts if c.valid], hb["remote_step"], hb.get("remote_error"))
        if hb and "remote_step" in hb
        else None,
        "changed_on_resume": newest.meta.changed_on_resume if newest and newest.meta else [],
        "rollbacks": newest.meta.rollbacks if newest and newest.meta else [],  # bad numbers (nanochat/guard.py)
        "nodes": other_nodes(run_path),
        "snapshots": [
            {"slot": str(slot), "step": c.step, "valid": c.valid, "problem": c.problem}
            for slot in snapshots.slots(ckpt_dir)
            for c in checkpoint.scan(slot)
        ],
        "supervisor": holder,
        "trainer": trainer,
        "active": bool(holder or trainer or (age is not None and age < LIVE_HEARTBEAT)),
        "waiting": waiting(events) if holder else None,
        "hang_deadline": hang_deadline(events, hb) if holder else None,
        "goodput": goodput.ledger(runs, hb if live else None).to_dict(),
        "disk_free": shutil.disk_usage(ckpt_dir).free,
    }


def metric(meta: checkpoint.Meta | None) -> tuple[str, float] | None:
    """(name, value) of the evaluation a checkpoint's meta records: val_bpb, or RL's val_pass@k."""
    found = ((k.removeprefix("val_"), m.value) for k, m in (meta.metrics if meta else {}).items())
    return next(((k, v) for k, v in found if v is not None), None)


def budget(newest: checkpoint.Checkpoint | None, hb: dict | None) -> int | None:
    """The step budget: the one the newest checkpoint was saved under, unless a trainer started since then with
    another (a later `train --num-iterations`): then the heartbeat's, as the supervisor judges it too."""
    meta = newest.meta if newest else None
    asked, beat = (hb.get("num_iterations"), hb.get("time")) if hb else (None, None)
    saved_at = (meta.saved_at if meta else None) or 0
    if isinstance(asked, int) and asked > 0 and isinstance(beat, (int, float)) and beat > saved_at:
        return asked
    return meta.num_iterations if meta else None


def invocations(events: list[dict], holder: dict | None) -> list[dict]:
    """One record per `nanochat-run train` invocation, oldest first, each with its attempts (numbered on across
    invocations). The outcome is the run_end's state; without one, "running" while that supervisor holds the lock,
    else "killed (no run_end)": the supervisor died (SIGKILL, a crash, the machine)."""
    runs: list[dict] = []
    for e in events:
        kind = e.get("event")
        if kind == "run_start" or (kind in ("attempt_start", "attempt_end") and not runs):
            runs.append({"run_id": e.get("run_id"), "pid": e.get("pid") if kind == "run_start" else None,
                         "phase": e.get("phase"), "checkpoint_dir": e.get("checkpoint_dir"),
                         "started": e.get("process_started") or e.get("time"), "ended": None, "outcome": None,
                         "state": None, "exit_code": None, "reason": None, "attempts": [],
                         "last_seen": None})  # fmt: skip
        if kind == "attempt_start":
            runs[-1]["attempts"].append(_attempt(e, runs[-1]["run_id"]))
        elif kind == "attempt_end":
            mine = [a for a in runs[-1]["attempts"] if a["attempt"] == e.get("attempt")]
            if not mine:  # its start was never recorded (a full disk): show the end anyway
                runs[-1]["attempts"].append(_attempt(e, runs[-1]["run_id"]))
                mine = runs[-1]["attempts"][-1:]
            mine[-1].update({"class": e.get("class"), "message": (e.get("outcome") or {}).get("message"),
                             "checkpoint_step": e.get("checkpoint_step"), "steps_lost": e.get("steps_lost"),
                             "step_reached": e.get("step_reached"), "ended": e.get("time"),
                             "ledger": e.get("ledger")})  # fmt: skip
        elif kind == "decision" and runs:
            runs[-1]["reason"] = e.get("reason")
        if runs and isinstance(e.get("time"), (int, float)):
            runs[-1]["last_seen"] = e["time"]
        if kind == "run_end" and runs:
            runs[-1].update(ended=e.get("time"), state=e.get("state"), exit_code=e.get("exit_code"))
    for i, r in enumerate(runs):
        live = i == len(runs) - 1 and holder is not None and holder.get("pid") in (r["pid"], None)
        r["outcome"] = r["state"] or ("running" if live else "killed (no run_end)")
    return runs


def _attempt(e: dict, run_id: str | None) -> dict:
    return {"attempt": e.get("attempt"), "run_id": run_id, "class": None, "message": None, "checkpoint_step": None,
            "steps_lost": None, "step_reached": None, "start_step": e.get("start_step"), "started": e.get("time"),
            "ended": None, "log_dir": e.get("log_dir"), "ledger": None}  # fmt: skip


def waiting(events: list[dict]) -> dict | None:
    """What a live supervisor in backoff waits for, from its last decision: {seconds left, attempt, reason}."""
    last = events[-1] if events else {}
    if last.get("event") != "decision" or last.get("action") != "restart":
        return None
    left = max(0.0, last.get("time", 0) + (last.get("delay") or 0) - time.time())
    return {"seconds": round(left, 1), "attempt": last.get("next_attempt"), "reason": last.get("reason", "")}


# ---------------------------------------------------------------------------------------------------------------
# display


def hang_deadline(events: list[dict], hb: dict | None) -> dict | None:
    """Under --hang-timeout auto, the deadline the live supervisor holds the trainer to now (the phase of the last
    heartbeat picks it) and every phase's, from its last `hang_deadlines` event; None before one."""
    last = next((e for e in reversed(events) if e.get("event") in ("hang_deadlines", "run_start")), None)
    if not last or last["event"] != "hang_deadlines":
        return None  # a fixed --hang-timeout, or this invocation has recorded none yet
    limits = {k: (v["seconds"], v["why"]) for k, v in last["deadlines"].items()}
    hb = hb or {}
    phase, seconds, why = current(limits, hb, healthy=hb.get("phase") not in (None, "starting"))
    return {"phase": phase, "seconds": seconds, "why": why, "deadlines": last["deadlines"]}


def render(info: dict) -> Group:
    """The status block: the checkpoint table, then one line per fact. Plain Text, never markup: messages from
    the trainer may hold brackets."""
    table = Table(title=f"checkpoints in {info['checkpoint_dir']}")
    for col in ("step", "saved", "validation", "size", "status"):
        table.add_column(col)
    for c in info["checkpoints"]:
        bpb = f"{c['val'][0]} {c['val'][1]:.4f}" if c.get("val") else "-"
        kind = " (final)" if c["final"] else " (weights only)" if c.get("weights_only") else ""
        state = f"valid{kind}" if c["valid"] else f"INVALID: {c['problem']}"
        table.add_row(str(c["step"]), when(c["saved_at"]), bpb, f"{c['size'] / 1e6:.1f} MB", state)
    lines: list[RenderableType] = [table]
    say = lambda s: lines.append(Text(s))  # noqa: E731
    marker = info["latest_marker"] if info["latest_marker"] is not None else info["latest_marker_problem"]
    say(f"latest_step.txt: {marker}")
    step, steps = info["newest_valid_step"], info["num_iterations"]
    if step is None:
        say("progress: no valid checkpoint yet")
    else:
        # from the checkpoint alone; how the last invocation ended is its own line, below
        done = ", complete (the final checkpoint)" if info["complete"] else ""
        say(f"progress: checkpoint at step {step} of {steps} ({100 * step / max(steps or 1, 1):.1f}%){done}")
    if runs := info["invocations"]:
        say(f"last run: {invocation_line(runs[-1])}")
    if hb := info["heartbeat"]:
        say(f"live: {heartbeat_line(hb, [c['step'] for c in info['checkpoints'] if c['valid']])}")
    elif info.get("remote_lag"):
        say(f"remote copies (the trainer's last word): {info['remote_lag']}")
    for n in info.get("nodes", []):
        beat = f"step {n['step']} (heartbeat {n['age']:.0f}s ago)" if n["age"] is not None else "no heartbeat"
        last = f"; attempts {n['attempts']}, the last {n['last']}" if n["attempts"] else ""
        say(f"node {n['node']}: {beat}{last}")
    for r in info.get("rollbacks", []):
        if "skipped" not in r:  # --on_nan/--on_spike=warn: the run went on
            kind = r.get("reason")
            say(f"bad numbers at step {r.get('at')}: a {kind}, {r.get('action')} (--on_{kind}=warn)")
            continue
        first, last = r["skipped"]
        how = "given with --skip_data" if r["reason"].startswith("asked") else f"a {r['reason']} at step {last}"
        say(f"skipped data: steps {first}-{last} ({how}; trained on from step {first - 1})")
    for c in info.get("changed_on_resume", []):
        say(f"changed on resume at step {c['step']}: --{c['setting']} {c['from']!r} -> {c['to']!r}")
    if runs:
        say("runs (one per `nanochat-run train`):")
    for r in runs:
        say(f"  run {invocation_line(r)}")
        for a in r["attempts"]:
            say(f"    {attempt_line(a, r['outcome'])}")
    if (g := info.get("goodput")) and g["wall_s"] > 0:
        for line in goodput.table(goodput.Ledger.from_dict(g)):
            say(line)
    for snap in info["snapshots"]:
        state = "valid" if snap["valid"] else f"INVALID: {snap['problem']}"
        say(f"in-memory snapshot: step {snap['step']} in {snap['slot']} ({state})")
    for warning in info["resume_warnings"]:
        say(f"warning: {warning}")
    sup, wait, trainer = info["supervisor"], info["waiting"], info["trainer"]
    line = f"supervisor: running, pid {sup.get('pid')} on {sup.get('host')}" if sup else "supervisor: not running"
    if wait:
        line += f", waiting {wait['seconds']:.0f}s before attempt {wait['attempt']}: {wait['reason']}"
    say(line)
    if (d := info.get("hang_deadline")) and sup:
        say(f"hang deadline: {d['seconds']:g}s without progress while {d['phase']} (--hang-timeout auto: {d['why']})")
    if trainer and not sup:
        say(f"trainer: pid {trainer.get('pid')} on {trainer.get('host')} holds the checkpoint dir (unsupervised, or"
            " finishing its save after its supervisor died)")  # fmt: skip
    say(f"disk free: {info['disk_free'] / 1e9:.1f} GB")
    if r := info.get("remote"):
        behind = f", {r['behind']} checkpoint(s) behind" if r["behind"] else ", up to date"
        say(f"remote: {r['url']}: step {r['remote_step']}{behind} (steps there: {r['remote_steps'] or 'none'})")
    return Group(*lines)


def invocation_line(r: dict) -> str:
    """`<run id> <outcome> (exit N)[: why]; started ..., ended ...` for one invocation of `train`."""
    ended = ""
    if r["ended"]:
        same_day = r["started"] and time.localtime(r["started"])[:3] == time.localtime(r["ended"])[:3]
        ended = f", ended {time.strftime('%H:%M:%S', time.localtime(r['ended'])) if same_day else when(r['ended'])}"
    code = f" (exit {r['exit_code']})" if r["exit_code"] is not None else ""
    why = f": {r['reason']}" if r["reason"] and r["outcome"] not in ("running", "succeeded") else ""
    return f"{r['run_id'] or '?'} {r['outcome']}{code}{why}; started {when(r['started'])}{ended}"


def attempt_line(a: dict, outcome: str) -> str:
    if a["class"] is None:
        what = "running" if outcome == "running" else "no attempt_end (its supervisor died)"
        return f"attempt {a['attempt']}: {what}; started {when(a['started'])}"
    where = f"checkpoint {a['checkpoint_step']}" if a["checkpoint_step"] is not None else "no checkpoint"
    lost = f", {a['steps_lost']} steps lost" if a["steps_lost"] else ""
    return f"attempt {a['attempt']}: {a['class']}: {a['message']} ({where}{lost})"


def other_nodes(run_path: Path) -> list[dict]:
    """A multi-node run's followers, as their records in <run dir>/nodeK/ tell: the leader's `status` shows all."""
    out = []
    for d in sorted(run_path.glob("node*"), key=lambda d: d.name) if run_path.is_dir() else []:
        if not (d.is_dir() and d.name[4:].isdigit()):
            continue
        hb, ends = (
            read_heartbeat(RunDir(d).heartbeat),
            [e for e in read_events(RunDir(d)) if e["event"] == "attempt_end"],
        )
        age = time.time() - hb["time"] if hb and isinstance(hb.get("time"), (int, float)) else None
        out.append({"node": int(d.name[4:]), "step": (hb or {}).get("step"), "age": age, "attempts": len(ends),
                    "last": ends[-1]["class"] if ends else None})  # fmt: skip
    return out


def remote_lag(valid_steps: list[int], remote_step: int | None, error: str | None) -> str:
    """How far a run's remote copies lag, e.g. "step 2500, 1 checkpoint behind; last error: ...": `valid_steps`
    are the local valid checkpoints, `remote_step` the newest one copied (the uploader's word)."""
    behind = sum(1 for s in valid_steps if remote_step is None or s > remote_step)
    text = f"step {remote_step}" if remote_step is not None else "nothing copied yet"
    text += f", {behind} checkpoint{'s' * (behind != 1)} behind" if behind else ", up to date"
    return text + (f"; last error: {error}" if error else "")


def heartbeat_line(hb: dict, valid_steps: list[int]) -> str:
    """The trainer's last heartbeat: where it is and how fast, and how old that news is."""
    step, total = hb.get("step"), hb.get("num_iterations")
    parts = [f"step {step}" + (f" of {total}" if total else ""), str(hb.get("phase") or "?")]
    if isinstance(hb.get("eval_batch"), int) and hb.get("eval_batches"):
        parts.append(f"eval batch {hb['eval_batch']}/{hb['eval_batches']}")
    if isinstance(hb.get("loss"), (int, float)):
        parts.append(f"loss {hb['loss']:.4f}")
    if isinstance(hb.get("tok_per_s"), (int, float)):
        parts.append(f"{hb['tok_per_s']:,.0f} tok/s")
    if isinstance(hb.get("mfu"), (int, float)):
        parts.append(f"mfu {hb['mfu']:.1f}%")
    if isinstance(hb.get("gpu_mem"), (int, float)):
        parts.append(f"gpu mem {hb['gpu_mem'] / 2**30:.1f} GiB")
    if "remote_step" in hb:  # --remote_dir: how far the copies lag
        parts.append(f"remote: {remote_lag(valid_steps, hb['remote_step'], hb.get('remote_error'))}")
    return ", ".join(parts) + f" (heartbeat {hb['age']:.0f}s ago)"


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def console() -> Console:
    # soft wrap: long lines stay whole in a log or a pipe (and tests grep them) instead of breaking at 80 columns
    return Console(file=sys.stdout, soft_wrap=True, highlight=False)


def print_status(info: dict, json_out: bool, indent: int | None = 1) -> None:
    if json_out:
        print(json.dumps(info, indent=indent, default=str), flush=True)
    else:
        console().print(render_status(info))


def render_status(info: dict):
    """The status block, or a speedrun's phases and then its current phase's block."""
    if "phases" not in info:
        return render(info)
    from supervisor.speedrun_report import render_phases  # (it imports this module)

    parts = [render_phases(info)]
    return Group(*parts, render(info["current"])) if info.get("current") else parts[0]


def watch_status(gather, json_out: bool, interval: float | None) -> None:
    """Print the status once, or (with an interval) refresh until the run is over (no supervisor or trainer lock,
    no fresh heartbeat), then print it once more. A live panel on a terminal; off one, a block (or a JSON line)
    per refresh, for logs and scripts."""
    if interval is None:
        print_status(gather(), json_out)
        return
    live = None
    if sys.stdout.isatty() and not json_out:
        from rich.live import Live

        live = Live(console=console(), auto_refresh=False, transient=True)
        live.start()
    try:
        while (info := gather())["active"]:
            if live:
                live.update(render_status(info), refresh=True)
            else:
                print_status(info, json_out, indent=None)
                if not json_out:
                    print(flush=True)  # a blank line between blocks
            time.sleep(interval)
    finally:
        if live:
            live.stop()
    print_status(info, json_out, indent=None if json_out else 1)


def summary_lines(state: str, seconds: float, ckpt: checkpoint.Checkpoint | None, v, opts, attempts: int,
                  steps_lost: int, run_dir: Path) -> list[str]:  # fmt: skip
    """The supervisor's end-of-run summary: where the run got (`ckpt`: its resume point; `v`: the live View), how,
    what it cost, and where everything is."""
    meta = ckpt.meta if ckpt else None
    budget = opts.num_iterations or (meta.num_iterations if meta else None) or v.num_iterations
    parts = [f"step {ckpt.step}/{budget}" if ckpt else "no checkpoint"]
    if v.loss is not None:
        parts.append(f"train loss {v.loss:.4f}")
    if found := metric(meta):
        parts.append(f"val {found[0]} {found[1]:.4f} (step {meta.metric(f'val_{found[0]}').step})")
    if v.tok_per_s:
        parts.append(f"{v.tok_per_s:,.0f} tokens/s")
    minutes = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f}s"
    lines = [f"summary: {state} in {minutes}: {', '.join(parts)}",
             f"  attempts: {attempts} ({', '.join(v.restarts) or 'none'}); steps lost to failures: {steps_lost}",
             f"  checkpoints: {opts.checkpoint_dir}"]  # fmt: skip
    if v.remote_step is not None or v.remote_error:
        valid = [c.step for c in checkpoint.scan(opts.checkpoint_dir) if c.valid]
        lines.append(f"  remote: {remote_lag(valid, v.remote_step, v.remote_error)}")
    events = read_events(RunDir(run_dir))  # a speedrun's run dir holds every phase's: this checkpoint dir's runs
    runs = [r for r in invocations(events, None) if r["checkpoint_dir"] in (None, str(opts.checkpoint_dir))]
    lines += [f"  {line}" for line in goodput.table(goodput.ledger(runs))]
    return [*lines, f"  logs: {run_dir} (nanochat-run logs, nanochat-run status)"]
