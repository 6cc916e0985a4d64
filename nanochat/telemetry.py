"""What a training run tells while it trains, in one place: the step lines (rank 0's stdout), the heartbeat the
supervisor watches (train_loop.Heartbeat), metrics.jsonl beside the checkpoints and wandb (nanochat/metrics.py),
and where a (re)start spent its time (`Startup`). The loop says what happened; this module says it everywhere."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanochat import metrics
from nanochat.common import DistInfo, print0, warn0
from nanochat.counters import Counters
from nanochat.train_loop import Due, Heartbeat, peak_flops

if TYPE_CHECKING:  # phase.py builds the Telemetry
    from nanochat.phase import Plan
    from nanochat.remote import Uploader
    from nanochat.saver import Saver
    from nanochat.settings import LoopConfig


@dataclass
class Startup:
    """When each part of a (re)start ended (time.perf_counter()), filled in as the start goes on; the line after the
    first step says where the time went (scripts/bench_recovery.py reads it)."""

    t0: float  # the phase began
    imported: float  # seconds before t0: the interpreter's start-up and our imports
    process_group: float = 0.0
    found: float = 0.0  # the checkpoint to resume from
    model: float = 0.0
    optim: float = 0.0  # the optimizers and the data (the phase's recipe), when the loop begins
    loaded: float = 0.0  # the checkpoint's state

    def line(self, now: float) -> str:
        return (
            f"startup: {self.imported:.2f}s interpreter + imports, {self.process_group - self.t0:.2f}s process group,"
            f" {self.found - self.process_group:.2f}s finding the checkpoint, {self.model - self.found:.2f}s"
            f" building the model, {self.optim - self.model:.2f}s optimizers and data, {self.loaded - self.optim:.2f}s"
            f" loading the state, {now - self.loaded:.2f}s first step; {self.imported + now - self.t0:.2f}s in all"
        )


@dataclass
class Spent:
    """Where this process's seconds went after its first step (the start-up, which the supervisor times from the
    launch to `began`), for the supervisor's goodput ledger (supervisor/goodput.py). Every second from `began` on
    is charged to one part: `charge(part)` books the time since the last charge, so nothing between two charges
    (logging, the heartbeat, the stop vote) goes missing. Parts: "train" (the steps), "save" (a periodic save,
    the time it blocked), "eval" (evaluations and samples), "final" (the final or signal save, the wait for the
    background writer, the upload flush). `kept_at[step]`: "train" when the save of `step` was made, so the
    supervisor can tell the steps a checkpoint kept from those a failure lost."""

    began: float = 0.0  # wall time the first step ended; 0: not yet
    mark: float = 0.0  # perf_counter() of the last charge
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("train", "save", "eval", "final"), 0.0))
    kept_at: dict[int, float] = field(default_factory=dict)

    KEPT_AT = 16  # saves remembered: a resume point is one of the newest few

    def start(self) -> None:
        self.began, self.mark = time.time(), time.perf_counter()

    def charge(self, part: str) -> None:
        if self.began:
            now = time.perf_counter()
            self.seconds[part] += now - self.mark
            self.mark = now

    def rolled_back(self, step: int) -> None:
        """The run went back to `step` in this process: the steps trained since are lost (none kept if `step`
        is from before this process's saves: the checkpoint it resumed from)."""
        kept = self.kept_at.get(step, 0.0)
        self.seconds["lost"] = self.seconds.get("lost", 0.0) + self.seconds["train"] - kept
        self.seconds["train"] = kept
        self.kept_at = {s: t for s, t in self.kept_at.items() if s <= step}

    def saved(self, step: int) -> None:
        self.kept_at[step] = self.seconds["train"]
        while len(self.kept_at) > self.KEPT_AT:
            del self.kept_at[min(self.kept_at)]

    def beat(self) -> dict:
        """The heartbeat's "spent" field (seconds rounded to the millisecond; JSON keys are strings)."""
        if not self.began:
            return {}
        return {"began": self.began, **{k: round(v, 3) for k, v in self.seconds.items()},
                "kept_at": {str(k): round(v, 3) for k, v in self.kept_at.items()}}  # fmt: skip


class Telemetry:
    """One attempt's telemetry. Made once the state is loaded: it opens wandb (--run) and metrics.jsonl (dropping
    the lines past `start_step`) and beats "starting". Every rank calls every method; each channel decides who
    writes (rank 0 prints and logs, each node's local rank 0 beats)."""

    def __init__(self, cfg: LoopConfig, dist_info: DistInfo, plan: Plan, metric: str, saver: Saver, ckpt_dir: Path,
                 start_step: int, resumed: bool, flops_per_token: float,
                 uploader: Uploader | None = None) -> None:  # fmt: skip
        self.plan, self.metric, self.uploader, self.world = plan, metric, uploader, dist_info.world_size
        self.label = metric.removeprefix("val_").replace("_", " ")  # "val_pass@8" -> "pass@8"
        self.log_every, self.ckpt_dir, self.device = cfg.log_every, ckpt_dir, dist_info.device
        self.flops_per_token, self.peak = flops_per_token, peak_flops(dist_info.device)
        self.wandb = metrics.setup_wandb(cfg.run, asdict(cfg), dist_info.master, warn0)
        self.log = metrics.MetricsLog(ckpt_dir, saver.writer, start_step, saver.warn)  # a dir per node: its own
        self.started_at = time.time()
        # every node's supervisor watches its own node: each node's local rank 0 beats (the fixed fields, the model's
        # flops_per_token included, are the configuration the supervisor's measured pace belongs to: pace.config_of)
        self.heartbeat = Heartbeat(cfg.heartbeat_file, dist_info.local_rank == 0,
                                   num_iterations=plan.num_iterations, device_batch_size=cfg.device_batch_size,
                                   total_batch_size=plan.tokens_per_step, max_seq_len=plan.seq_len,
                                   world_size=self.world, device=self.device.type,
                                   dist_timeout=cfg.dist_timeout, flops_per_token=flops_per_token)  # fmt: skip
        self.heartbeat(step=start_step, phase="starting", checkpoint=start_step if resumed else None)
        self.first_step, self.smooth_tps, self.timed = start_step, 0.0, 0  # tokens/s, smoothed past the first step
        self.spent = Spent()

    def startup(self, times: Startup) -> None:
        """The first step is done: the start-up ends here (it includes compilation and warm-up)."""
        print0(times.line(time.perf_counter()))
        self.spent.start()

    @contextlib.contextmanager
    def spending(self, part: str) -> Iterator[None]:
        """Charge what came before to the steps, and the time inside to `part` ("save", "eval", "final")."""
        self.spent.charge("train")
        try:
            yield
        finally:
            self.spent.charge(part)

    def _beat(self, **fields) -> None:
        self.heartbeat(**fields, spent=self.spent.beat())

    def step(self, c: Counters, lrm: float, dt: float, stats: Callable[[], dict[str, float]], durable: int | None):
        """Step `c.step` is done (in `dt` seconds): beat, log it, and print it every --log_every steps and at the
        last one, with the phase's `stats()` (a collective: called by every rank at the same steps)."""
        step, n, debiased = c.step, self.plan.num_iterations, c.loss()
        tok_per_s = self.plan.tokens_per_step / dt
        if step > self.first_step + 1:  # the smoothed rate leaves out the first step (compilation, warm-up)
            self.timed += 1
            self.smooth_tps = 0.9 * self.smooth_tps + 0.1 * tok_per_s
        mfu = 100 * self.flops_per_token * tok_per_s / (self.peak * self.world) if self.peak else None
        remote = self.uploader.status() if self.uploader else {}
        gpu_mem = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self.spent.charge("train")
        self._beat(step=step, loss=debiased, tok_per_s=self.smooth_tps / (1 - 0.9**self.timed) if self.timed
                       else None, **remote, mfu=mfu, gpu_mem=gpu_mem, checkpoint=durable, phase="training")  # fmt: skip
        numbers = {}
        if step % self.log_every == 0 or step == n:
            numbers = stats()
            print0(
                f"step {step:05d}/{n:05d} ({100 * step / n:.1f}%) | loss {debiased:.4f}"
                + "".join(f" | {k.replace('_', ' ')} {v:.4f}" for k, v in numbers.items())
                + f" | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f}"
                + (f" | mfu {mfu:.1f}%" if self.peak else "")
                + f" | total time {c.train_time / 60:.2f}m"
            )
            if self.wandb:
                self.wandb.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/tok_per_sec": tok_per_s,
                                **{f"train/{k}": v for k, v in numbers.items()}})  # fmt: skip
        self.log.step(step, loss=debiased, lrm=lrm, tok_per_s=tok_per_s, mfu=mfu, dt=dt, **numbers)

    def saving(self, step: int, due: Due) -> None:
        # what it writes tells the supervisor's save deadline a snapshot from a disk save (supervisor/pace.py)
        self._beat(step=step, phase="saving", reason=due.reason, disk=due.disk)

    def saved(self, step: int, due: Due, dt: float, background: bool) -> None:
        """The save is done (`dt` seconds), or handed to the background writer (`background`: blocked `dt`)."""
        self.spent.saved(step)
        what = " and ".join(
            [f"checkpoint to {self.ckpt_dir} ({due.reason})"] * due.disk + ["snapshot in shared memory"] * due.memory
        )
        if background:
            print0(f"step {step:05d} | saving {what} in the background; blocked {dt:.3f}s")
        else:
            print0(f"step {step:05d} | saved {what} in {dt:.2f}s")

    def rolled_back(self, step: int, at: int, reason: str) -> None:
        """Bad numbers at step `at` took the run back to the checkpoint at `step` (nanochat/guard.py)."""
        self.spent.charge("train")
        self.spent.rolled_back(step)
        self.log.rollback(step, at=at, reason=reason, skipped=[step + 1, at])

    def closing(self, **fields) -> None:
        """The process is about to end (the upload flushed, or a stop saved): the last word on where time went."""
        self.spent.charge("final")
        self.heartbeat.amend(**fields, spent=self.spent.beat())

    def evaluating(self, step: int, done: int, durable: int | None) -> None:
        self._beat(step=step, phase="evaluating", eval_batch=done, eval_batches=self.plan.eval_steps,
                       checkpoint=durable)  # fmt: skip

    def evaluated(self, step: int, result: float | None) -> None:
        """The evaluation's metric, or None: a stop signal ended it."""
        if result is None:
            print0(f"step {step:05d} | validation stopped by a signal")
            return
        print0(f"step {step:05d} | validation {self.label} {result:.4f}")
        self.log.eval(step, **{self.metric: result})
        if self.wandb:
            self.wandb.log({"step": step, f"val/{self.label}": result})

    def done(self, c: Counters) -> None:
        """The run reached its budget (and was evaluated) in this attempt."""
        print0(f"done: {c.step} steps, validation {self.label} {c.val:.4f}, training time {c.train_time / 60:.2f}m")
        if self.wandb:
            self.wandb.finish()

    def finished(self, c: Counters) -> None:
        """The last beat: the run is complete (the supervisor stops restarting it)."""
        self.spent.charge("final")
        self._beat(step=c.step, phase="done", loss=c.loss(), checkpoint=c.step, **{self.metric: c.val})
