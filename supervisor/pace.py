"""`--hang-timeout auto`: what the run's heartbeat shows about its pace (step time, save, evaluation and start-up
times, the throughput of its remote uploads), and the deadlines that follow from it. Pure: the watcher (watch.py)
feeds it the heartbeats and their moves it sees, attempt.hang_reason asks it for the deadline of the phase an
attempt is in. Nothing measured yet: today's fixed limits (FALLBACK; a save also gets --grace-period, start-up
--startup-timeout).

What it measured belongs to one configuration of the run (`config_of`: world size, batch, model): the watcher
logs it with each `hang_deadlines` event, and the next invocation on the same run dir starts from the last one if
its first heartbeat shows the same configuration (`adopt`); a changed configuration starts afresh."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields, replace

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
# The final upload (--remote_dir; the trainer waits for it before exiting, beating its progress): 5x the time the
# largest checkpoint sent takes at the slowest throughput seen in earlier uploads, at least 5 minutes (the uploader
# retries a failed request after up to 2 minutes of backoff: that is not a hang). Every file sent is progress.
UPLOAD_MULTIPLE, UPLOAD_FLOOR = 5.0, 300.0
# What must match for a measured pace to carry over to another attempt or invocation: the heartbeat's fixed fields
CONFIG = ("world_size", "device", "device_batch_size", "total_batch_size", "max_seq_len", "flops_per_token")


def config_of(heartbeat: dict) -> dict:
    """The configuration a heartbeat was written under (what decides the pace of steps, saves and uploads)."""
    return {key: heartbeat.get(key) for key in CONFIG}


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
    upload_bytes: int = 0  # the largest checkpoint an upload sent
    upload_rate: float = 0.0  # the slowest upload seen, in bytes/s
    config: dict | None = None  # config_of the heartbeats it was measured from

    def moved(self, before: dict, after: dict, seconds: float) -> None:
        """The heartbeat went from `before` to `after`, `seconds` after `before` was first seen."""
        if before.get("uploading") is not None:  # the final upload's progress (after a stop's save): no save time
            return
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

    def seen(self, heartbeat: dict) -> None:
        """Any heartbeat: the trainer's uploader says what its last upload sent and how long it took."""
        sent, seconds = heartbeat.get("remote_sent_bytes"), heartbeat.get("remote_sent_seconds")
        if isinstance(sent, int) and isinstance(seconds, (int, float)) and sent > 0 and seconds > 0:
            self.upload_bytes = max(self.upload_bytes, sent)
            rate = sent / seconds
            self.upload_rate = min(self.upload_rate, rate) if self.upload_rate else rate

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
        out["uploading"] = (FALLBACK, f"{FALLBACK:g}s until an upload is timed (the trainer's own"
                            " --remote_flush_timeout may end it sooner)")  # fmt: skip
        if self.upload_rate:
            what = f"the largest checkpoint ({self.upload_bytes / 1e6:.1f} MB) at the slowest upload's rate"
            out["uploading"] = _scaled(self.upload_bytes / self.upload_rate, UPLOAD_MULTIPLE, UPLOAD_FLOOR, what)
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
    if heartbeat.get("uploading") is not None:  # the trainer waits for its last upload (a finished or stopped run)
        # (a `hang_deadlines` event of an older supervisor has no upload deadline: the fallback)
        return "uploading", *limits.get("uploading", (FALLBACK, f"{FALLBACK:g}s until an upload is timed"))
    if phase == "saving":
        return "saving", *limits.get(save_kind(heartbeat), limits["saving"])
    if phase == "evaluating":
        return "evaluating", *limits["evaluating"]
    if phase == "done":  # what is left: tearing down
        return "done", FALLBACK, f"{FALLBACK:g}s while the trainer finishes"
    return "training", *limits["training"]


def record(pace: Pace) -> dict:
    """What the pace measured, for the event log (a later invocation's `seed`)."""
    return asdict(pace)


def seed(events: list[dict]) -> Pace | None:
    """The pace the last `hang_deadlines` event of a run dir recorded, if any (a malformed one counts as none)."""
    for event in reversed(events):
        # (one logged before any heartbeat has no configuration: it measured nothing, an earlier one may have)
        if event.get("event") == "hang_deadlines" and isinstance((event.get("pace") or {}).get("config"), dict):
            known = {f.name for f in fields(Pace)}
            try:
                pace = Pace(**{k: v for k, v in event["pace"].items() if k in known})
            except TypeError:
                return None
            numbers = [*pace.steps, *pace.saves.values()] if isinstance(pace.saves, dict) else [None]
            fine = isinstance(pace.steps, list) and isinstance(pace.config, dict)
            return pace if fine and all(isinstance(x, (int, float)) for x in numbers) else None
    return None


def adopt(pace: Pace, heartbeat: dict, earlier: Pace | None) -> tuple[Pace, str]:
    """The pace to go on with once `heartbeat` is seen, and what to say about it ('' for nothing new): the same
    configuration keeps `pace`; the first heartbeat of an invocation takes `earlier` (a previous invocation's) if its
    configuration is the same; a changed configuration measures afresh (its steps, saves and uploads differ)."""
    config = config_of(heartbeat)
    if pace.config == config:
        return pace, ""
    if pace.config is None:
        if earlier is not None and earlier.config == config:
            return earlier, "hang deadlines: from the pace an earlier invocation measured (the same configuration)"
        return replace(pace, config=config), ""
    changed = ", ".join(k for k in CONFIG if pace.config.get(k) != config.get(k))
    return Pace(config=config), f"hang deadlines: the configuration changed ({changed}): measuring the pace afresh"
