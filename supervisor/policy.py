"""The restart policy: the one function that decides what happens after an attempt ends."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.states import Action, AttemptClass, Decision, Outcome


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 5  # restarts after the first attempt
    max_no_progress: int = 3  # consecutive attempts without a new checkpoint before we call it a crash loop
    backoff: float = 5.0  # seconds before the first restart; doubles with each attempt that never got to training
    backoff_cap: float = 300.0
    oom_shrink: bool = True  # on an OOM of the device's memory, shrink the device batch (accumulation keeps the total)
    pass_mtbf: bool = False  # the trainer sets its save interval from --mtbf (--save_every=auto): tell it what we see


@dataclass(frozen=True)
class AttemptSummary:
    """What the policy needs to know about each attempt so far."""

    kind: AttemptClass
    progressed: bool  # a newer usable checkpoint exists than when the attempt started
    healthy: bool = False  # the attempt reached training (a heartbeat with phase training or saving)
    device_batch_size: int | None = None  # what the attempt ran with, from its heartbeat
    seconds: float = 0.0  # how long it ran


@dataclass(frozen=True)
class Batch:
    """The batch geometry of the last attempt, from the trainer's heartbeat; None where unknown."""

    device_batch_size: int | None = None
    total_batch_size: int | None = None  # tokens per optimizer step
    max_seq_len: int | None = None
    world_size: int | None = None
    device: str | None = None  # "cuda" or "cpu": on the CPU, the host's memory is the device's


def decide(outcome: Outcome, history: list[AttemptSummary], policy: Policy, batch: Batch = Batch()) -> Decision:
    """Map the attempt that just ended (the last entry of `history`) to: finish, stop, restart (how), or give up."""
    if outcome.kind is AttemptClass.COMPLETED:
        return Decision(Action.FINISH, "the step budget is reached")
    if outcome.kind is AttemptClass.STOPPED:
        return Decision(Action.STOP, "stopped on request")
    if outcome.kind is AttemptClass.REFUSED:
        return Decision(Action.GIVE_UP, f"the trainer refused to run, and a restart cannot fix that: {outcome.message}")
    if outcome.kind is AttemptClass.DIVERGED:  # the rollbacks were spent on bad numbers: a restart repeats them
        return Decision(Action.GIVE_UP, f"the run diverged: {outcome.message}")
    if outcome.kind is AttemptClass.UNHEALTHY:  # the machine, not the run: every restart here would fail the same
        return Decision(Action.GIVE_UP, f"unhealthy node, where every restart would fail the same: {outcome.message}")
    # A CUDA OOM, or a host OOM of a trainer on the CPU (where activations live in host memory): the same cure
    cpu_oom = outcome.kind is AttemptClass.HOST_OOM and batch.device == "cpu"
    device_oom = (outcome.kind is AttemptClass.CUDA_OOM or cpu_oom) and policy.oom_shrink
    restarts = len(history) - 1
    if restarts >= policy.max_restarts:
        advice = "; the model may not fit: use a smaller --depth or --max_seq_len" if device_oom else ""
        return Decision(
            Action.GIVE_UP, f"--max-restarts={policy.max_restarts} used up; last: {outcome.message}{advice}"
        )
    overrides: dict[str, str] = {}
    if device_oom:  # each attempt runs a smaller batch than the last: not a loop, and bounded by the batch
        if cpu_oom and batch.device_batch_size == 1:
            # host memory is shared with everything else on the machine: one more try at batch 1, then advice
            at_one = sum(a.kind is AttemptClass.HOST_OOM and a.device_batch_size == 1 for a in history)
            if at_one >= 2:
                return Decision(Action.GIVE_UP, f"out of host memory {at_one} times at device_batch_size=1 on the"
                                " CPU: the model does not fit; use a smaller --depth or --max_seq_len")  # fmt: skip
        else:
            smaller, why_not = smaller_batch(batch)
            if smaller is None:
                return Decision(Action.GIVE_UP, why_not)
            overrides["device_batch_size"] = str(smaller)
            if batch.total_batch_size:  # pin the total so only the accumulation changes, never the training itself
                overrides["total_batch_size"] = str(batch.total_batch_size)
    elif (no_progress := _streak(history, lambda a: a.progressed)) >= policy.max_no_progress:
        return Decision(
            Action.GIVE_UP,
            f"crash loop: {no_progress} attempts in a row ended without a new checkpoint"
            f" (--max-no-progress={policy.max_no_progress}); last: {outcome.kind.value}: {outcome.message}",
        )
    # The backoff protects against fast failure loops (a broken node, a full disk): an attempt that got as far as
    # training resets it even if it saved nothing, while the crash-loop guard above still counts it.
    failing = _streak(history, lambda a: a.progressed or a.healthy)
    delay = min(policy.backoff_cap, policy.backoff * 2 ** max(failing - 1, 0))
    if policy.pass_mtbf and (mtbf := observed_mtbf(history)):
        overrides["mtbf"] = f"{mtbf:.0f}"
    return Decision(Action.RESTART, f"{outcome.kind.value}: restarting with resume", delay, overrides)


NOT_FAILURES = (AttemptClass.COMPLETED, AttemptClass.STOPPED, AttemptClass.REFUSED, AttemptClass.DIVERGED,
                AttemptClass.CUDA_OOM, AttemptClass.HOST_OOM)  # fmt: skip


def observed_mtbf(history: list[AttemptSummary]) -> float | None:
    """The run's mean time between failures so far, in seconds (at least 1): its attempts' time over the failures
    among them; None before any. An out-of-memory restart is not a failure of the machine: it is a batch too big,
    which the next attempt's smaller batch fixes."""
    failures = sum(a.kind not in NOT_FAILURES for a in history)
    return max(1.0, sum(a.seconds for a in history) / failures) if failures else None


def _streak(history: list[AttemptSummary], resets) -> int:
    """How many attempts at the end of `history` in a row did not satisfy `resets`."""
    n = 0
    for attempt in reversed(history):
        if resets(attempt):
            break
        n += 1
    return n


def smaller_batch(batch: Batch) -> tuple[int | None, str]:
    """(the device batch for the next attempt, or None and why not) after a CUDA OOM (or a host OOM on the CPU).

    The largest size <= half the current one that divides the rows each rank contributes per optimizer step
    (total_batch_size / (max_seq_len * world_size)): the trainer refuses any other, since gradient accumulation
    must come out whole. With rows=5 and a batch of 5, half is 2, which does not divide 5: the answer is 1.
    """
    size = batch.device_batch_size
    oom = "out of host memory on the CPU" if batch.device == "cpu" else "CUDA out of memory"
    if size is None:
        return None, f"{oom}, and the device batch size is unknown (no heartbeat from the trainer)"
    if size // 2 < 1:
        return None, f"{oom} at device_batch_size={size}: use a smaller --depth or --max_seq_len"
    if not (batch.total_batch_size and batch.max_seq_len and batch.world_size):
        return size // 2, ""  # geometry unknown (an older trainer): halve, the trainer checks the rest
    rows, rest = divmod(batch.total_batch_size, batch.max_seq_len * batch.world_size)
    if rest or rows < 1:
        return None, (
            f"{oom}, and total_batch_size={batch.total_batch_size} is not a multiple of max_seq_len x"
            f" world_size = {batch.max_seq_len * batch.world_size}: set --device_batch_size yourself"
        )
    return next(d for d in range(size // 2, 0, -1) if rows % d == 0), ""
