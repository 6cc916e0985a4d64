"""Fast in-process tests of the training loop's parts (nanochat/phase.py builds the loop from them): the save
schedule, the run's counters and the meta a save writes, the telemetry (heartbeat, metrics.jsonl, step lines) and the
restore of a checkpoint into a fresh model, optimizer and loader."""

from __future__ import annotations

import json
import re
import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint, metrics, resume
from nanochat.checkpoint import SCHEMA_VERSION, CheckpointError, Meta, Metric
from nanochat.common import DistInfo
from nanochat.config import ConfigError, parse_args
from nanochat.counters import Counters, meta_record
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import OptimConfig, Optimizers
from nanochat.phase import Plan
from nanochat.resume import Extension
from nanochat.saver import Saver, SaveRecord
from nanochat.settings import RLConfig, TrainConfig
from nanochat.telemetry import Startup, Telemetry
from nanochat.train_loop import FIRST_SAVE_STEPS, Due, SaveSchedule, rng_state, write_slowdown, young_daly

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


def test_young_daly_picks_sqrt_2_cost_mtbf_in_steps_within_bounds() -> None:
    # a save blocking 2 s with a failure every 4 h: sqrt(2 x 2 x 14400) = 240 s, at 0.5 s a step
    assert young_daly(cost=2.0, write=10.0, step_time=0.5, mtbf=14400) == 480
    assert young_daly(cost=8.0, write=10.0, step_time=0.5, mtbf=14400) == 960  # 4x the cost: 2x the interval
    assert young_daly(cost=0.001, write=30.0, step_time=1.0, mtbf=14400) == 30  # never shorter than the write
    assert young_daly(cost=0.0, write=0.0, step_time=2.0, mtbf=100) == 1  # at least one step
    assert young_daly(cost=500.0, write=600.0, step_time=1.0, mtbf=100) == 100  # at most the MTBF


def _record(step: int, blocked: float, write: float | None) -> SaveRecord:
    return SaveRecord(step, True, False, 100.0, blocked, durable_at=None if write is None else 100.0 + write)


def test_auto_saves_first_to_measure_then_every_young_daly_interval_never_while_a_write_is_in_flight() -> None:
    lines: list[str] = []
    schedule = SaveSchedule.of("auto", 0, mtbf=800.0, first_step=10)
    schedule.auto.log = lines.append
    records: list[SaveRecord] = []
    votes = {}
    for step in range(11, 14):  # nothing measured: the first save comes FIRST_SAVE_STEPS steps into the process
        votes[step] = schedule.vote(step, 1.0, records, busy=False)
    assert votes == {11: 0, 12: 0, 13: 1} and FIRST_SAVE_STEPS == 3
    assert schedule.due(13, save_now=1) == Due("periodic", disk=True) and schedule.on_disk(13)
    records.append(_record(13, blocked=0.25, write=None))  # the write is still in flight
    assert schedule.vote(14, 1.0, records, busy=True) == 0  # sqrt(2 x 0.25 x 800) = 20 s = 20 steps
    assert schedule.auto.interval == 20 and not schedule.on_disk(14) and schedule.due(14) is None
    assert lines == ["--save_every=auto: a save every 20 steps (~20.0s; a save costs 0.250s: it blocks 0.250s and"
                     " slows the 1.0 steps during its background write by 0.000s; its write takes 0.250s, MTBF 800s,"
                     " a step 1.000s, 1.000s during a write)"]  # fmt: skip
    records[-1] = _record(13, blocked=0.25, write=30.0)  # durable after 30 s: the write bounds the interval
    assert [schedule.vote(s, 1.0, records, busy=False) for s in range(15, 44)].index(1) + 15 == 43
    assert len(lines) == 2 and "every 30 steps" in lines[-1]
    assert schedule.vote(43, 1.0, records, busy=True) == 0  # due, but the previous write is still in flight
    assert schedule.due(43, save_now=0) is None and schedule.vote(44, 1.0, records, busy=False) == 1
    schedule.due(44, save_now=1)
    assert schedule.on_disk(44) and not schedule.on_disk(43) and not schedule.on_disk(13)
    assert schedule.vote(45, 1.0, [*records, _record(44, 0.26, 31.0)], busy=False) == 0
    assert len(lines) == 2  # a small change is not logged again
    assert schedule.due(45, signum=signal.SIGTERM) == Due("signal:SIGTERM")  # a signal still saves at once


def test_auto_counts_the_slowdown_of_the_steps_during_a_background_write_in_the_save_cost() -> None:
    assert write_slowdown(1.0, None, 30.0) == 0.0 and write_slowdown(1.0, 0.9, 30.0) == 0.0  # not timed, not slower
    assert write_slowdown(1.0, 1.25, 24.0) == pytest.approx(6.0)  # a quarter of a step more, for 24 steps
    lines: list[str] = []
    schedule = SaveSchedule.of("auto", 0, mtbf=800.0, first_step=0)
    schedule.auto.log = lines.append
    # the first save at step 3 blocks 0.5 s, then writes in the background until t=120.5 (perf_counter seconds)
    records = [SaveRecord(3, True, False, started=100.0, blocked=0.5, durable_at=120.5)]
    t = 90.0
    for step in range(1, 4):  # 1 s steps before the save
        t += 1.0
        schedule.vote(step, 1.0, records[:0], busy=False, now=t)
    t = 100.5
    for step in range(4, 14):  # ten 2 s steps while the write is in flight, then 1 s steps again
        t += 2.0
        schedule.vote(step, 2.0, records, busy=t < 120.5, now=t)
    for step in range(14, 20):
        t += 1.0
        schedule.vote(step, 1.0, records, busy=False, now=t)
    auto = schedule.auto
    assert (auto.writing_step_time, auto.step_time, auto.writing_steps) == (2.0, 1.0, 10)
    # 10 steps 1 s slower while the write runs: 10 s lost, on top of the 0.5 s it blocks: sqrt(2 x 10.5 x 800) = 130 s
    assert auto.interval == 130
    assert "slows the 7.0 steps during its background write by 7.000s" in lines[-1]
    auto.logged = None  # the line logged last was 7 steps into the write (later moves < 20%): log it again
    schedule.vote(20, 1.0, records, busy=False, now=t + 1.0)
    assert "a save costs 10.500s: it blocks 0.500s and slows the 10.0 steps during its background write by" in lines[-1]
    assert "by 10.000s; its write takes 20.500s" in lines[-1] and "a step 1.000s, 2.000s during a write" in lines[-1]


def test_auto_measures_afresh_after_a_resume_and_fixed_schedules_never_vote() -> None:
    old = [_record(8, blocked=50.0, write=50.0)]  # a save of an earlier process does not count
    schedule = SaveSchedule.of("auto", 2, mtbf=800.0, first_step=8)
    assert [schedule.vote(s, 1.0, old, busy=False) for s in (9, 10, 11)] == [0, 0, 1]
    assert schedule.auto.interval is None
    assert schedule.due(10) == Due("periodic", disk=False, memory=True)  # snapshots keep their own schedule
    fixed = SaveSchedule.of(4, 0, mtbf=1.0, first_step=0)
    assert fixed == SaveSchedule(4, 0) and fixed.vote(4, 1.0, old, busy=False) == 0 and fixed.on_disk(4)


STEPS_OR_AUTO = "--save_every must be a step count >= 0 (0 = only at the end) or auto, got "


@pytest.mark.parametrize("args,error", [
    (["--save_every=sometimes"], STEPS_OR_AUTO + "'sometimes'"),
    (["--save_every=-2"], STEPS_OR_AUTO + "'-2'"),
    (["--mtbf=-1"], "--mtbf must be a number of seconds > 0, got -1.0"),
])  # fmt: skip
def test_bad_save_every_or_mtbf_is_one_line(args: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(error) + "$"):
        parse_args(TrainConfig(), args)
    assert parse_args(TrainConfig(), ["--save_every=auto", "--mtbf=60"])[0].save_every == "auto"
    assert parse_args(TrainConfig(), ["--save_every=5e2"])[0].save_every == 500
    assert parse_args(RLConfig(), ["--save_every=auto"])[0].save_every == "auto"  # a phase with its own default


# ---- the run's counters and the meta a save writes -------------------------------------------------------------


def test_counters_smooth_and_debias_the_loss_as_the_loop_always_has() -> None:
    c, smooth = Counters(), 0.0
    assert c.loss() is None  # nothing trained yet
    for step, loss in enumerate([4.0, 3.5, 3.25, 3.0], start=1):
        c.step = step
        c.add_loss(loss)
        smooth = 0.9 * smooth + 0.1 * loss
        assert c.smooth_loss == smooth  # bit for bit: a resumed run's meta must match an uninterrupted one's
        assert c.loss() == smooth / (1 - 0.9**step)
    assert Counters(step=1, smooth_loss=0.4).loss() == pytest.approx(4.0)


def test_counters_count_tokens_from_the_batch_size_in_force_and_ramp_an_extended_schedule() -> None:
    c = Counters(step=10, tokens_offset=-640)  # the first 10 steps were 64 tokens, the run now takes 128 per step
    assert c.tokens_seen(128) == 640
    assert Counters(step=3).tokens_seen(100) == 300
    assert Counters(step=5).lrm(0.7) == 0.7
    ramp = Counters(step=5, extended=Extension(step=4, from_lrm=0.0, rewarm=4))
    assert ramp.lrm(1.0) == Extension(4, 0.0, 4).lrm(5, 1.0) == 0.5


def record(c: Counters, **kw) -> Meta:
    args = dict(extras={"tokenizer": "abc"}, run_id="r1", phase="base_train", num_iterations=12, tokens_per_step=128,
                reason="periodic", model_config={"n_layer": 1}, train_config={"seed": 0}, world_size=2,
                metric="val_bpb", started_at=1.5)  # fmt: skip
    return meta_record(c, **{**args, **kw})


def test_the_meta_record_holds_the_keys_in_the_order_and_with_the_values_a_save_always_wrote() -> None:
    history = [{"step": 4, "setting": "matrix_lr", "from": 0.02, "to": 0.01}]
    c = Counters(step=8, smooth_loss=0.5, train_time=3.0, val=1.25, val_step=4, tokens_offset=64, history=history)
    meta = record(c)
    expected = {
        "tokenizer": "abc", "run_id": "r1", "phase": "base_train", "num_iterations": 12, "final": False,
        "stop_reason": "periodic", "model_config": {"n_layer": 1}, "train_config": {"seed": 0}, "world_size": 2,
        "total_batch_size": 128, "tokens_seen": 64 + 8 * 128, "changed_on_resume": history, "schedule_extended": None,
        "val_bpb": 1.25, "val_bpb_step": 4, "train_loss": 0.5 / (1 - 0.9**8), "smooth_loss": 0.5, "train_time": 3.0,
        "started_at": 1.5, "torch_version": torch.__version__,
    }  # fmt: skip
    assert isinstance(meta, Meta) and meta.step == 8 and meta.metric("val_bpb") == Metric(1.25, 4)
    written = meta.to_dict()  # what the commit writes, once it has added the files and the time
    assert written["version"] == SCHEMA_VERSION and {k: written[k] for k in expected} == expected
    assert [k for k in written if k in expected] == list(expected)  # the keys in the order a save always wrote
    final = record(Counters(step=12, extended=Extension(10, 0.1, 2)), reason="completed", metric="val_pass@8")
    assert final["final"] and final["stop_reason"] == "completed"
    assert final["schedule_extended"] == {"step": 10, "from_lrm": 0.1, "rewarm": 2}
    assert final["val_pass@8"] is None and final["val_pass@8_step"] is None and "val_bpb" not in final
    assert record(Counters())["train_loss"] is None  # a checkpoint before any step has no loss
    assert Meta.parse(json.loads(json.dumps(written))) == meta


# ---- telemetry: step lines, heartbeat, metrics.jsonl -----------------------------------------------------------

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def telemetry(tmp_path: Path, start_step: int = 0, **settings) -> Telemetry:
    cfg = TrainConfig(heartbeat_file=str(tmp_path / "heartbeat.json"), log_every=2, device_type="cpu", **settings)
    plan = Plan(num_iterations=5, seq_len=16, grad_accum=2, tokens_per_step=64, eval_steps=3)
    saver = Saver(tmp_path, snapshotter=False, log=lambda msg: None)
    return Telemetry(cfg, CPU, plan, "val_bpb", saver, tmp_path, start_step, start_step > 0, 1e6)


def beat(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "heartbeat.json").read_text())


def test_telemetry_beats_logs_and_prints_each_step_as_the_loop_did(tmp_path: Path, capsys) -> None:
    tel = telemetry(tmp_path)
    assert {k: beat(tmp_path)[k] for k in ("step", "phase", "checkpoint", "num_iterations", "total_batch_size")} == {
        "step": 0, "phase": "starting", "checkpoint": None, "num_iterations": 5, "total_batch_size": 64}  # fmt: skip
    calls = []
    c = Counters()
    for step, dt in ((1, 0.5), (2, 0.25)):
        c.step, c.train_time = step, c.train_time + dt * (step > 1)
        c.add_loss(2.0)
        tel.step(c, 0.5, dt, lambda: calls.append(1) or {"reward": 0.25}, durable=None if step == 1 else 1)
    hb = beat(tmp_path)
    assert (hb["step"], hb["phase"], hb["checkpoint"], hb["loss"]) == (2, "training", 1, pytest.approx(2.0))
    assert hb["tok_per_s"] == pytest.approx(64 / 0.25)  # smoothed and debiased, leaving out the first step
    assert hb["mfu"] is None and hb["gpu_mem"] is None
    assert calls == [1]  # the phase's numbers: only at a step line (every --log_every=2)
    out = capsys.readouterr().out
    assert out == (
        "step 00002/00005 (40.0%) | loss 2.0000 | reward 0.2500 | lrm 0.50 | dt 250ms | tok/s 256 | total time 0.00m\n"
    )
    lines = metrics.read(tmp_path)
    assert [(r["kind"], r["step"]) for r in lines] == [("start", 0), ("step", 1), ("step", 2)]
    assert lines[2]["reward"] == 0.25 and "reward" not in lines[1] and lines[1]["dt"] == 0.5

    tel.evaluating(2, 1, durable=2)
    assert {k: beat(tmp_path)[k] for k in ("phase", "eval_batch", "eval_batches", "checkpoint")} == {
        "phase": "evaluating", "eval_batch": 1, "eval_batches": 3, "checkpoint": 2}  # fmt: skip
    tel.evaluated(2, None)
    tel.evaluated(2, 1.5)
    assert metrics.read(tmp_path)[-1] == {"kind": "eval", "step": 2, "val_bpb": 1.5, "time": ANY_TIME}
    tel.saving(2, Due("periodic", disk=False, memory=True))
    assert {k: beat(tmp_path)[k] for k in ("phase", "reason", "disk")} == {"phase": "saving", "reason": "periodic",
                                                                           "disk": False}  # fmt: skip
    tel.saved(2, Due("periodic", disk=True, memory=True), 0.0123, background=True)
    tel.saved(3, Due("signal:SIGTERM"), 1.5, background=False)
    c.val, c.val_step = 1.5, 2
    tel.done(c)
    tel.finished(c)
    assert {k: beat(tmp_path)[k] for k in ("step", "phase", "checkpoint", "val_bpb")} == {
        "step": 2, "phase": "done", "checkpoint": 2, "val_bpb": 1.5}  # fmt: skip
    assert capsys.readouterr().out.splitlines() == [
        "step 00002 | validation stopped by a signal",
        "step 00002 | validation bpb 1.5000",
        f"step 00002 | saving checkpoint to {tmp_path} (periodic) and snapshot in shared memory in the background;"
        " blocked 0.012s",
        f"step 00003 | saved checkpoint to {tmp_path} (signal:SIGTERM) in 1.50s",
        "done: 2 steps, validation bpb 1.5000, training time 0.00m",
    ]


def test_a_resumed_attempt_drops_the_lost_steps_from_metrics_and_says_where_it_started(tmp_path: Path) -> None:
    tel = telemetry(tmp_path)
    for step in (1, 2, 3):
        tel.step(Counters(step=step, smooth_loss=0.1), 1.0, 0.1, dict, None)
    tel = telemetry(tmp_path, start_step=2)
    assert (beat(tmp_path)["phase"], beat(tmp_path)["checkpoint"]) == ("starting", 2)
    tel.step(Counters(step=3, smooth_loss=0.1), 1.0, 0.1, dict, None)
    assert [(r["kind"], r["step"], r.get("reached")) for r in metrics.read(tmp_path)] == [
        ("start", 0, None), ("step", 1, None), ("step", 2, None), ("start", 2, 3), ("step", 3, None)]  # fmt: skip


def test_the_startup_line_says_where_a_restart_spent_its_time() -> None:
    times = Startup(t0=10.0, imported=1.0, process_group=10.5, found=11.0, model=12.0, optim=12.25, loaded=13.0)
    assert times.line(now=15.0) == (
        "startup: 1.00s interpreter + imports, 0.50s process group, 0.50s finding the checkpoint, 1.00s building the"
        " model, 0.25s optimizers and data, 0.75s loading the state, 2.00s first step; 6.00s in all"
    )


class AnyTime:
    def __eq__(self, other) -> bool:
        return isinstance(other, float)


ANY_TIME = AnyTime()


# ---- restoring a checkpoint ------------------------------------------------------------------------------------


class Counting:
    """A loader whose position is how many batches it gave (what a checkpoint holds of any loader)."""

    def __init__(self, fail: bool = False) -> None:
        self.position, self.fail, self.resharded = 0, fail, None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.position += 1
        x = torch.arange(self.position, self.position + 16).remainder(64)[None, :]
        return x, x.roll(-1, dims=1)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if self.fail:
            raise ValueError("another mixture")
        self.position = state["position"]

    def load_resharded(self, states: list[dict]) -> None:
        self.resharded = states


def model_and_optimizers(seed: int) -> tuple[GPT, Optimizers]:
    model = GPT(GPTConfig.from_depth(1, 64, 16, head_dim=32))
    model.init_weights(seed)
    return model, Optimizers(model, OptimConfig())


def saved_run(tmp_path: Path, final: bool = False) -> tuple[GPT, Optimizers, Counting, Counters, torch.Tensor]:
    """A model trained two steps, saved at step 2 through the real Saver with the meta the loop writes."""
    model, optimizers = model_and_optimizers(seed=1)
    loader = Counting()
    for _ in range(2):
        model(*loader.next_batch()).backward()
        optimizers.step(1.0, 0.95)  # (the momentum a fresh Muon has: a checkpoint does not hold it)
        optimizers.zero_grad()
    c = Counters(step=2, smooth_loss=0.7, train_time=1.25, val=2.5, val_step=2, tokens_offset=32)
    meta = meta_record(c, extras={"tokenizer": "tok-1"}, run_id="r1", phase="base_train",
                       num_iterations=2 if final else 10, tokens_per_step=64, reason="periodic",
                       model_config=model.config.to_dict(), train_config=asdict(TrainConfig(device_type="cpu")),
                       world_size=1, metric="val_bpb", started_at=0.0)  # fmt: skip
    rng = torch.get_rng_state()
    Saver(tmp_path, keep=-1, snapshotter=False, log=lambda msg: None).save(
        2,
        model.state_dict(),
        optimizers.state_dict(),
        meta,
        {"loader": loader.state_dict(), "rng": rng_state(CPU.device)},
    )
    return model, optimizers, loader, c, rng


def restore(tmp_path: Path, loader=None, num_iterations: int = 10, **settings) -> tuple[GPT, Optimizers, Counters]:
    model, optimizers = model_and_optimizers(seed=2)
    point = (tmp_path, checkpoint.find_latest_valid(tmp_path))
    plan = Plan(num_iterations, seq_len=16, grad_accum=1, tokens_per_step=64, eval_steps=1)
    cfg = TrainConfig(device_type="cpu", **settings)
    c = resume.restore(point, tmp_path, cfg, plan, "val_bpb", "tok-1", model, optimizers, loader or Counting(), CPU)
    return model, optimizers, c


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_restore_loads_weights_optimizer_loader_rng_and_counters_exactly(tmp_path: Path, capsys) -> None:
    model, optimizers, loader, counters, rng = saved_run(tmp_path)
    torch.rand(100)  # the RNG moves on after the save
    fresh_loader = Counting()
    restored, restored_optimizers, c = restore(tmp_path, fresh_loader)
    assert same(restored.state_dict(), model.state_dict())
    assert same(restored_optimizers.state_dict(), optimizers.state_dict())
    assert fresh_loader.state_dict() == loader.state_dict() == {"position": 2}
    assert torch.equal(torch.get_rng_state(), rng)
    assert c == counters  # step, loss, time, the evaluation, the tokens offset; no history, no extension
    assert capsys.readouterr().out == f"resumed from step 2 in {tmp_path}\n"


def test_restore_logs_and_records_changed_settings_and_refuses_what_it_cannot_resume(tmp_path: Path, capsys) -> None:
    saved_run(tmp_path)
    _, _, c = restore(tmp_path, matrix_lr=0.01)
    assert c.history == [{"step": 2, "setting": "matrix_lr", "from": 0.02, "to": 0.01}]
    assert capsys.readouterr().out.splitlines() == [
        "resume: --matrix_lr changed from 0.02 to 0.01", f"resumed from step 2 in {tmp_path}"]  # fmt: skip
    with pytest.raises(CheckpointError, match="saved with other data settings \\(another mixture\\)"):
        restore(tmp_path, Counting(fail=True))
    with pytest.raises(CheckpointError, match="already at or past --num_iterations=2 but is not a final one"):
        restore(tmp_path, num_iterations=2)
    model, optimizers = model_and_optimizers(seed=2)
    point = (tmp_path, checkpoint.find_latest_valid(tmp_path))
    plan = Plan(10, seq_len=16, grad_accum=1, tokens_per_step=64, eval_steps=1)
    with pytest.raises(CheckpointError, match="another tokenizer.json"):
        resume.restore(point, tmp_path, TrainConfig(), plan, "val_bpb", "tok-2", model, optimizers, Counting(), CPU)


def test_restore_extends_a_finished_run_given_a_larger_budget(tmp_path: Path, capsys) -> None:
    saved_run(tmp_path, final=True)
    _, _, c = restore(tmp_path, num_iterations=6, rewarm_steps=3)
    assert c.extended == Extension(step=2, from_lrm=c.extended.from_lrm, rewarm=3)
    assert "resume: the run had finished at step 2; it goes on to 6 under the new budget's schedule" in (
        capsys.readouterr().out
    )
