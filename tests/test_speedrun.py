"""`nanochat-run speedrun` end to end on the tiny CPU pipeline (built-in data, depth 1), real processes throughout:
crashes injected in base, SFT and RL end with the same RL model as a clean run; Ctrl+C in SFT and a rerun skip
what is done and resume the rest; finished phases are skipped in a blink; a changed setting is refused in one
line naming the phase unless --redo; status and report.md show every phase."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nanochat import checkpoint
from nanochat.dataset import data_dir
from nanochat.registry import PHASES
from nanochat.tokenizer import tokenizer_dir
from tests.runs import REPO_ROOT, assert_identical, built_once, kill_group
from tests.supervised import NANOCHAT_RUN

pytestmark = pytest.mark.slow

TOML = """
[tokenizer]
vocab_size = {vocab}
[base]
head_dim = 32
max_seq_len = 128
device_batch_size = 4
total_batch_size = -1
num_iterations = 20
eval_every = -1
eval_tokens = 512
sample_every = -1
save_every = 5
async_save = false
{base}
[mid]
device_batch_size = 2
total_batch_size = 512
num_iterations = 8
save_every = 4
eval_every = -1
eval_tokens = 256
task_size = 200
[sft]
device_batch_size = 2
total_batch_size = 512
num_iterations = {sft_steps}
save_every = 4
eval_every = -1
eval_tokens = 256
task_size = 200
async_save = false
{sft}
[rl]
num_iterations = 6
prompts_per_step = 2
num_samples = 4
device_batch_size = 2
max_new_tokens = 8
tasks = "choice,spelling"
task_size = 200
save_every = 3
eval_every = -1
eval_problems = 4
pass_k = 2
async_save = false
{rl}
[eval]
tasks = "choice,spelling"
max_problems = 4
max_tokens = 8
"""
PHASE_DIRS = {p.name: p.folder for p in PHASES.values()}


def setup(tmp_path: Path, base_dir: Path, tokenizer, sft_steps: int = 8, **faults: str) -> tuple[dict, Path]:
    """A fresh NANOCHAT_BASE_DIR with the test corpus and tokenizer (the data and tokenizer phases find them), and
    a config with `faults` ({phase: spec}) as each phase's debug_fault."""
    home = tmp_path / "home"
    shutil.copytree(data_dir(base_dir), data_dir(home))
    shutil.copytree(tokenizer_dir(base_dir), tokenizer_dir(home))
    fault = {p: f'debug_fault = "{faults[p]}"' if p in faults else "" for p in ("base", "sft", "rl")}
    config = tmp_path / "speedrun.toml"
    config.write_text(TOML.format(vocab=tokenizer.vocab_size, sft_steps=sft_steps, **fault))
    return home_env(home), config


def home_env(home: Path) -> dict:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def speedrun(env: dict, config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*NANOCHAT_RUN, "speedrun", "--depth", "1", "--builtin", "--config", str(config), "--backoff", "0",
           "--progress-every", "600", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def status(env: dict) -> dict:
    proc = subprocess.run([*NANOCHAT_RUN, "status", "--speedrun", "--depth", "1", "--json"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def final_model(env: dict, phase: str) -> dict:
    d = Path(env["NANOCHAT_BASE_DIR"]) / PHASE_DIRS[phase] / "d1"
    final = checkpoint.find_latest_valid(d, pytest.fail)
    assert final.final, (phase, final.step)
    return checkpoint.load_model(d, final)


@pytest.fixture(scope="session")
def clean(tmp_path_factory, base_dir, tokenizer) -> tuple[dict, Path]:
    """The whole pipeline, no faults."""
    where = tmp_path_factory.getbasetemp() / "speedrun_clean"

    def run(d: Path) -> subprocess.CompletedProcess:
        env, config = setup(d.parent, base_dir, tokenizer)
        return speedrun(env, config)

    built_once(tmp_path_factory, "speedrun_clean", run)
    return home_env(where / "home"), where / "speedrun.toml"


def test_crashes_in_base_sft_and_rl_end_bit_identical_to_a_clean_pipeline(tmp_path, base_dir, tokenizer, clean):
    env, config = setup(tmp_path, base_dir, tokenizer, base="sigkill@step:12", sft="raise@step:6",
                        rl="sigkill@step:4")  # fmt: skip
    proc = speedrun(env, config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase in ("base", "mid", "sft", "rl"):
        assert_identical(final_model(env, phase), final_model(clean[0], phase), phase)
    info = {p["phase"]: p for p in status(env)["phases"]}
    assert [p for p in info] == ["data", "tokenizer", "base", "mid", "sft", "rl", "eval"]
    assert all(p["state"] == "done" for p in info.values()), info
    for phase, kind, lost in (("base", "signal", 2), ("sft", "crash", 2), ("rl", "signal", 1)):
        attempts = info[phase]["attempts"]
        assert [a["class"] for a in attempts] == [kind, "completed"], (phase, attempts)
        assert info[phase]["steps_lost"] == lost
        led = info[phase]["goodput"]  # per phase: a crash costs lost steps and detection, all adds up
        assert led["parts"]["lost steps"] > 0 and led["parts"]["detection"] > 0 and 0 < led["ratio"] < 1, led
        assert sum(led["parts"].values()) == pytest.approx(led["wall_s"], abs=0.01)
    assert [a["class"] for a in info["mid"]["attempts"]] == ["completed"]
    assert (info["rl"]["step"], info["rl"]["budget"]) == (6, 6)
    report = (Path(status(env)["run_dir"]) / "report.md").read_text()
    assert "| base | done | 20/20 |" in report and "| signal |" in report and "## rl" in report
    assert "| choice | categorical |" in report  # chat_eval's table of the final models
    assert "## Where the time went" in report and "| lost steps | " in report


def test_a_rerun_of_a_finished_speedrun_skips_every_phase_at_once(clean):
    env, config = clean
    t0 = time.monotonic()
    proc = speedrun(env, config)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("base: done at step 20, skipped", "mid: done at step 8, skipped", "sft: done at step 8, skipped",
                 "rl: done at step 6, skipped", "eval: rl step 6 already evaluated"):  # fmt: skip
        assert line in proc.stdout, proc.stdout
    assert "attempt" not in proc.stdout and took < 30  # (scripts/bench_rl.py measures it: ~2 s)


def test_a_changed_setting_is_refused_naming_the_phase_unless_redo(tmp_path, clean):
    env, config = clean
    home = Path(env["NANOCHAT_BASE_DIR"])
    before = {p: sorted(x.name for x in (home / d / "d1").iterdir()) for p, d in PHASE_DIRS.items()}
    changed = tmp_path / "changed.toml"
    changed.write_text(config.read_text().replace("num_iterations = 6", "num_iterations = 7"))
    proc = speedrun(env, changed)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert error.startswith("nanochat-run: error: rl: finished at step 6 with --num_iterations=6, this run asks")
    assert "--redo rl" in error
    assert {p: sorted(x.name for x in (home / d / "d1").iterdir()) for p, d in PHASE_DIRS.items()} == before
    proc = speedrun(env, changed, "--redo", "rl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sft: done at step 8, skipped" in proc.stdout and "rl: --redo: starting afresh" in proc.stdout
    assert checkpoint.find_latest_valid(home / "chatrl_checkpoints" / "d1", pytest.fail).step == 7
    proc = speedrun(env, changed, "--depth", "2", "--model-tag", "d1")  # (another depth alone is another tag)
    assert proc.returncode == 2 and "base: finished at step 20 with --depth=1, this run asks for 2" in proc.stderr
    tokenizer_file = tokenizer_dir(home) / "tokenizer.json"
    original = tokenizer_file.read_text()
    tokenizer_file.write_text(json.dumps(json.loads(original), indent=1))  # the same vocabulary, another file
    try:
        proc = speedrun(env, config)
    finally:
        tokenizer_file.write_text(original)
    assert proc.returncode == 2 and "base: finished at step 20 but with another tokenizer" in proc.stderr


def test_ctrl_c_in_sft_then_a_rerun_skips_base_and_mid_and_resumes_sft(tmp_path, base_dir, tokenizer):
    env, config = setup(tmp_path, base_dir, tokenizer, sft_steps=400)
    cmd = [*NANOCHAT_RUN, "speedrun", "--depth", "1", "--builtin", "--config", str(config), "--backoff", "0",
           "--no-rl"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    heartbeat = Path(env["NANOCHAT_BASE_DIR"]) / "speedrun" / "d1" / "heartbeat.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # SFT's heartbeat past step 10
            try:
                beat = json.loads(heartbeat.read_text())
            except (OSError, ValueError):
                beat = {}
            if beat.get("num_iterations") == 400 and (beat.get("step") or 0) >= 10:
                break
            time.sleep(0.1)
        else:
            pytest.fail("SFT never reached step 10")
        proc.send_signal(signal.SIGINT)  # the supervisor forwards it: the trainer saves at its current step
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 130, out
    sft_dir = Path(env["NANOCHAT_BASE_DIR"]) / "chatsft_checkpoints" / "d1"
    (saved,) = [c for c in checkpoint.scan(sft_dir) if c.meta and c.meta["stop_reason"] == "signal:SIGINT"]
    info = {p["phase"]: p for p in status(env)["phases"]}
    assert info["sft"]["state"] == "stopped (Ctrl+C)" and info["sft"]["step"] == saved.step
    assert info["eval"]["state"] == "pending" and "rl" not in info
    proc = speedrun(env, config, "--no-rl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "base: done at step 20, skipped" in proc.stdout and "mid: done at step 8, skipped" in proc.stdout
    assert f"sft: resuming from step {saved.step}" in proc.stdout
    assert f"resuming from step {saved.step}" in proc.stdout and "eval: $ python -m scripts.chat_eval" in proc.stdout
    info = {p["phase"]: p for p in status(env)["phases"]}
    assert info["sft"]["state"] == "done" and info["sft"]["step"] == 400 and info["eval"]["state"] == "done"


def test_with_a_remote_dir_a_wiped_machine_restores_every_finished_phase_instead_of_retraining(
    tmp_path, base_dir, tokenizer
):
    env, config = setup(tmp_path, base_dir, tokenizer)
    remote, home = tmp_path / "bucket", Path(env["NANOCHAT_BASE_DIR"])
    proc = speedrun(env, config, "--no-rl", "--remote-dir", f"file://{remote}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = {phase: final_model(env, phase) for phase in ("base", "mid", "sft")}
    for phase in ("base", "mid", "sft"):  # each phase's checkpoints, the final one committed there
        final = json.loads((remote / PHASE_DIRS[phase] / "d1" / "latest_step.txt").read_text())
        assert json.loads((remote / PHASE_DIRS[phase] / "d1" / f"meta_{final:06d}.json").read_text())["final"]
    copied = remote / "speedrun" / "d1"  # the run's story: events, logs, the report
    assert (copied / "report.md").read_text() == (home / "speedrun" / "d1" / "report.md").read_text()
    assert "phase_end" in (copied / "events.jsonl").read_text() and list(copied.glob("attempt-*/torchrun.log"))
    for folder in PHASE_DIRS.values():  # the checkpoint disk is wiped
        shutil.rmtree(home / folder, ignore_errors=True)
    proc = speedrun(env, config, "--no-rl", "--remote-dir", f"file://{remote}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase, step in (("base", 20), ("mid", 8), ("sft", 8)):
        assert f"speedrun: {phase}: the remote file://{remote}/{PHASE_DIRS[phase]}/d1 has step {step}" in proc.stdout
        assert f"{phase}: done at step {step}, skipped" in proc.stdout, proc.stdout
        assert_identical(final_model(env, phase), before[phase], phase)
    assert "attempt" not in proc.stdout  # nothing was trained again


def test_bad_speedrun_input_is_one_line(tmp_path, clean):
    env, config = clean
    bad = tmp_path / "bad.toml"
    cases = [
        ("[bse]\n", "[bse] is not a phase"),
        ("[sft]\nnum_iteration = 3\n", "[sft] trainer setting: unknown setting --num_iteration"),
        ("[data]\nshard = 3\n", "[data] has no setting 'shard'"),
        ("[base\n", "is not valid TOML"),
    ]
    for text, message in cases:
        bad.write_text(text)
        proc = speedrun(env, bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = speedrun(env, config, "--redo", "everything")
    assert proc.returncode == 2 and "--redo must name a phase of this run" in proc.stderr
