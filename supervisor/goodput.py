"""The goodput ledger: where every second of a supervised run went, from the event log alone.

Goodput is the share of the run's wall time that became training steps the run kept. The rest (badput) is split
into named parts, each measured where it happens:

    start-up            launch -> the end of the attempt's first step (torchrun, imports, process group, loading
                        the checkpoint, compiling, warm-up), and the supervisor's own start before its first attempt
    kept steps          training steps a checkpoint kept (the trainer's clock, nanochat/telemetry.py Spent)
    lost steps          steps trained after the checkpoint the next attempt resumed from: trained again
    save blocked        periodic saves, the time the loop waited for them
    evaluation          evaluations and samples
    final save + flush  the final or stop save, the wait for the background writer, the upload flush, exiting
    detection           a failed attempt's last heartbeat -> the supervisor has it down (the step that was cut
                        short, the hang deadline, torchrun's teardown)
    back-off            between one attempt's end and the next one's launch
    unexplained         the wall time nothing above accounts for: shown, never hidden

Wall time is the time supervised: the sum over the invocations of `nanochat-run train` on the run dir (a live one
up to now). The time between invocations is shown apart: the machine may not have been rented then.

The trainer reports its part in the heartbeat ("spent", Spent.beat()); when an attempt ends, the supervisor turns
its last heartbeat into the attempt's parts (`attempt_parts`) and writes them into the attempt_end event, so the
ledger survives restarts and invocations and needs nothing but events.jsonl (`ledger`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PARTS = ("start-up", "kept steps", "lost steps", "save blocked", "evaluation", "final save + flush", "detection",
         "back-off", "unexplained")  # fmt: skip
CLEAN = ("completed", "stopped")  # attempt classes that ended on the trainer's own terms: no detection to charge


def attempt_parts(hb: dict, started: float, ended: float, first: int, resumes_at: int | None,
                  clean: bool) -> dict[str, float]:  # fmt: skip
    """One attempt's seconds by part, `started` to `ended` (wall), from its last heartbeat `hb` (of this attempt,
    or {}). `first`: the step it resumed from (0: from scratch); `resumes_at`: the step the next attempt resumes
    from (None: all it trained is kept); `clean`: it ended on the trainer's own terms (done, or stopped after a
    save), not by a failure, so there is no detection to charge."""
    parts = dict.fromkeys(PARTS, 0.0)
    beat = hb.get("time") if isinstance(hb.get("time"), (int, float)) and hb["time"] >= started else None
    spent = (hb.get("spent") or {}) if beat else {}
    if not spent.get("began"):  # it never finished its first step: all start-up, but a failure's silent end
        last = ended if clean or beat is None else beat
        parts["start-up"], parts["detection"] = last - started, ended - last
        return parts
    train = float(spent.get("train", 0.0))
    kept, reached = train, hb.get("step")
    if resumes_at is not None and isinstance(reached, int) and resumes_at < reached:
        kept_at = {int(k): float(v) for k, v in (spent.get("kept_at") or {}).items()}
        if resumes_at in kept_at:
            kept = kept_at[resumes_at]
        elif resumes_at <= first + 1:
            kept = 0.0  # nothing past the first step (which is start-up) survived
        else:  # a resume point older than the saves the trainer remembers: in proportion
            kept = train * (resumes_at - first - 1) / max(1, reached - first - 1)
    parts["start-up"] = spent["began"] - started
    parts["kept steps"], parts["lost steps"] = kept, train - kept
    parts["save blocked"], parts["evaluation"] = float(spent.get("save", 0.0)), float(spent.get("eval", 0.0))
    parts["final save + flush"] = float(spent.get("final", 0.0))
    # after the last heartbeat: exiting, or the failure and the time it took to notice
    parts["final save + flush" if clean else "detection"] += max(0.0, ended - beat)
    return parts


@dataclass
class Ledger:
    """Seconds by part over some invocations; `wall` is their supervised time, `between` the gaps between them."""

    wall: float = 0.0
    between: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    @property
    def ratio(self) -> float | None:
        return self.parts["kept steps"] / self.wall if self.wall > 0 else None

    def add(self, other: Ledger) -> None:
        self.wall += other.wall
        self.between += other.between
        for k, v in other.parts.items():
            self.parts[k] += v

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        return cls(d["wall_s"], d.get("between_invocations_s", 0.0), {k: d["parts"].get(k, 0.0) for k in PARTS})

    def to_dict(self) -> dict:
        return {"ratio": None if self.ratio is None else round(self.ratio, 4), "wall_s": round(self.wall, 3),
                "kept_s": round(self.parts["kept steps"], 3), "between_invocations_s": round(self.between, 3),
                "parts": {k: round(v, 3) for k, v in self.parts.items()}}  # fmt: skip


def ledger(runs: list[dict], live_hb: dict | None = None, now: float | None = None) -> Ledger:
    """The ledger of some invocations (supervisor/report.py `invocations`: each with its attempts, the attempts
    with the parts their attempt_end recorded). An invocation whose outcome is "running" counts up to `now`, its
    attempt in flight as if it ended well now, from the live heartbeat `live_hb`."""
    now = time.time() if now is None else now
    total, last_end = Ledger(), None
    for run in runs:
        if not isinstance(run.get("started"), (int, float)):
            continue
        one = _invocation(run, live_hb, now if run.get("outcome") == "running" else None)
        if last_end is not None:
            one.between = max(0.0, run["started"] - last_end)
        last_end = run["started"] + one.wall
        total.add(one)
    return total


def _invocation(run: dict, live_hb: dict | None, now: float | None) -> Ledger:
    """One invocation: its attempts' parts, the waits between attempts (back-off) and before the first (the
    supervisor's start-up), and what is left (unexplained). `now`: it is running."""
    out = Ledger()
    begin = run["started"]
    end = now if now is not None else run.get("ended") or run.get("last_seen") or begin  # no run_end: its last word
    out.wall = max(0.0, end - begin)
    idle_since = None
    for a in run["attempts"]:
        if not isinstance(a.get("started"), (int, float)):
            continue
        out.parts["start-up" if idle_since is None else "back-off"] += max(0.0, a["started"] - (idle_since or begin))
        if a.get("ledger"):
            for k, v in a["ledger"].items():
                out.parts[k] = out.parts.get(k, 0.0) + v
        elif a.get("ended") is None and now is not None and live_hb:  # in flight
            for k, v in attempt_parts(live_hb, a["started"], now, a.get("start_step") or 0, None, True).items():
                out.parts[k] += v
        idle_since = a.get("ended") or a["started"]
    out.parts["unexplained"] = out.wall - sum(v for k, v in out.parts.items() if k != "unexplained")
    return out


def table(led: Ledger) -> list[str]:
    """The ledger as text lines: goodput, then each part with its seconds and share of the wall time."""
    if led.wall <= 0:
        return ["goodput: nothing supervised yet"]
    lines = [f"goodput {100 * (led.ratio or 0):.1f}%: {led.parts['kept steps']:.1f}s of kept training in"
             f" {led.wall:.1f}s supervised"]  # fmt: skip
    for k in PARTS:
        lines.append(f"  {k:<19} {led.parts[k]:>9.1f}s {100 * led.parts[k] / led.wall:>6.1f}%")
    if led.between:
        lines.append(f"  (between invocations, not supervised: {led.between:.1f}s)")
    return lines
