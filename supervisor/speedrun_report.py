"""What a speedrun's run dir says about its phases: one record per phase for `nanochat-run status` (and --json),
and the report card, report.md, written at the end of every `nanochat-run speedrun` invocation.

Torch-free, like status: it reads the event log, the checkpoints' metas and chat_eval's records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from nanochat import checkpoint, safefile
from nanochat.locks import lock_holder
from supervisor import goodput
from supervisor.records import RunDir, read_events
from supervisor.report import invocations

SHOWN_SETTINGS = ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "num_iterations", "matrix_lr",
                  "embedding_lr", "unembedding_lr", "tasks", "num_samples", "prompts_per_step", "seed")  # fmt: skip


def phase_status(run_dir: Path) -> dict:
    """{"phases": [...], "active": bool, ...}: every phase of the newest speedrun on this run dir with its state,
    step and budget, newest checkpoint, time, attempts (number and class) and steps lost."""
    events = read_events(RunDir(run_dir))
    starts = [i for i, e in enumerate(events) if e.get("event") == "speedrun_start"]
    if not starts:
        return {"run_dir": str(run_dir), "phases": [], "active": False}
    first = events[starts[-1]]
    holder = lock_holder(run_dir, "speedrun")
    runs = invocations(events, None)
    phases = []
    for name in first.get("phases", []):
        mine = [e for e in events if e.get("phase") == name and e.get("event", "").startswith("phase_")]
        directory = Path(first.get("dirs", {}).get(name, "")) if name in first.get("dirs", {}) else None
        ckpts = checkpoint.scan(directory) if directory and directory.is_dir() else []
        newest = next((c for c in reversed(ckpts) if c.valid), None)
        meta = newest.meta if newest else None
        attempts = [a for r in runs if r.get("phase") == name for a in r["attempts"]]
        last = mine[-1] if mine else {}
        state = {"phase_skip": "done", "phase_start": "running" if holder else "interrupted"}.get(last.get("event"))
        if last.get("event") == "phase_end":
            code = last.get("exit_code")
            state = {0: "done", 130: "stopped (Ctrl+C)", 75: "stopped (SIGTERM)", 2: "refused"}.get(code, "failed")
        if directory is not None and state == "done" and not (newest and newest.final):
            state = "incomplete"
        phases.append({
            "phase": name,
            "state": state or "pending",
            "step": newest.step if newest else None,
            "budget": meta.num_iterations if meta else None,
            "newest_checkpoint": str(directory / checkpoint.file_name("meta", newest.step)) if newest else None,
            "checkpoint_dir": str(directory) if directory else None,
            "seconds": round(sum(e.get("seconds") or 0 for e in mine if e.get("event") == "phase_end"), 1),
            "attempts": [{k: a[k] for k in ("attempt", "class", "steps_lost")} for a in attempts],
            "steps_lost": sum(a["steps_lost"] or 0 for a in attempts),
            "goodput": goodput.ledger([r for r in runs if r.get("phase") == name]).to_dict(),
        })  # fmt: skip
    return {"run_dir": str(run_dir), "model_tag": first.get("tag"), "phases": phases, "active": holder is not None,
            "report": str(run_dir / "report.md")}  # fmt: skip


def is_speedrun(run_dir: Path) -> bool:
    return any(e.get("event") == "speedrun_start" for e in read_events(RunDir(run_dir)))


def render_phases(info: dict) -> Table:
    """The phases of a speedrun as a table (`nanochat-run status`)."""
    table = Table(title=f"speedrun {info.get('model_tag')} ({info['run_dir']})", title_justify="left")
    for column in ("phase", "state", "step", "newest checkpoint", "attempts", "steps lost", "goodput"):
        table.add_column(column)
    for p in info["phases"]:
        step = f"{p['step']}/{p['budget']}" if p["step"] is not None else "-"
        newest = Path(p["newest_checkpoint"]).name if p["newest_checkpoint"] else "-"
        attempts = ", ".join(f"#{a['attempt']} {a['class'] or 'running'}" for a in p["attempts"]) or "-"
        ratio = (p.get("goodput") or {}).get("ratio")
        table.add_row(p["phase"], p["state"], step, newest, attempts, str(p["steps_lost"]),
                      "-" if ratio is None else f"{100 * ratio:.1f}%")  # fmt: skip
    return table


def _eval_records(directory: Path, step: int) -> dict:
    path = checkpoint.record_path(directory, "chat_eval", step)
    try:
        return json.loads(safefile.read_bytes(path, limit=16 << 20)).get("tasks", {})
    except (OSError, ValueError, AttributeError):
        return {}


def write_report(run_dir: Path, phases: list[str], dirs: dict[str, Path]) -> Path:
    """report.md: for each phase its settings, time, tokens, final loss and metric, evaluation table, restarts and
    steps lost. Rewritten whole (atomically) at the end of every invocation: a partial run gets a partial card."""
    status = {p["phase"]: p for p in phase_status(run_dir)["phases"]}
    lines = [
        "# nanochat speedrun report",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; run dir `{run_dir}`.",
        "",
    ]
    lines += ["| phase | state | step | time | restarts | steps lost | goodput |", "|---|---|---|---|---|---|---|"]
    for name in phases:
        s = status.get(name, {"state": "pending", "attempts": [], "steps_lost": 0, "seconds": 0})
        step = f"{s.get('step')}/{s.get('budget')}" if s.get("step") is not None else "-"
        restarts = ", ".join(a["class"] or "running" for a in s["attempts"][:-1]) or "none"
        ratio = (s.get("goodput") or {}).get("ratio")
        lines.append(f"| {name} | {s['state']} | {step} | {s['seconds'] / 60:.1f} min | {restarts} |"
                     f" {s['steps_lost']} | {'-' if ratio is None else f'{100 * ratio:.1f}%'} |")  # fmt: skip
    ledgers = {n: goodput.Ledger.from_dict(status[n]["goodput"]) for n in phases if status.get(n, {}).get("goodput")}
    if ledgers := {n: led for n, led in ledgers.items() if led.wall > 0}:  # the trained phases, supervised
        lines += ["", "## Where the time went (goodput: kept training time / supervised time)", "",
                  "| part | " + " | ".join(ledgers) + " |", "|---|" + "---|" * len(ledgers)]  # fmt: skip
        for part in goodput.PARTS:
            lines.append(f"| {part} | " + " | ".join(f"{led.parts[part]:.1f}s ({100 * led.parts[part] / led.wall:.1f}%)"
                                                    for led in ledgers.values()) + " |")  # fmt: skip
        lines.append("| **goodput** | " + " | ".join(f"**{100 * (led.ratio or 0):.1f}%** of {led.wall:.1f}s"
                                                  for led in ledgers.values()) + " |")  # fmt: skip
    for name in [p for p in phases if p in dirs]:
        s = status.get(name)
        directory = dirs[name]
        ckpts = checkpoint.scan(directory) if directory.is_dir() else []
        final = next((c for c in reversed(ckpts) if c.valid and c.final), None)
        lines += ["", f"## {name}", ""]
        if final is None:
            lines.append(f"No final checkpoint yet in `{directory}`.")
            continue
        meta = final.meta
        cfg = meta.train_config or {}
        model = meta.model_config or {}
        shown = {k: cfg[k] for k in SHOWN_SETTINGS if k in cfg}
        lines.append(f"- checkpoint: `{directory}` step {final.step} ({meta.phase})")
        lines.append(f"- model: {model.get('n_layer')} layers, width {model.get('n_embd')}, context"
                     f" {model.get('sequence_len')}, vocabulary {model.get('vocab_size')}")  # fmt: skip
        lines.append("- settings: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()))
        lines.append(f"- training time: {(meta.train_time or 0) / 60:.1f} min; wall time in this run dir:"
                     f" {(s or {}).get('seconds', 0) / 60:.1f} min")  # fmt: skip
        lines.append(f"- tokens: {meta.tokens_seen or 0:,} ({meta.world_size} ranks)")
        results = [f"train loss {meta.train_loss:.4f}"] if meta.train_loss is not None else []
        results += [
            f"{k.removeprefix('val_').replace('_', ' ')} {m.value:.4f} (step {m.step})"
            for k, m in meta.metrics.items()
            if m.value is not None
        ]
        lines.append("- final: " + (", ".join(results) or "-"))
        if s:
            attempts = ", ".join(f"#{a['attempt']} {a['class'] or 'running'}" for a in s["attempts"]) or "none here"
            lines.append(f"- attempts: {attempts}; steps lost to failures: {s['steps_lost']}")
        if scores := _eval_records(directory, final.step):
            lines += ["", "| task | kind | correct | total | accuracy |", "|---|---|---|---|---|"]
            for task, r in scores.items():
                lines.append(f"| {task} | {r.get('kind')} | {r.get('correct')} | {r.get('total')} |"
                             f" {100 * r.get('accuracy', 0):.1f}% |")  # fmt: skip
    path = run_dir / "report.md"
    checkpoint.write_text_atomic(path, "\n".join(lines) + "\n")
    return path
