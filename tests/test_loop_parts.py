"""Fast in-process tests of the training loop's parts (nanochat/phase.py builds the loop from them): the save
schedule, the run's counters and the meta a save writes, the telemetry (heartbeat, metrics.jsonl, step lines) and the
restore of a checkpoint into a fresh model, optimizer and loader."""

from __future__ import annotations

import signal

import pytest

from nanochat.train_loop import Due, SaveSchedule

# ---- the save schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_every", [-1, 0, 1, 3, 5])
@pytest.mark.parametrize("snapshot_every", [-1, 0, 1, 2, 5])
def test_schedule_owes_exactly_the_periodic_saves(save_every: int, snapshot_every: int) -> None:
    schedule = SaveSchedule(save_every, snapshot_every)
    for step in range(1, 31):
        disk = save_every > 0 and step % save_every == 0
        memory = snapshot_every > 0 and step % snapshot_every == 0
        due = schedule.due(step)
        assert due == (Due("periodic", disk, memory) if disk or memory else None), step
        assert schedule.on_disk(step) == disk


@pytest.mark.parametrize("save_every,snapshot_every", [(-1, -1), (0, 0), (4, 2), (1, 1)])
def test_the_last_step_and_a_signal_owe_a_durable_save_whatever_the_schedule(save_every, snapshot_every) -> None:
    schedule = SaveSchedule(save_every, snapshot_every)
    for step in (1, 2, 4, 7):
        assert schedule.due(step, last=True) == Due("completed", disk=True, memory=False)
        assert schedule.due(step, last=True, signum=signal.SIGTERM) == Due("completed")  # the final save wins
        assert schedule.due(step, signum=signal.SIGTERM) == Due("signal:SIGTERM", disk=True, memory=False)
        assert schedule.due(step, signum=signal.SIGINT) == Due("signal:SIGINT")


def test_schedule_is_pure() -> None:
    schedule = SaveSchedule(2, 3)
    assert [schedule.due(6) for _ in range(3)] == [Due("periodic", True, True)] * 3
    assert schedule.due(6, signum=signal.SIGTERM).reason == "signal:SIGTERM"
    assert schedule.due(6) == Due("periodic", True, True)  # no signal remembered
