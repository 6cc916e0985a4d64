"""The run's counters, which a checkpoint carries from one attempt to the next, and the meta record a save writes
from them (`meta_record`: the one place that builds it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from nanochat.checkpoint.meta import Meta, Metric

if TYPE_CHECKING:  # resume.py builds Counters
    from nanochat.resume import Extension


@dataclass
class Counters:
    """Where the run is: completed optimizer steps, the smoothed loss, the training time (first step of each
    process left out), the last evaluation, and what the resumes recorded."""

    step: int = 0
    smooth_loss: float = 0.0  # an EMA (0.9) of each step's last micro-batch loss, biased toward 0 early (`loss`)
    train_time: float = 0.0  # seconds
    val: float | None = None  # the last evaluation's metric
    val_step: int | None = None  # the step it was taken at
    tokens_offset: int = 0  # tokens seen before the current batch size took over (a resume with another one)
    history: list[dict] = field(default_factory=list)  # the settings each resume changed (`changed_on_resume`)
    extended: Extension | None = None  # a finished run given a larger budget (resume.Extension)
    rollbacks: list[dict] = field(default_factory=list)  # each rollback or skip of data (nanochat/guard.py)
    loss_window: list[float] = field(default_factory=list)  # the recent losses the spike rule measures against

    def add_loss(self, loss: float) -> None:
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss

    def loss(self) -> float | None:
        """The smoothed loss, debiased (None before the first step)."""
        return self.smooth_loss / (1 - 0.9**self.step) if self.step else None

    def tokens_seen(self, tokens_per_step: int) -> int:
        return self.tokens_offset + self.step * tokens_per_step

    def lrm(self, scheduled: float) -> float:
        """The LR multiplier for the next optimizer step: the schedule's, or the extension's ramp toward it."""
        return self.extended.lrm(self.step, scheduled) if self.extended else scheduled


def meta_record(
    c: Counters,
    *,
    extras: dict,
    run_id: str,
    phase: str,
    num_iterations: int,
    tokens_per_step: int,
    reason: str,
    model_config: dict,
    train_config: dict,
    world_size: int,
    metric: str,
    started_at: float,
) -> Meta:
    """The meta of the checkpoint of step `c.step`, saved for `reason` ("completed", "periodic", "signal:SIG..."):
    the phase's `extras` (its source, tasks, tokenizer), then the run's identity, settings and counters. The Saver
    adds the files, their checksums and every rank's loader position and RNG."""
    return Meta(
        **extras,
        run_id=run_id,
        phase=phase,
        num_iterations=num_iterations,
        final=c.step == num_iterations,
        stop_reason=reason,
        model_config=model_config,
        train_config=train_config,
        world_size=world_size,
        total_batch_size=tokens_per_step,
        tokens_seen=c.tokens_seen(tokens_per_step),
        changed_on_resume=c.history,
        schedule_extended=asdict(c.extended) if c.extended else None,
        rollbacks=c.rollbacks,
        loss_window=c.loss_window,
        metrics={metric: Metric(c.val, c.val_step)},
        train_loss=c.loss(),
        smooth_loss=c.smooth_loss,
        train_time=c.train_time,
        started_at=started_at,
        torch_version=torch.__version__,
        step=c.step,
        files={},  # the commit adds them (checkpoint.write)
    )
