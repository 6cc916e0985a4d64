"""Pictures of a run: its metrics.jsonl (and the supervisor's event log, for why each restart happened) as plain
data series, drawn into a PNG (`nanochat-run plot`) or as a small text curve in the terminal (`status --plot`).

`series` reads and never draws; `draw` and `text_curve` only draw what `series` returned, so tests check the data
a picture was made from, not its pixels. matplotlib and plotext are imported only when something is drawn (`status`
without --plot never imports this module), and the terminal curve is one line saying why not where plotext is
missing.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import metrics, safefile
from nanochat.registry import by_folder
from supervisor.goodput import PARTS, Ledger, ledger
from supervisor.records import RunDir, read_events

WIDTH, HEIGHT, DPI = 12, 8, 100  # inches and dots per inch: a 1200 x 800 PNG, readable at 100% on any screen
UNSUPERVISED = "restart"  # the cause of a restart when no event log says how the attempt before it ended
METRIC_NAMES = {"val_bpb": "validation bits per byte", "val_pass@k": "validation pass@k"}  # for the axis labels
_NOT_METRICS = {"kind", "step", "time", "attempt"}
BAR_COLORS = {"kept steps": "tab:green", "lost steps": "tab:red", "start-up": "tab:gray", "save blocked": "tab:orange",
              "evaluation": "tab:purple", "final save + flush": "tab:brown", "detection": "tab:pink",
              "back-off": "tab:cyan", "unexplained": "black"}  # fmt: skip


class PlotError(Exception):
    """Nothing to draw, or nothing to draw with; the message is one line for the user."""


@dataclass(frozen=True)
class Restart:
    """One attempt after the first: it resumed from the checkpoint at `step`, and the attempts before it had logged
    steps up to `lost_to`; steps lost_from..lost_to (inclusive) were lost and trained again (lost_to < lost_from:
    none were)."""

    step: int
    cause: str  # how the attempt(s) before it ended: the supervisor's classes ("crash", "host_oom", ...), joined
    lost_from: int
    lost_to: int

    @property
    def lost(self) -> int:
        return max(0, self.lost_to - self.lost_from + 1)


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class RunSeries:
    """What a picture of one run is drawn from."""

    checkpoint_dir: Path
    phase: str | None  # "base", "mid", "sft", "rl": from the checkpoint dir's folder (None: a folder of its own)
    title: str  # the phase and the run, e.g. "base training: base_checkpoints/d20"
    label: str  # short, for a legend that compares runs: the checkpoint dir's name
    loss: Curve  # the smoothed training loss, one point per step
    eval_name: str | None  # the evaluation's metric ("val_bpb", "val_pass@k"), None if none was logged
    evals: Curve
    tok_per_s: Curve
    restarts: list[Restart]
    goodput: Ledger | None = None  # where the supervised time went (supervisor/goodput.py); None: unsupervised
    rollbacks: list[Restart] = field(default_factory=list)  # bad numbers rolled back in-process (cause: nan, spike)
    anomalies: list[tuple[int, str]] = field(default_factory=list)  # bad numbers warned of: (step, "spike, applied")

    @property
    def steps_lost(self) -> int:
        return sum(r.lost for r in self.restarts)


def series(checkpoint_dir: Path, run_dir: Path | None = None) -> RunSeries:
    """A run's data series from `<checkpoint_dir>/metrics.jsonl`; restarts take their cause from the run dir's
    event log (`attempt_end` classes), when there is one."""
    if not checkpoint_dir.is_dir():
        raise PlotError(f"no checkpoint dir at {checkpoint_dir}")
    records = metrics.read(checkpoint_dir)
    if not records:
        raise PlotError(
            f"no {checkpoint_dir / metrics.FILE}: the trainer writes it as it trains (is this a run's dir?)"
        )
    loss, tok, evals, metric = {}, {}, {}, None
    for r in records:
        if r.get("kind") == "step":
            if _number(r.get("loss")):
                loss[r["step"]] = float(r["loss"])  # a step logged twice (not expected): the newest line wins
            if _number(r.get("tok_per_s")):
                tok[r["step"]] = float(r["tok_per_s"])
        elif r.get("kind") == "eval":
            found = [k for k, v in r.items() if k not in _NOT_METRICS and _number(v)]
            metric = metric or (found[0] if found else None)  # a phase has one evaluation metric
            if metric in found:
                evals[r["step"]] = float(r[metric])
    if not loss:
        raise PlotError(f"no training steps in {checkpoint_dir / metrics.FILE} yet")
    ended = _attempt_classes(run_dir)
    phase = by_folder(checkpoint_dir.parent.name)
    where = f"{checkpoint_dir.parent.name}/{checkpoint_dir.name}"
    return RunSeries(
        checkpoint_dir=checkpoint_dir,
        phase=phase.name if phase else None,
        title=f"{phase.label}: {where}" if phase else where,
        label=checkpoint_dir.name,
        loss=_curve(loss),
        eval_name=metric,
        evals=_curve(evals),
        tok_per_s=_curve(tok),
        restarts=restarts([r for r in records if r.get("kind") == "start"], ended),
        goodput=_ledger(checkpoint_dir, run_dir),
        rollbacks=[
            Restart(r["step"], r.get("reason", "?"), r["step"] + 1, r.get("at", r["step"]))
            for r in records
            if r.get("kind") == "rollback"
        ],
        anomalies=[(r["step"], f"{r.get('reason')}, {r.get('action')}") for r in records if r.get("kind") == "anomaly"],
    )


def _ledger(checkpoint_dir: Path, run_dir: Path | None) -> Ledger | None:
    """The goodput ledger of this checkpoint dir's supervised invocations, from the run dir's event log."""
    if run_dir is None or not run_dir.is_dir():
        return None
    from supervisor.report import invocations  # (report imports rich: only here, where a picture is drawn)

    runs = [r for r in invocations(read_events(RunDir(run_dir)), None)
            if r["checkpoint_dir"] in (None, str(checkpoint_dir))]  # fmt: skip
    led = ledger(runs)
    return led if led.wall > 0 else None


def restarts(starts: list[dict], ended: dict[int, str]) -> list[Restart]:
    """Every start line but a run's first from scratch is a restart (a run whose log begins with a resume was
    restarted too). Its cause is the class of every attempt since the previous start line: those that never logged
    a start failed before training and count as part of the same restart."""
    out = []
    for i, s in enumerate(starts):
        step, n, reached = s["step"], s.get("attempt"), s.get("reached")
        if i == 0 and step == 0:
            continue
        causes = []
        if isinstance(n, int):  # a supervised attempt: the ones before it ended in the event log
            previous = starts[i - 1].get("attempt") if i else None
            since = previous if isinstance(previous, int) and previous < n else n - 1
            causes = [ended[k] for k in range(since, n) if k in ended]
            causes = [c for j, c in enumerate(causes) if j == 0 or c != causes[j - 1]]  # crash, crash -> crash
        lost_to = reached if isinstance(reached, int) and reached > step else step
        out.append(Restart(step, ", ".join(causes) or UNSUPERVISED, step + 1, lost_to))
    return out


def _attempt_classes(run_dir: Path | None) -> dict[int, str]:
    """{attempt number: its class} from the supervisor's `attempt_end` events; {} for an unsupervised run."""
    if run_dir is None or not run_dir.is_dir():
        return {}
    return {
        e["attempt"]: str(e["class"])
        for e in read_events(RunDir(run_dir))
        if e.get("event") == "attempt_end" and isinstance(e.get("attempt"), int) and e.get("class")
    }


def _curve(points: dict[int, float]) -> Curve:
    steps = sorted(points)
    return Curve(steps, [points[s] for s in steps])


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # v == v: not NaN


def labels(runs: Sequence[RunSeries]) -> list[str]:
    """Legend names: the checkpoint dirs' names, with their parent folders where two would read the same."""
    names = [r.label for r in runs]
    return [f"{r.checkpoint_dir.parent.name}/{r.label}" if names.count(r.label) > 1 else r.label for r in runs]


def default_out(checkpoint_dir: Path, run_dir: Path | None) -> Path:
    """plot.png in the run dir of a supervised run, else beside the checkpoints; a run dir that several checkpoint
    dirs share (a speedrun's phases) gets one picture per checkpoint dir."""
    if run_dir is None or not run_dir.is_dir():
        return checkpoint_dir / "plot.png"
    if run_dir == checkpoint_dir.with_name(checkpoint_dir.name + ".run"):
        return run_dir / "plot.png"
    return run_dir / f"plot-{checkpoint_dir.parent.name}-{checkpoint_dir.name}.png"


def make(checkpoint_dir: Path, run_dir: Path | None, out: Path | None, compare: Sequence[Path] = ()) -> Path:
    """`nanochat-run plot`: draw a run (and the loss of the `compare` checkpoint dirs) into a PNG; its path."""
    run = series(checkpoint_dir, run_dir)
    others = [series(c, c.with_name(c.name + ".run")) for c in compare]
    return draw(run, out or default_out(checkpoint_dir, run_dir), others)


def terminal(checkpoint_dir: Path, run_dir: Path | None) -> str:
    """`nanochat-run status --plot`: the loss curve as text sized to the terminal, or one line saying why not."""
    try:
        run = series(checkpoint_dir, run_dir)
    except PlotError as e:
        return f"no loss curve: {e}"
    text = text_curve(run, min(shutil.get_terminal_size((100, 24)).columns, 120))
    return text if text is not None else "no loss curve here: the terminal plot needs plotext (pip install plotext)"


# ---------------------------------------------------------------------------------------------------------------
# drawing


def draw(run: RunSeries, out: Path, compare: Sequence[RunSeries] = ()) -> Path:
    """The PNG: loss (and the evaluation, on its own axis) above, tokens per second below, both by step; every
    restart a dashed line named by its cause, the steps it lost shaded. `compare`: other runs' loss curves."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state, works headless
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise PlotError("drawing needs matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(3 if run.goodput else 2, 1, height_ratios=[3, 1.4, 0.5][: 3 if run.goodput else 2])
    top = fig.add_subplot(grid[0])
    bottom = fig.add_subplot(grid[1], sharex=top)
    top.tick_params(labelbottom=False)
    if run.goodput:  # below, on its own axis (seconds, not steps)
        _time_bar(fig.add_subplot(grid[2]), run.goodput)
    names = labels([run, *compare])
    own = f"{names[0]}: training loss (smoothed)" if compare else "training loss (smoothed)"
    lines = top.plot(run.loss.steps, run.loss.values, color="tab:blue", lw=1.8, label=own)
    palette = itertools.cycle(("tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "gray"))
    for other, name, color in zip(compare, names[1:], palette):
        lines += top.plot(other.loss.steps, other.loss.values, color=color, lw=1.4, ls="-.",
                          label=f"{name}: training loss")  # fmt: skip
    # RL's loss is a policy-gradient surrogate (it goes up and down with the rewards); the others' is cross-entropy
    top.set_ylabel("policy-gradient loss" if run.phase == "rl" else "training loss (nats per token)")
    top.grid(alpha=0.3)
    front = top  # what is drawn last: the restart labels go there, so that no curve covers them
    if run.evals.steps:
        front = top.twinx()
        metric = METRIC_NAMES.get(run.eval_name or "", run.eval_name)
        lines += front.plot(run.evals.steps, run.evals.values, "o-", color="tab:red", lw=1.4, ms=6,
                            label=f"{metric} ({run.eval_name}, right axis)")  # fmt: skip
        front.set_ylabel(metric, color="tab:red")
        front.tick_params(axis="y", colors="tab:red")

    bottom.plot(run.tok_per_s.steps, run.tok_per_s.values, color="tab:green", lw=1.2)
    bottom.set_ylabel("tokens per second")
    bottom.yaxis.set_major_formatter(EngFormatter(sep=""))
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)

    for r in run.restarts:
        for ax in (top, bottom):
            ax.axvline(r.step, color="black", ls="--", lw=1.2, alpha=0.8)
            if r.lost:
                ax.axvspan(r.step, r.lost_to, color="tab:red", alpha=0.12, lw=0)
        lost = f", {r.lost} steps lost" if r.lost else ""
        front.annotate(f"{r.cause} (resumed at {r.step}{lost})", xy=(r.step, 1), xycoords=("data", "axes fraction"),
                     xytext=(-4, -6), textcoords="offset points", rotation=90, ha="right", va="top", fontsize=10,
                     bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.6})  # fmt: skip
    for r in run.rollbacks:  # went back to r.step from r.lost_to: the steps between were trained again
        for ax in (top, bottom):
            ax.axvline(r.step, color="tab:purple", ls=":", lw=1.4)
            ax.axvspan(r.step, r.lost_to, color="tab:purple", alpha=0.10, lw=0)
        front.annotate(f"{r.cause} at {r.lost_to}: rolled back to {r.step}", xy=(r.step, 0), rotation=90,
                       xycoords=("data", "axes fraction"), xytext=(-4, 6), textcoords="offset points", ha="right",
                       va="bottom", fontsize=9, color="tab:purple")  # fmt: skip
    for step, what in run.anomalies:  # warned of (--on_nan/--on_spike=warn): the run went on
        for ax in (top, bottom):
            ax.axvline(step, color="tab:orange", ls="-.", lw=1.2)
        front.annotate(what, xy=(step, 0), xycoords=("data", "axes fraction"), xytext=(-4, 6), rotation=90,
                       textcoords="offset points", ha="right", va="bottom", fontsize=9, color="tab:orange")  # fmt: skip
    handles = list(lines)
    if run.restarts:
        handles.append(Line2D([], [], color="black", ls="--", label="restart (labelled: why the attempt before ended)"))
    if run.anomalies:
        handles.append(Line2D([], [], color="tab:orange", ls="-.", label="bad numbers warned of (the run went on)"))
    if run.rollbacks:
        handles.append(Line2D([], [], color="tab:purple", ls=":", label="rollback of bad numbers (data skipped)"))
    if any(r.lost for r in run.restarts):
        handles.append(Patch(color="tab:red", alpha=0.25, label="steps lost and trained again"))
    # below the panels, not on them: a legend inside would cover a curve or a restart's label on some run
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=10, frameon=False)
    top.set_title(f"training loss{' and validation' * bool(run.evals.steps)} by step{_summary(run)}", fontsize=12)
    bottom.set_title("throughput (each attempt's first steps include warm-up)", fontsize=11)
    fig.suptitle(run.title, fontsize=15, fontweight="bold")

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the format follows the suffix: .png, or .svg / .pdf for print; never through a link planted at the name
        safefile.write_atomic(out, lambda f: fig.savefig(f, format=out.suffix[1:] or None), durable=False)
    except ValueError as e:  # an unknown suffix
        raise PlotError(f"cannot write {out}: {e}") from None
    return out


def _summary(run: RunSeries) -> str:
    n = len(run.restarts)
    good = f", goodput {100 * (run.goodput.ratio or 0):.1f}%" if run.goodput else ""
    if not n:
        return f": {run.loss.steps[-1]} steps, no restarts{good}"
    return f": {run.loss.steps[-1]} steps, {n} restart{'s' * (n > 1)}, {run.steps_lost} steps lost{good}"


def _time_bar(ax, led: Ledger) -> None:
    """One horizontal bar: the supervised time split into the ledger's parts, kept training first."""
    left = 0.0
    for part in sorted(PARTS, key=lambda p: p != "kept steps"):
        seconds = led.parts[part]
        if seconds <= 0:
            continue
        ax.barh(0, seconds, left=left, color=BAR_COLORS[part],
                label=f"{part} {seconds:.0f}s ({100 * seconds / led.wall:.0f}%)")  # fmt: skip
        left += seconds
    ax.set_yticks([])
    ax.set_xlim(0, max(left, led.wall))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=5, fontsize=8, frameon=False)
    ax.set_title(f"where the supervised time went (seconds): goodput {100 * (led.ratio or 0):.1f}% is kept training",
                 fontsize=11)  # fmt: skip


def text_curve(run: RunSeries, width: int, height: int = 16) -> str | None:
    """The loss curve as text for a terminal (restarts as vertical lines), or None when plotext is not installed."""
    try:
        import plotext as plt
    except ImportError:
        return None
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")  # plain characters: the curve survives logs, pipes and any terminal's colours
    plt.plot(run.loss.steps, run.loss.values, marker="braille", label="training loss (smoothed)")
    first, last = run.loss.steps[0], run.loss.steps[-1]
    plt.xticks(sorted({round(first + i * (last - first) / 4) for i in range(5)}))  # whole steps, not 40.8
    for r in run.restarts:
        plt.vline(r.step)
    plt.title(f"{run.title}{_summary(run)}")
    plt.xlabel("step" + (f"; restarts (|): {_restart_list(run)}" if run.restarts else ""))
    return re.sub(r"\x1b\[[0-9;]*m", "", plt.build())


def _restart_list(run: RunSeries) -> str:
    return ", ".join(f"{r.cause} at {r.step}" for r in run.restarts)
