"""`--hang-timeout auto`: what the run's heartbeat shows about its pace (step time, save, evaluation and start-up
times), and the deadlines that follow from it. Pure: the watcher (watch.py) feeds it the heartbeat moves it sees,
attempt.hang_reason asks it for the deadline of the phase an attempt is in. Nothing measured yet: today's fixed
limits (FALLBACK; a save also gets --grace-period, start-up --startup-timeout)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

FALLBACK = 1800.0  # seconds without progress before anything of its kind was measured (the old fixed default)
MIN_STEPS = 3  # step times seen before the step deadline follows them (the first step, compiling, is start-up's)
WINDOW = 50  # the step deadline follows the median of the last WINDOW step times: a run's pace drifts
# A step's deadline: 10x the median step, at least 20 s. The median ignores a slow first step or the odd pause;
# 10x covers a loaded host's jitter, and the floor covers what runs between steps without a beat of its own (a
# sample generated every --sample_every steps, the stats of a log line, a data shard opened). A stuck collective
# on a d20 run (about 1 s a step) is caught in 20 s, not 30 minutes.
STEP_MULTIPLE, STEP_FLOOR = 10.0, 20.0
# A save's time depends on the disk more than on the run (page cache flushes, a shared file system): 5x the
# longest save of the same kind (reason, disk or memory) seen so far, at least 5 minutes. Killing a slow but
# healthy save costs the save and a restart; waiting 5 minutes on a stuck one costs little more.
SAVE_MULTIPLE, SAVE_FLOOR = 5.0, 300.0
# An evaluation beats after every batch: 10x the longest wait between its beats, at least a minute.
EVAL_MULTIPLE, EVAL_FLOOR = 10.0, 60.0
# A restart may load a checkpoint the first start did not, or compile without a cache: 5x the longest start-up
# seen, at least 5 minutes, never past --startup-timeout.
STARTUP_MULTIPLE, STARTUP_FLOOR = 5.0, 300.0


def save_kind(heartbeat: dict) -> str:
    """A save's kind, from its "saving" beat: its reason ("periodic", "completed", "signal:SIGTERM") and what it
    writes (a snapshot in memory is far faster than a disk save)."""
    return f"saving:{heartbeat.get('reason')}:{'disk' if heartbeat.get('disk', True) else 'memory'}"


@dataclass
class Pace:
    """What the heartbeat has shown so far (seconds), over every attempt of this supervisor."""

    steps: list[float] = field(default_factory=list)  # the last WINDOW step times
    saves: dict[str, float] = field(default_factory=dict)  # the longest save of each kind (save_kind)
    eval_batch: float = 0.0  # the longest wait between an evaluation's beats
    startup: float = 0.0  # the longest launch-to-first-step

    def moved(self, before: dict, after: dict, seconds: float) -> None:
        """The heartbeat went from `before` to `after`, `seconds` after `before` was first seen."""
        phase = before.get("phase")
        if phase == "saving":
            kind = save_kind(before)
            self.saves[kind] = max(self.saves.get(kind, 0.0), seconds)
        elif phase == "evaluating":
            self.eval_batch = max(self.eval_batch, seconds)
        elif phase == "training" and after.get("phase") == "training":
            steps = (after.get("step") or 0) - (before.get("step") or 0)
            if steps > 0:  # a beat the watcher missed (steps faster than its tick) shares the time
                self.steps = [*self.steps, seconds / steps][-WINDOW:]

    def started(self, seconds: float) -> None:
        """An attempt reached its first training beat `seconds` after its launch."""
        self.startup = max(self.startup, seconds)

    def limits(self, grace: float, startup_timeout: float) -> dict[str, tuple[float, str]]:
        """Each phase's deadline under `auto` and how it was set: "training", "evaluating", "starting" (0: off),
        "saving" (a save of a kind not yet seen) and one per kind of save seen (save_kind)."""
        out = {"training": (FALLBACK, f"{FALLBACK:g}s until {MIN_STEPS} steps are timed")}
        if len(self.steps) >= MIN_STEPS:
            median = statistics.median(self.steps)
            out["training"] = _scaled(median, STEP_MULTIPLE, STEP_FLOOR, "the median step")
        out["saving"] = (max(FALLBACK, grace), "no save of this kind timed yet: the longer of 1800s and --grace-period")
        for kind, longest in self.saves.items():
            out[kind] = _scaled(longest, SAVE_MULTIPLE, SAVE_FLOOR, "the longest such save")
        out["evaluating"] = (FALLBACK, f"{FALLBACK:g}s until an evaluation batch is timed")
        if self.eval_batch:
            out["evaluating"] = _scaled(self.eval_batch, EVAL_MULTIPLE, EVAL_FLOOR, "the longest evaluation batch")
        out["starting"] = (startup_timeout, "--startup-timeout")
        if self.startup and startup_timeout > 0:
            seconds, why = _scaled(self.startup, STARTUP_MULTIPLE, STARTUP_FLOOR, "the longest start-up")
            if seconds < startup_timeout:
                out["starting"] = (seconds, why)
        return out


def _scaled(measured: float, multiple: float, floor: float, what: str) -> tuple[float, str]:
    seconds = max(floor, multiple * measured)
    return seconds, f"{multiple:g}x {what} ({measured:.2f}s), at least {floor:g}s"


def current(limits: dict[str, tuple[float, str]], heartbeat: dict, healthy: bool) -> tuple[str, float, str]:
    """(the phase, its deadline, how it was set) for an attempt whose last beat is `heartbeat`."""
    if not healthy:
        return "starting", *limits["starting"]
    phase = heartbeat.get("phase")
    if phase == "saving":
        return "saving", *limits.get(save_kind(heartbeat), limits["saving"])
    if phase == "evaluating":
        return "evaluating", *limits["evaluating"]
    if phase == "done":  # the last upload: the trainer bounds it by its own --remote_flush_timeout
        return "done", FALLBACK, f"{FALLBACK:g}s while the trainer finishes (its uploads have their own timeout)"
    return "training", *limits["training"]
