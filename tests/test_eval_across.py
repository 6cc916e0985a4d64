"""`nanochat-run eval` on real tiny checkpoints, through the real CLI: each checkpoint, their ensemble and their
weight average (nanochat/ensemble.py, supervisor/eval_cmd.py). Every run evaluates a private copy of a session
fixture's checkpoints, so the record and plot it writes beside them touch nobody else's files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import file_name
from tests.runs import REPO_ROOT
from tests.supervised import assert_one_line_error, cli


def copy_run(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def evaluate(env: dict, d: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """`nanochat-run eval --json` on `d`: (the record printed, the process)."""
    proc = cli(env, "eval", "--checkpoint-dir", str(d), "--json", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout), proc


def each_of(record: dict) -> dict[int, dict]:
    return {c["step"]: c["scores"] for c in record["checkpoints"]}


@pytest.mark.slow
def test_each_ensemble_and_average_of_three_base_checkpoints(tmp_path, menv, reference_1):
    d = copy_run(reference_1[0], tmp_path)
    record, proc = evaluate(menv, d, "--checkpoints", "all", "--save", str(tmp_path / "avg"))
    each = {step: s["val_bpb"] for step, s in each_of(record).items()}
    assert list(each) == [4, 8, 12] and record["phase"] == "base_train" and record["device"] == "cpu"
    # the trainer's own evaluation: the final checkpoint scores what its trainer recorded after saving it
    assert each[12] == pytest.approx(checkpoint.inspect(d, 12).meta["val_bpb"], rel=1e-12)
    ensemble, average = record["ensemble"]["scores"]["val_bpb"], record["average"]["scores"]["val_bpb"]
    # -log of a mean probability is at most the mean of the -logs (Jensen), token by token
    assert ensemble <= sum(each.values()) / 3 + 1e-12
    assert 0 < average < 20 and record["ensemble"]["of"] == record["average"]["of"] == [4, 8, 12]
    # the record in the run dir beside the checkpoints, the plot next to it
    run_dir = d.with_name("ckpt.run")
    assert record["record"] == str(run_dir / Path(record["record"]).name)
    assert json.loads(Path(record["record"]).read_text()) == record
    assert Path(record["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval: base_train checkpoints at steps 4, 8, 12" in proc.stderr

    # the saved average: the elementwise mean of the three, weights only, final, with its sources
    out = tmp_path / "avg"
    saved = checkpoint.find_latest_valid(out, pytest.fail)
    assert saved.step == 12 and saved.final and saved.weights_only
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted([file_name("meta", 12), file_name("model", 12), checkpoint.LATEST])  # no optimizer file
    states = [checkpoint.load_model(d, checkpoint.inspect(d, step)) for step in (4, 8, 12)]
    got = checkpoint.load_model(out, saved)
    assert got.keys() == states[0].keys()
    for key, value in got.items():
        mean = (states[0][key] + states[1][key] + states[2][key]) / 3
        assert value.dtype == mean.dtype and torch.equal(value, mean), key
    metas = {step: checkpoint.inspect(d, step).meta for step in (4, 8, 12)}
    checksums = {step: meta["files"][file_name("model", step)]["xxh3_64"] for step, meta in metas.items()}
    assert saved.meta["averaged_from"] == [
        {"phase": "base_train", "dir": str(d), "step": step, "model_xxh3_64": checksums[step]} for step in (4, 8, 12)
    ]
    source_meta = metas[12]
    for key in ("model_config", "tokenizer", "phase"):
        assert saved.meta[key] == source_meta[key], key
    assert saved.meta["val_bpb"] == pytest.approx(average) and saved.meta["run_id"] != source_meta["run_id"]

    # bad input, now that there are checkpoints: one line each, exit 2, no traceback
    bad = lambda *args: cli(menv, "eval", "--checkpoint-dir", str(d), *args)  # noqa: E731
    assert_one_line_error(bad("--checkpoints", "4,5"), "no checkpoint at step 5", "it has steps 4, 8, 12")
    assert_one_line_error(bad("--save", str(out)), "already holds checkpoints")
    assert_one_line_error(bad("--tasks", "choice"), "--tasks is for the chat phases")


@pytest.mark.slow
def test_an_ensemble_or_average_of_one_checkpoint_scores_as_that_checkpoint(tmp_path, menv, reference_1):
    d = copy_run(reference_1[0], tmp_path)
    record, _ = evaluate(menv, d, "--checkpoints", "8")
    alone = record["checkpoints"][0]["scores"]["val_bpb"]
    assert record["checkpoints"][0]["step"] == 8
    assert record["ensemble"]["scores"]["val_bpb"] == pytest.approx(alone, rel=1e-9)  # -log(exp(-loss))
    assert record["average"]["scores"]["val_bpb"] == alone  # the same weights, the same numbers


@pytest.mark.slow
def test_an_invalid_checkpoint_is_skipped_with_a_warning(tmp_path, menv, reference_1):
    d = copy_run(reference_1[0], tmp_path)
    model = d / file_name("model", 8)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # rotted at the same size: only the checksum tells
    model.write_bytes(data)
    record, proc = evaluate(menv, d, "--checkpoints", "last:3", "--mode", "each", "--eval-tokens", "64")
    assert list(each_of(record)) == [4, 12] and record["evaluation"]["tokens"] == 64
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipping the checkpoint at step 8" in warnings[0], proc.stderr


@pytest.mark.slow
def test_mid_checkpoints_are_scored_on_the_phase_s_own_validation(tmp_path, menv, mid):
    d = copy_run(mid, tmp_path)
    record, _ = evaluate(menv, d, "--checkpoints", "last:1", "--mode", "each")
    assert record["phase"] == "mid_train" and record["ensemble"] is None and record["average"] is None
    final = checkpoint.inspect(d, 12).meta
    assert each_of(record)[12]["val_bpb"] == pytest.approx(final["val_bpb"], rel=1e-12)


def chat_eval(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.chat_eval", *args], env=env, text=True,
                          capture_output=True, timeout=300, cwd=REPO_ROOT)  # fmt: skip


@pytest.mark.slow
def test_sft_checkpoints_by_accuracy_and_the_saved_average_loads_in_chat_cli_and_chat_eval(tmp_path, menv, sft):
    d, out = copy_run(sft, tmp_path), tmp_path / "avg"
    small = ["--max-problems", "5", "--max-tokens", "16"]
    record, proc = evaluate(menv, d, "--checkpoints", "all", *small, "--save", str(out))
    each = each_of(record)
    assert list(each) == [4, 8, 12] and all(set(s) == {"arithmetic", "spelling", "choice"} for s in each.values())
    assert [c["weights_only"] for c in record["checkpoints"]] == [True, True, False]  # slimmed: fine to evaluate
    # generative tasks are not ensembled, and it says so; multiple choice is
    assert set(record["ensemble"]["scores"]) == {"choice"}
    assert record["ensemble"]["not_ensembled"] == ["arithmetic", "spelling"]
    assert re.search(r"^warning: the ensemble scores the multiple-choice tasks only; arithmetic, spelling", proc.stderr,
                     re.M)  # fmt: skip
    assert set(record["average"]["scores"]) == {"arithmetic", "spelling", "choice"}

    # scored as chat_eval scores it: the same accuracies for the final checkpoint
    proc = chat_eval(menv, f"--checkpoint_dir={d}", "--step=12", "--max_problems=5", "--max_tokens=16")
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(checkpoint.record_path(d, "chat_eval", 12).read_text())["tasks"]
    assert {name: r["accuracy"] for name, r in theirs.items()} == each[12]

    # the averaged checkpoint loads where checkpoints load: chat_cli, chat_eval (chat_web shares their loader)
    once = subprocess.run([sys.executable, "-m", "scripts.chat_cli", f"--checkpoint_dir={out}", "-p", "What is 2+2?",
                           "--temperature=0", "--max_tokens=8"], env=menv, text=True, capture_output=True,
                          timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert once.returncode == 0 and not once.stderr, once.stderr
    proc = chat_eval(menv, f"--checkpoint_dir={out}", "--max_problems=5", "--max_tokens=16")
    assert proc.returncode == 0 and "evaluating" in proc.stdout and "step 12 (chat_sft)" in proc.stdout, proc.stderr
    theirs = json.loads(checkpoint.record_path(out, "chat_eval", 12).read_text())["tasks"]
    assert {name: r["accuracy"] for name, r in theirs.items()} == record["average"]["scores"]

    # an ensemble of one multiple-choice scorer is that checkpoint; an ensemble of generative tasks alone is refused
    one, _ = evaluate(menv, d, "--checkpoints", "8", "--mode", "each,ensemble", "--tasks", "choice", *small)
    assert one["ensemble"]["scores"] == one["checkpoints"][0]["scores"]
    refused = cli(menv, "eval", "--checkpoint-dir", str(d), "--mode", "ensemble", "--tasks", "arithmetic,spelling")
    assert_one_line_error(refused, "multiple-choice tasks only", "choice")


def test_bad_input_is_one_line_before_anything_is_loaded(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base")}  # refused before a tokenizer is needed
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    cases = [
        (["--checkpoint-dir", str(tmp_path / "nope")], "no checkpoint dir at"),
        (["--checkpoint-dir", str(empty)], "no checkpoints in"),
        (["--checkpoint-dir", str(empty), "--mode", "each,soup"], "--mode takes each, ensemble, average"),
        (["--checkpoint-dir", str(empty), "--checkpoints", "last:x"], "--checkpoints takes all, last:N"),
        (["--checkpoint-dir", str(empty), "--checkpoints", "1000,,2000"], "--checkpoints takes"),
        (["--checkpoint-dir", str(empty), "--mode", "each", "--save", str(tmp_path / "s")], "add average to --mode"),
        (["--checkpoint-dir", str(empty), "--max-problems", "0"], "--max-problems"),
    ]
    for args, needle in cases:
        assert_one_line_error(cli(env, "eval", *args), needle)
