"""scripts/bench_goodput.py's ledger of an unsupervised arm, from the attempts the bench saw (no processes): the
resume point of each attempt comes from the next one, across the Ctrl+C rerun too, and every second of the
bench's clock lands in one part."""

from __future__ import annotations

from pathlib import Path

from scripts.bench_goodput import Arm, Attempt, Invocation, ledger, schedule


def beat(t: float, step: int, began: float, train: float, kept_at: dict[int, float], phase: str = "training") -> dict:
    return {"time": t, "step": step, "phase": phase, "pid": 1,
            "spent": {"began": began, "train": train, "save": 0.5, "eval": 0.0, "final": 0.0,
                      "kept_at": {str(k): v for k, v in kept_at.items()}}}  # fmt: skip


def test_unsupervised_ledger_charges_the_lost_steps_and_excludes_the_rerun_gap():
    arm = Arm("loop", Path("ckpt"), Path("run"))
    # invocation 1: attempt a (SIGKILLed at step 30, saved at 20: resumed from 20), attempt b stopped by Ctrl+C
    a = Attempt({1}, 102.0, 140.0, beat(138.0, 30, 110.0, 20.0, {20: 12.0}), first=0)
    b = Attempt({2}, 145.0, 170.0, beat(169.0, 45, 150.0, 15.0, {40: 12.0}), first=20, stopped=True)
    # invocation 2, 10 s after the first ended: resumes from the stop save (step 45) and finishes
    c = Attempt({3}, 182.0, 200.0, beat(199.0, 50, 190.0, 5.0, {50: 5.0}, "done"), first=45)
    arm.invocations = [Invocation(100.0, 171.0, [a, b], interrupted=True), Invocation(181.0, 201.0, [c])]
    led = ledger(arm)
    assert led.wall == 91.0 and led.between == 10.0  # the gap before the rerun is shown apart, not counted
    assert led.parts["lost steps"] == 8.0  # a's steps 21-30: trained again
    assert led.parts["kept steps"] == 12.0 + 15.0 + 5.0  # b was stopped with a save: nothing of it lost
    assert led.parts["detection"] == 2.0  # a's last beat -> its workers gone; b and c ended cleanly
    assert led.parts["back-off"] == 5.0  # a's end -> b's workers (torchrun's restart)
    assert abs(sum(led.parts.values()) - led.wall) < 1e-9


def test_schedule_is_seeded_and_places_one_hang_and_one_ctrl_c():
    one = schedule(3, 10.0, 4, 2)
    assert one == schedule(3, 10.0, 4, 2) and one != schedule(4, 10.0, 4, 2)
    assert [f.kind for f in one] == ["kill", "hang", "ctrl-c", "kill", "kill", "kill"]
    assert all(7.5 <= f.after <= 12.5 and f.rank in (0, 1) for f in one)
