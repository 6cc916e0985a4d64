"""Loss spikes and non-finite values: what the loop does when a step's numbers go wrong.

Every step, before the optimizer applies it, the ranks agree in one small all_reduce on two things: whether any
rank's loss or gradient norm is non-finite, and the mean loss. Then:

    non-finite  -> rerun the step once from the same state (the same batches, the RNG as the step began; the
                   weights and optimizer are untouched, nothing was applied yet)
                   same again   -> the data or the optimization: with --on_nan=rollback, roll back to the newest
                                   snapshot or checkpoint, skip the data of the steps after it up to this one (the
                                   loader reads past them), and go on; --on_nan=warn skips this step's update
                   finite now   -> not reproducible: the hardware is suspect (silent data corruption). The step
                                   is abandoned with an error naming the rank(s), host and step; the supervisor
                                   restarts from the newest checkpoint
    spike       -> the mean loss is more than --spike_z standard deviations above the mean of the last
                   --spike_window steps (the rule waits until the window is full: never in a run's first steps;
                   the window is saved with every checkpoint, so a resumed run decides as an uninterrupted one):
                   --on_spike=warn logs it and applies the step, rollback does as above
    ok          -> the optimizer applies the step

A run that rolls back more than --max_rollbacks times stops as diverged (exit common.EXIT_DIVERGED, 65: the
supervisor does not restart it). Every rollback, and every warning under "warn", is recorded in the checkpoint's
meta ("rollbacks") and in metrics.jsonl; a run given the same skips up front (--skip_data=FROM:TO,...) trains on
exactly the same data and ends bit-identical.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import DistInfo


class Diverged(RuntimeError):
    """More rollbacks than --max_rollbacks allows."""


class SilentDataCorruption(RuntimeError):
    """A non-finite value that a rerun from the same state did not reproduce."""


@dataclass(frozen=True)
class Verdict:
    """The ranks' agreed view of one step: `kind` is "ok", "nan" or "spike"."""

    kind: str
    loss: float  # the mean of the ranks' losses (nan when any is non-finite)
    z: float | None = None  # how far above the window a spike was, in standard deviations
    ranks: tuple[int, ...] = ()  # the ranks whose loss or gradient norm was non-finite


def is_spike(loss: float, window: list[float], z_max: float) -> float | None:
    """The z-score of `loss` above the window when it is a spike (more than `z_max` standard deviations above
    the window's mean), else None. A window of equal values has no spread: then nothing counts as a spike."""
    if len(window) < 2:
        return None
    mean, sd = statistics.fmean(window), statistics.pstdev(window)
    if sd <= 0 or not math.isfinite(loss):
        return None
    z = (loss - mean) / sd
    return z if z > z_max else None


class Guard:
    """One process's side of the rule (module doc): `check` after the backward, before the optimizer step."""

    def __init__(self, dist_info: DistInfo, spike_window: int, spike_z: float) -> None:
        self.dist, self.spike_window, self.spike_z = dist_info, spike_window, spike_z

    def check(self, loss: torch.Tensor, params: list[torch.nn.Parameter], window: list[float]) -> Verdict:
        """Agree on this step (one all_reduce of world_size + 1 numbers): every rank gets the same verdict. `window`:
        the recent mean losses (Counters.loss_window, saved with every checkpoint: a resume decides as before);
        a sound step's loss joins it."""
        grads = [p.grad for p in params if p.grad is not None]
        norms = [n.float() for n in torch._foreach_norm(grads)]  # (any mix of dtypes)
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        world = self.dist.world_size
        values = torch.zeros(world + 1, dtype=torch.float64, device=self.dist.device)  # on the device: no sync
        values[self.dist.rank] = bad.double()
        values[world] = torch.where(bad, 0.0, loss.detach().double())
        if self.dist.is_distributed:
            dist.all_reduce(values)
        got = values.tolist()  # the step's one wait for the device
        ranks = tuple(r for r in range(world) if got[r] > 0)
        if ranks:
            return Verdict("nan", float("nan"), ranks=ranks)
        mean = got[world] / world
        recent = window[-self.spike_window :]
        z = is_spike(mean, recent, self.spike_z) if len(recent) == self.spike_window else None
        if z is not None:
            return Verdict("spike", mean, z)
        window[:] = [*window, mean][-self.spike_window :]
        return Verdict("ok", mean)

    def suspect(self, step: int, ranks: tuple[int, ...]) -> SilentDataCorruption:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))  # torchrun's ranks per node
        where = ", ".join(f"rank {r} (node {r // per_node})" for r in ranks)
        return SilentDataCorruption(
            f"step {step}: a non-finite loss or gradient on {where} did not come back on a rerun from the same"
            f" state: suspect the hardware (silent data corruption; this is rank {self.dist.rank} on"
            f" {socket.gethostname()}); the run restarts from its newest checkpoint"
        )
