"""The restart policy: the one function that decides what happens after an attempt ends."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.states import Action, AttemptClass, Decision, Outcome

EXIT_USAGE = 2  # the trainer's exit status for bad settings, an incompatible checkpoint or a full disk


@dataclass(frozen=True)
class Policy:
    max_restarts: int = 5  # restarts after the first attempt
    max_no_progress: int = 3  # consecutive attempts without a new checkpoint before we call it a crash loop
    backoff: float = 5.0  # seconds before the first restart; doubles with each attempt that made no progress
    backoff_cap: float = 300.0
    oom_shrink: bool = True  # on cuda_oom, halve the device batch (gradient accumulation keeps the total)


@dataclass(frozen=True)
class AttemptSummary:
    """What the policy needs to know about each attempt so far."""

    kind: AttemptClass
    progressed: bool  # a newer valid checkpoint exists than when the attempt started


def decide(
    outcome: Outcome,
    history: list[AttemptSummary],
    policy: Policy,
    device_batch_size: int | None = None,
    total_batch_size: int | None = None,
) -> Decision:
    """Map the attempt that just ended (the last entry of `history`) to: finish, stop, restart (how), or give up."""
    if outcome.kind is AttemptClass.COMPLETED:
        return Decision(Action.FINISH, "the step budget is reached")
    if outcome.kind is AttemptClass.STOPPED:
        return Decision(Action.STOP, "stopped on request")
    if outcome.kind is AttemptClass.CRASH and outcome.worker_exitcode == EXIT_USAGE:
        return Decision(Action.GIVE_UP, f"the trainer stopped on a problem a restart cannot fix: {outcome.message}")
    restarts = len(history) - 1
    if restarts >= policy.max_restarts:
        return Decision(Action.GIVE_UP, f"--max-restarts={policy.max_restarts} used up; last: {outcome.message}")
    streak = 0
    for attempt in reversed(history):
        if attempt.progressed:
            break
        streak += 1
    if streak >= policy.max_no_progress:
        return Decision(
            Action.GIVE_UP,
            f"crash loop: {streak} attempts in a row ended without a new checkpoint"
            f" (--max-no-progress={policy.max_no_progress}); last: {outcome.kind.value}: {outcome.message}",
        )
    overrides: dict[str, str] = {}
    if outcome.kind is AttemptClass.CUDA_OOM and policy.oom_shrink:
        if device_batch_size is None:
            return Decision(Action.GIVE_UP, "CUDA out of memory, and the device batch size is unknown")
        if device_batch_size <= 1:
            return Decision(
                Action.GIVE_UP,
                "CUDA out of memory at device_batch_size=1: use a smaller --depth or --max_seq_len",
            )
        overrides["device_batch_size"] = str(device_batch_size // 2)
        if total_batch_size:  # pin the total so only the accumulation changes, never the training itself
            overrides["total_batch_size"] = str(total_batch_size)
    delay = min(policy.backoff_cap, policy.backoff * 2 ** max(streak - 1, 0))
    return Decision(Action.RESTART, f"{outcome.kind.value}: restarting with resume", delay, overrides)
