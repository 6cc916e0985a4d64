"""End to end: the trainer as users run it, one process or two under torchrun, with real signals, real files and
faults injected through --debug_fault. Nothing of the code under test is mocked.

Every run is tiny (depth 1, 12 steps of 128 tokens). Most tests start from a copy of a few module-level runs: an
uninterrupted reference and runs SIGKILLed after their checkpoints, so resumed runs can be compared bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint, compress, metrics
from nanochat.checkpoint import LATEST, RUN_ID, file_name
from nanochat.dataset import data_dir, train_val_shards
from nanochat.locks import LOCKS
from nanochat.optim import lr_multiplier
from nanochat.resume import Extension
from nanochat.tokenizer import tokenizer_dir
from scripts.base_train import TrainConfig
from tests.runs import (
    LONG,
    Trainer,
    assert_finished,
    assert_same_final_state,
    copy,
    one_line_error,
    snapshot,
    step_lines,
    steps,
    temp_files,
    train,
)
from tests.supervised import cli

pytestmark = pytest.mark.slow


# ---- what a checkpoint holds, cadence and pruning ----------------------------------------------------------


def test_meta_records_everything_a_resume_needs(reference_1) -> None:
    d, proc = reference_1
    meta = checkpoint.inspect(d, 12).meta
    assert meta["step"] == 12 and meta["num_iterations"] == 12 and meta["final"] is True
    assert meta["model_config"] == {
        "sequence_len": 32,
        "vocab_size": 512,
        "n_layer": 1,
        "n_head": 2,
        "n_kv_head": 2,
        "n_embd": 64,
    }
    train_config = meta["train_config"]
    assert train_config["depth"] == 1 and train_config["save_every"] == 4 and train_config["checkpoint_dir"] == str(d)
    assert set(train_config) == {f.name for f in dataclasses.fields(TrainConfig)}  # all, not just the overrides
    assert meta["world_size"] == 1 and meta["total_batch_size"] == 128 and meta["tokens_seen"] == 12 * 128
    assert meta["val_bpb"] > 0 and meta["val_bpb_step"] == 12  # measured after the save, added to the meta
    assert meta["smooth_loss"] > 0 and meta["train_loss"] > 0 and meta["train_time"] > 0
    assert meta["stop_reason"] == "completed" and meta["saved_at"] >= meta["started_at"] > 0
    (rank,) = meta["ranks"]
    assert rank["loader"]["split"] == "train" and rank["loader"]["world_size"] == 1 and rank["rng"]["cpu"]
    for kind in ("model", "optim"):
        path = d / file_name(kind, 12)
        assert meta["files"][path.name] == {"size": path.stat().st_size, "xxh3_64": checkpoint.file_digest(path)}
    assert checkpoint.inspect(d, 4).meta["stop_reason"] == "periodic"


@pytest.mark.parametrize(
    "save_every, keep, on_disk, saves",
    [
        (4, -1, [4, 8, 12], [4, 8, 12]),  # the reference run
        (4, 2, [8, 12], [4, 8, 12]),
        (4, 1, [12], [4, 8, 12]),
        (0, 3, [12], [12]),  # 0 = only the final checkpoint
    ],
)
def test_save_cadence_and_pruning(reference_1, tmp_path, menv, save_every, keep, on_disk, saves) -> None:
    if (save_every, keep) == (4, -1):
        d, proc = reference_1
    else:
        d = tmp_path / "ckpt"
        proc = train(menv, d, f"--save_every={save_every}", f"--keep_last_n_checkpoints={keep}")
    assert_finished(proc, d)
    assert [int(s) for s in re.findall(r"^step (\d+) \| sav(?:ed|ing) checkpoint", proc.stdout, re.M)] == saves
    assert steps(d) == on_disk
    assert all(c.valid for c in checkpoint.scan(d, verify=True))
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [LATEST, RUN_ID, LOCKS["trainer"], metrics.FILE,
         *(file_name(k, s) for s in on_disk for k in ("model", "optim", "meta"))]
    )  # fmt: skip


def test_final_checkpoint_is_never_pruned(reference_1, tmp_path, menv) -> None:
    d = copy(reference_1[0], tmp_path)
    proc = train(menv, d, "--num_iterations=20", "--keep_last_n_checkpoints=1")
    assert "resume: --num_iterations changed from 12 to 20" in proc.stdout
    assert "resume: --keep_last_n_checkpoints changed from -1 to 1" in proc.stdout
    assert_finished(proc, d, step=20)
    assert steps(d) == [12, 20] and checkpoint.inspect(d, 12).final  # 4, 8 and 16 pruned, the old final kept


def test_older_checkpoints_keep_weights_only_and_a_fallback_to_one_says_so(reference_1, tmp_path, menv) -> None:
    """--keep_optim_last_n=1: only the newest checkpoint (and a final one) keeps the optimizer file; the older ones
    stay valid for evaluation and the next phase, and a resume that must fall back to one resets the optimizer."""
    d = tmp_path / "ckpt"
    proc = train(menv, d, "--keep_optim_last_n=1", "--debug_fault=sigkill@step:10")
    on_disk = sorted(p.name for p in d.glob("*_0000*"))
    assert on_disk == ["meta_000004.json", "meta_000008.json", "model_000004.pt", "model_000008.pt",
                       "optim_000008.pt"], on_disk  # fmt: skip
    old = checkpoint.inspect(d, 4)
    assert old.valid and old.weights_only and list(old.meta["files"]) == ["model_000004.pt"]
    assert checkpoint.load(d, old)[1] is None and torch.equal(
        checkpoint.load_model(d, old)["wte.weight"],
        torch.load(reference_1[0] / file_name("model", 4), weights_only=True)["wte.weight"],
    )  # the weights are the full checkpoint's, bit for bit
    (d / "optim_000008.pt").write_bytes(b"rotten")  # the newest full checkpoint is damaged
    proc = train(menv, d, "--keep_optim_last_n=1")
    assert "skipping the checkpoint at step 8" in proc.stderr and "resumed from step 4" in proc.stdout
    assert "resuming from the weights-only checkpoint at step 4: the optimizer state" in proc.stderr
    final = assert_finished(proc, d)
    assert not final.weights_only and (d / "optim_000012.pt").exists()


# ---- exact resume ------------------------------------------------------------------------------------------


def test_exact_resume_after_sigkill_one_process(reference_1, crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    proc = train(menv, d, "--debug_fault=sigkill@step:10")  # the same command again: the fault fired already
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])


def test_exact_resume_after_sigkill_two_processes(reference_2, crashed_2, tmp_path, menv) -> None:
    d = copy(crashed_2, tmp_path)
    proc = train(menv, d, "--debug_fault=sigkill@step:10", nproc=2)
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    assert "weights identical on all 2 ranks" in proc.stdout
    assert_finished(proc, d, world=2)
    assert_same_final_state(d, reference_2)


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2)])
def test_world_size_change_resumes_and_finishes(crashed_1, crashed_2, tmp_path, menv, old, new) -> None:
    d = copy(crashed_2 if old == 2 else crashed_1, tmp_path)
    proc = train(menv, d, nproc=new)
    assert (
        f"resumed from step 8 in {d} at a new geometry ({old} -> {new} ranks): weights, optimizer and schedule are"
        " exact; the data order continues approximately"
    ) in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    ckpt = assert_finished(proc, d, world=new)
    assert [r["loader"]["rank"] for r in ckpt.meta["ranks"]] == list(range(new))
    # the optimizer state came along: Adam's step counts 8 restored steps plus 4 new ones
    optim = torch.load(d / "optim_000012.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["adamw"]["state"].values()} == {12.0}
    assert optim["muon"]["state"]  # the momentum buffers


def test_an_inexact_resume_keeps_weights_and_optimizer_and_moves_the_data_to_a_row_group_boundary(
    reference_1, crashed_1, tmp_path, menv
) -> None:
    # --resume_exact=False (resume as upstream nanochat does, for bench_goodput's loop arm): the same world size,
    # yet the loader restarts from the start of its row group and the RNG afresh, so the run ends elsewhere
    d = copy(crashed_1, tmp_path)
    proc = train(menv, d, "--resume_exact=False")
    assert (
        f"resumed from step 8 in {d} not exactly: weights, optimizer and schedule are exact; the data order"
        " continues approximately (--resume_exact=False), the RNG afresh"
    ) in proc.stdout
    assert step_lines(proc.stdout) == [9, 10, 11, 12]
    assert_finished(proc, d)
    optim = torch.load(d / "optim_000012.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["adamw"]["state"].values()} == {12.0}
    with pytest.raises(AssertionError):  # the data after step 8 was not the reference's
        assert_same_final_state(d, reference_1[0])


# ---- signals -----------------------------------------------------------------------------------------------


def check_signal_checkpoint(t: Trainer, d: Path, sig: signal.Signals) -> int:
    """The checkpoint is at the exact step the `stopped by` line names, valid, with the signal as reason."""
    m = re.search(rf"^stopped by {sig.name} at step (\d+); run again to resume$", t.stdout, re.M)
    assert m, t.output
    step = int(m.group(1))
    assert step >= 3 and step_lines(t.stdout)[-1] == step
    assert f"step {step:05d} | saved checkpoint to {d} (signal:{sig.name})" in t.stdout
    ckpt = checkpoint.find_latest_valid(d, pytest.fail)
    assert ckpt.step == step and ckpt.meta["stop_reason"] == f"signal:{sig.name}" and not ckpt.final
    assert steps(d) == [step] and (d / LATEST).read_text() == f"{step}\n" and temp_files(d) == []
    return step


def check_resume_after_signal(menv: dict, d: Path, step: int, nproc: int) -> None:
    proc = train(menv, d, f"--num_iterations={step + 2}", "--save_every=0", nproc=nproc)
    assert f"resumed from step {step} in {d}" in proc.stdout
    assert f"resume: --num_iterations changed from 100000 to {step + 2}" in proc.stdout
    assert step_lines(proc.stdout) == [step + 1, step + 2]
    assert_finished(proc, d, step=step + 2, world=nproc)


def test_sigint_saves_at_the_exact_step_and_resume_continues(tmp_path, menv, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG)
    t.wait_for(r"^step 00003/")
    t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 130
    assert "got SIGINT: will save a checkpoint after the current step and exit" in t.stdout
    assert "Traceback" not in t.output and "KeyboardInterrupt" not in t.output
    step = check_signal_checkpoint(t, d, signal.SIGINT)
    check_resume_after_signal(menv, d, step, nproc=1)


def test_sigusr1_dumps_all_thread_stacks_then_sigterm_saves_at_the_exact_step(tmp_path, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG)
    t.wait_for(r"^step 00002/")
    t.proc.send_signal(signal.SIGUSR1)
    t.wait_for(r"^(Current thread|Thread) 0x[0-9a-f]+", stream="stderr")
    t.wait_for(r'^  File ".*base_train\.py", line \d+ in main', stream="stderr")
    for _ in range(3):  # still training
        t.wait_for(r"^step \d+/")
    assert t.proc.poll() is None
    t.proc.send_signal(signal.SIGTERM)
    assert t.finish() == 143
    assert "got SIGTERM: will save a checkpoint after the current step and exit" in t.stdout
    assert "Traceback" not in t.output
    check_signal_checkpoint(t, d, signal.SIGTERM)  # resuming from it: see the SIGINT test (the same code path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_both_torchrun_workers(tmp_path, menv, start, sig) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG, nproc=2)
    t.wait_for(r"^step 00003/")
    workers = t.workers()
    assert len(workers) == 2
    for w in workers:
        w.send_signal(sig)
    assert t.finish() != 0  # torchrun reports the workers' non-zero exit
    assert t.stdout.count(f"got {sig.name}: will save a checkpoint") == 2  # each rank got it
    # torchrun's failure report lists each worker that exited: with the signal's exit code (the first one is the
    # root cause; the other may already be gone or be stopped by torchrun's SIGTERM, after our signal's save)
    codes = {int(pid): int(code) for code, pid in re.findall(r"exitcode\s*: (-?\d+) \(pid: (\d+)\)", t.output)}
    assert codes and set(codes) <= {w.pid for w in workers}, t.output
    assert set(codes.values()) == {128 + sig}, t.output
    step = check_signal_checkpoint(t, d, sig)
    if sig == signal.SIGTERM:  # resuming is the same after either signal; once is enough for the time it takes
        check_resume_after_signal(menv, d, step, nproc=2)


def test_second_signal_during_the_save_does_not_corrupt_it(tmp_path, start) -> None:
    d = tmp_path / "ckpt"
    t = start(d, *LONG, "--debug_fault=sleep@save:3")
    t.wait_for(r"^step 00003/")
    t.proc.send_signal(signal.SIGTERM)
    t.wait_for(r"^debug_fault: sleeping 3s inside the save")  # the model file is half written now
    t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 128 + signal.SIGTERM  # the first signal decides
    assert "ignored 1 more signal(s) during the save: the first one decides" in t.stdout
    step = check_signal_checkpoint(t, d, signal.SIGTERM)
    model, optim = checkpoint.load(d, checkpoint.find_latest_valid(d, pytest.fail))
    assert model and optim["adamw"]["state"] and float(optim["adamw"]["state"][0]["step"]) == step


# ---- what may and may not change on resume -----------------------------------------------------------------


def _other_vocab(d: Path) -> None:
    path = d / "meta_000008.json"
    meta = json.loads(path.read_text())
    meta["model_config"]["vocab_size"] = 1024  # as if trained with another tokenizer
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "args, edit, mismatch",
    [
        (["--depth=2"], None, "depth 1, this run asks for 2"),
        (["--head_dim=48"], None, "model width (--head_dim, depth) 64, this run asks for 96"),
        ([], _other_vocab, "vocab size (the tokenizer) 1024, this run asks for 512"),
        (["--max_seq_len=64"], None, "sequence length (--max_seq_len) 32, this run asks for 64"),
    ],
)
def test_incompatible_checkpoint_is_refused(crashed_1, tmp_path, menv, args, edit, mismatch) -> None:
    d = copy(crashed_1, tmp_path)
    if edit:
        edit(d)
    before = snapshot(d)
    error = one_line_error(train(menv, d, *args))
    assert error == (
        f"base_train: error: the checkpoint at step 8 in {d} has {mismatch}; use --resume=False to start fresh or"
        " pick another --model_tag"
    )
    assert snapshot(d) == before


def test_allowed_changes_are_logged_and_the_run_finishes(crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    changes = {
        "num_iterations": (12, 14),
        "eval_every": (-1, 7),
        "device_batch_size": (2, 1),  # total_batch_size unchanged: 4 accumulation steps instead of 2
        "matrix_lr": (0.02, 0.03),
        "embedding_lr": (0.2, 0.1),
    }
    proc = train(menv, d, *(f"--{k}={new}" for k, (_, new) in changes.items()))
    for key, (old, new) in changes.items():
        assert f"resume: --{key} changed from {old!r} to {new!r}" in proc.stdout
    assert "resume: --depth" not in proc.stdout  # unchanged settings are not reported
    assert "batch: 128 tokens/step = 1x32 x 1 ranks x 4 accumulation steps" in proc.stdout
    assert f"resumed from step 8 in {d}" in proc.stdout
    assert re.findall(r"^step (\d+) \| validation bpb", proc.stdout, re.M) == ["00014"]  # 7 is before the resume
    ckpt = assert_finished(proc, d, step=14)
    assert ckpt.meta["train_config"]["matrix_lr"] == 0.03 and ckpt.meta["tokens_seen"] == 14 * 128


def test_changed_settings_are_applied_recorded_in_the_meta_and_shown_by_status(crashed_1, reference_1, tmp_path, menv):
    d = copy(crashed_1, tmp_path)  # checkpoints 4 and 8
    saved = checkpoint.inspect(d, 8).meta
    old_batch = saved["total_batch_size"]
    proc = train(menv, d, "--matrix_lr=0.03", f"--total_batch_size={2 * old_batch}", "--warmdown_ratio=0.5")
    final = assert_finished(proc, d)
    assert final.meta["changed_on_resume"] == [
        {"step": 8, "setting": "matrix_lr", "from": 0.02, "to": 0.03},
        {"step": 8, "setting": "total_batch_size", "from": saved["train_config"]["total_batch_size"],
         "to": 2 * old_batch},
        {"step": 8, "setting": "warmdown_ratio", "from": 0.2, "to": 0.5},
    ]  # fmt: skip
    lrms = {r["step"]: r["lrm"] for r in metrics.read(d) if r["kind"] == "step" and r["step"] > 8}
    assert lrms == {s + 1: lr_multiplier(s, 12, 0.0, 0.5, 0.0) for s in range(8, 12)}  # the new schedule
    assert final.meta["tokens_seen"] == 8 * old_batch + 4 * 2 * old_batch  # counted in tokens across the change
    got, want = (compress.load(x / file_name("model", 12)) for x in (d, reference_1[0]))
    assert any(not torch.equal(got[k], want[k]) for k in got)  # the new settings were applied
    st = cli(menv, "status", "--checkpoint-dir", str(d))
    assert "changed on resume at step 8: --matrix_lr 0.02 -> 0.03" in st.stdout, st.stdout


def test_raising_num_iterations_after_the_end_continues_and_the_rewarm_resumes_exactly(reference_1, tmp_path, menv):
    a, b = copy(reference_1[0], tmp_path / "a"), copy(reference_1[0], tmp_path / "b")  # finished at step 12
    proc = train(menv, a, "--num_iterations=20", "--rewarm_steps=8")
    assert "resume: the run had finished at step 12; it goes on to 20 under the new budget's schedule" in proc.stdout
    final = assert_finished(proc, a, step=20)
    assert checkpoint.inspect(a, 12).final  # the old budget's final checkpoint stays
    ext = final.meta["schedule_extended"]
    assert ext == {"step": 12, "from_lrm": lr_multiplier(11, 12, 0.0, 0.2, 0.0), "rewarm": 8}
    ramp = Extension(**ext)
    lrms = {r["step"]: r["lrm"] for r in metrics.read(a) if r["kind"] == "step" and r["step"] > 12}
    assert lrms == {s + 1: ramp.lrm(s, lr_multiplier(s, 20, 0.0, 0.2, 0.0)) for s in range(12, 20)}
    assert lrms[13] < lrms[14] < lrms[15] < lrms[16] and ext["from_lrm"] < lrms[13]  # ramps up from the old end
    killed = train(menv, b, "--num_iterations=20", "--rewarm_steps=8", "--debug_fault=sigkill@step:17")
    assert killed.returncode == -9
    proc = train(menv, b, "--num_iterations=20", "--rewarm_steps=8")  # resumes at 16, inside the ramp
    assert "resumed from step 16" in proc.stdout and "it goes on to" not in proc.stdout
    assert_finished(proc, b, step=20)
    assert_same_final_state(b, a, step=20)


def test_another_tokenizer_with_the_same_vocab_size_is_refused(crashed_1, tmp_path, base_dir, menv):
    home = tmp_path / "home"
    shutil.copytree(data_dir(base_dir), data_dir(home))
    shutil.copytree(tokenizer_dir(base_dir), tokenizer_dir(home))
    path = tokenizer_dir(home) / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))  # the same tokens, another file
    d = copy(crashed_1, tmp_path)
    error = one_line_error(train({**menv, "NANOCHAT_BASE_DIR": str(home)}, d))
    assert "was trained with another tokenizer.json (the same vocab size, a different file)" in error


def test_resume_false_archives_the_old_checkpoints_and_starts_fresh(reference_1, crashed_1, tmp_path, menv) -> None:
    d = copy(crashed_1, tmp_path)
    before = {name: data for name, data in snapshot(d).items() if not name.startswith(".fault-fired")}
    proc = train(menv, d, "--resume=False")
    m = re.search(
        rf"^--resume=False: starting fresh; moved the old checkpoints to ({d}/archived-[\d-]+)", proc.stdout, re.M
    )
    assert m and "(nothing deleted)" in proc.stdout, proc.stdout
    archived = Path(m.group(1))
    assert snapshot(archived) == before  # every file, byte for byte
    assert "resumed from" not in proc.stdout and step_lines(proc.stdout)[0] == 1
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])  # a fresh run of the same config


# ---- eval comes after the save -----------------------------------------------------------------------------


def test_eval_runs_after_the_save_and_is_not_repeated_on_resume(base_dir, tmp_path, menv) -> None:
    # A private base dir whose validation shard is garbage: training reads only the train shards, so the run
    # crashes in its first eval, at step 4, right after the save of step 4.
    base = tmp_path / "base"
    shutil.copytree(data_dir(base_dir), data_dir(base))
    shutil.copytree(tokenizer_dir(base_dir), tokenizer_dir(base))
    val = train_val_shards(data_dir(base))[1]
    good = val.read_bytes()
    val.write_bytes(b"not a parquet file" * 100)
    env = {**menv, "NANOCHAT_BASE_DIR": str(base)}
    d = tmp_path / "ckpt"
    proc = train(env, d, "--eval_every=4")
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # a crash, not a handled error
    assert "step 00004 | saved checkpoint" in proc.stdout and "validation bpb" not in proc.stdout
    assert step_lines(proc.stdout)[-1] == 4
    assert checkpoint.find_latest_valid(d, pytest.fail).step == 4  # the crash after the save kept it

    val.write_bytes(good)
    proc = train(env, d, "--eval_every=4")
    assert f"resumed from step 4 in {d}" in proc.stdout
    evals = re.findall(r"^step (\d+) \| validation bpb", proc.stdout, re.M)
    assert evals == ["00008", "00012"]  # not step 4 again
    assert proc.stdout.index("step 00008 | saved checkpoint") < proc.stdout.index("step 00008 | validation bpb")
    ckpt = assert_finished(proc, d)
    assert ckpt.meta["val_bpb_step"] == 12
