"""What the user sees while `nanochat-run train` runs: a live rich panel on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


@dataclass
class View:
    """The numbers on screen; the agent fills it in, the display only reads it."""

    max_attempts: int  # attempts this invocation may make
    attempt: int = 0  # the attempt's number in the run dir (it counts on across invocations)
    tries: int = 0  # attempts made by this invocation so far
    state: str = "starting"
    phase: str | None = None  # the trainer's: starting, training, saving, evaluating, done
    step: int | None = None
    num_iterations: int | None = None
    loss: float | None = None
    tok_per_s: float | None = None  # smoothed by the trainer
    last_checkpoint: int | None = None  # the newest durable checkpoint
    eval_batch: int | None = None  # evaluation progress, while evaluating
    eval_batches: int | None = None
    mfu: float | None = None  # percent, on GPUs the trainer knows the peak of
    gpu_mem: int | None = None  # peak bytes allocated on the GPU
    rss: int = 0
    cpu: float = 0.0
    restarts: list[str] = field(default_factory=list)  # the class of each finished attempt
    remote_step: int | None = None  # with --remote_dir: the newest checkpoint copied there
    remote_error: str | None = None  # the uploader's last error, while it lasts
    uploading: int | None = None  # the step of the final upload the trainer waits for, and its progress in bytes
    upload_sent: int | None = None
    upload_bytes: int | None = None
    hang_after: float | None = None  # the hang deadline of the live phase (seconds without progress; 0: none)
    hang_why: str = ""  # how it was set
    quiet: float = 0.0  # seconds since the heartbeat last moved

    def new_attempt(self, n: int, tries: int, start_step: int | None) -> None:
        """A new attempt: nothing of the previous one's is shown; the step is where it resumes from."""
        self.attempt, self.tries, self.phase = n, tries, "starting"
        self.step = self.last_checkpoint = start_step
        self.loss = self.tok_per_s = self.eval_batch = self.eval_batches = self.mfu = self.gpu_mem = None
        self.uploading = self.hang_after = None

    def beat(self, hb: dict) -> None:
        """Take what the trainer's heartbeat says; fields it leaves out keep their value (the loss while saving)."""
        self.phase = hb.get("phase", self.phase)
        for key in ("step", "num_iterations", "loss", "tok_per_s", "mfu", "gpu_mem"):
            if hb.get(key) is not None:
                setattr(self, key, hb[key])
        if hb.get("checkpoint") is not None:
            self.last_checkpoint = hb["checkpoint"]
        if "remote_step" in hb:
            self.remote_step, self.remote_error = hb["remote_step"], hb.get("remote_error")
        self.eval_batch, self.eval_batches = hb.get("eval_batch"), hb.get("eval_batches")
        self.uploading = hb.get("uploading")  # while the trainer waits for its final upload
        self.upload_sent, self.upload_bytes = hb.get("upload_sent"), hb.get("upload_bytes")

    @property
    def doing(self) -> str:
        """The trainer's phase in words, e.g. "evaluating 12/40 batches"."""
        if self.phase == "evaluating" and self.eval_batches:
            return f"evaluating {self.eval_batch or 0}/{self.eval_batches} batches"
        if self.uploading is not None and self.upload_bytes:
            sent = (self.upload_sent or 0) / 1e6
            return f"uploading step {self.uploading} ({sent:.1f}/{self.upload_bytes / 1e6:.1f} MB)"
        return self.phase or ""

    @property
    def hang(self) -> str:
        """The live hang deadline in words, e.g. "after 20s without progress (quiet 3s; 10x the median step ...)"."""
        if self.hang_after is None:
            return ""
        if self.hang_after <= 0:
            return f"never (off: {self.hang_why})"
        return f"after {self.hang_after:g}s without progress (quiet {self.quiet:.0f}s; {self.hang_why})"


class Display:
    """Plain output: one timestamped line per event and a progress line every `every` seconds."""

    def __init__(self, every: float = 30.0):
        self.every, self._next, self.broken = every, 0.0, False

    def event(self, msg: str) -> None:
        self._best_effort(print, f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _best_effort(self, write, *args, **kwargs) -> None:
        """Our output may be a file on the very disk that filled up: losing a line must never stop the supervisor
        (it would take the run down with it). The first failure is said once on stderr, if that still works."""
        try:
            write(*args, **kwargs)
        except OSError as e:
            if not self.broken:
                self.broken = True
                with contextlib.suppress(OSError):
                    print(f"nanochat-run: cannot write to the output ({e.strerror or e}); going on without it",
                          file=sys.stderr, flush=True)  # fmt: skip

    def update(self, view: View) -> None:
        if view.step is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        loss = f" loss {view.loss:.4f}" if view.loss is not None else ""
        tps = f", {view.tok_per_s:,.0f} tok/s" if view.tok_per_s else ""
        total = f"/{view.num_iterations}" if view.num_iterations else ""
        hang = f", hang after {view.hang_after:g}s" if view.hang_after else ""
        self.event(f"attempt {view.attempt}: step {view.step}{total}{loss}{tps}, {view.doing or view.state}{hang}")

    def close(self) -> None:
        pass


class LiveDisplay(Display):
    """A rich Live panel: attempt n of max, step progress with ETA, loss, tokens/s, checkpoint, restarts."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]steps"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )  # fmt: skip
        self.task = self.progress.add_task("steps", total=None)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def event(self, msg: str) -> None:
        self._best_effort(self.live.console.print, f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")

    def update(self, view: View) -> None:
        if view.step is not None:
            self.progress.update(self.task, completed=view.step, total=view.num_iterations)
        table = Table.grid(padding=(0, 2))
        state = f"{view.state}, {view.doing}" if view.doing and view.doing != view.state else view.state
        table.add_row("attempt", f"{view.attempt} ({view.tries} of {view.max_attempts} here)", "state", state)
        loss = f"{view.loss:.4f}" if view.loss is not None else "-"
        tps = f"{view.tok_per_s:,.0f}" if view.tok_per_s else "-"
        table.add_row("loss", loss, "tokens/s", tps)
        ckpt = f"step {view.last_checkpoint}" if view.last_checkpoint is not None else "none yet"
        table.add_row("checkpoint", ckpt, "memory", f"{view.rss / 2**30:.2f} GiB")
        if view.mfu is not None or view.gpu_mem is not None:
            mfu = f"{view.mfu:.1f}%" if view.mfu is not None else "-"
            gpu = f"{view.gpu_mem / 2**30:.1f} GiB" if view.gpu_mem is not None else "-"
            table.add_row("mfu", mfu, "gpu memory", gpu)
        table.add_row("restarts", ", ".join(view.restarts) or "none", "cpu", f"{view.cpu:.0f}%")
        if view.hang:
            table.add_row("hang", view.hang)
        self._best_effort(self.live.update, Group(self.progress, table))

    def close(self) -> None:
        self.live.stop()


def make_display(progress_every: float = 30.0) -> Display:
    return LiveDisplay() if sys.stdout.isatty() else Display(progress_every)
