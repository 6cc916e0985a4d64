"""Midtraining and SFT end to end on a tiny CPU model, with real processes: they start from the previous phase's
final checkpoint, resume bit-exactly after a SIGKILL (1 and 2 ranks), save on SIGINT, refuse bad input in one
line without touching anything, and SFT lowers the loss on held-out conversations."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.chat_data import IGNORE, PaddedLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import TaskMixture, get_task
from nanochat.tokenizer import Tokenizer
from tests.runs import (
    CHAT,
    PHASES,
    REPO_ROOT,
    T,
    Trainer,
    assert_same_final_state,
    one_line_error,
    snapshot,
)
from tests.runs import (
    run_phase as run,
)

pytestmark = pytest.mark.slow


def source_of(phase: str, base: Path, mid: Path) -> Path:
    return base if phase == "mid" else mid


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("phase", ["mid", "sft"])
def test_a_sigkill_then_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, menv, base, mid, phase, nproc):
    source = source_of(phase, base, mid)
    reference = tmp_path / "reference"
    proc = run(menv, phase, reference, source, nproc=nproc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = checkpoint.find_latest_valid(reference, pytest.fail)
    assert final.step == 12 and final.final and final.meta["phase"] in ("mid_train", "chat_sft")
    src = final.meta["source"]  # the parent: phase, directory, step and the model file's checksum
    parent = ("base_train", 40) if phase == "mid" else ("mid_train", 12)
    assert (src["dir"], src["phase"], src["step"]) == (str(source), *parent) and src["model_xxh3_64"]
    d = tmp_path / "crashed"
    at = random.randint(5, 11)  # any step: killed right after it, before its own save
    crashed = run(menv, phase, d, source, f"--debug_fault=sigkill@step:{at}", nproc=nproc)
    assert crashed.returncode != 0 and f"debug_fault: sigkill at step {at}" in crashed.stdout
    saved = [s for s in (4, 8) if s < at]
    assert [c.step for c in checkpoint.scan(d)] == saved, at
    resumed = run(menv, phase, d, source, nproc=nproc)
    assert resumed.returncode == 0 and f"resumed from step {saved[-1]}" in resumed.stdout, resumed.stderr
    assert "starting from" not in resumed.stdout  # a resumed phase loads only its own checkpoint
    assert_same_final_state(d, reference)


@pytest.mark.parametrize("phase", ["mid", "sft"])
def test_sigint_saves_at_the_current_step(tmp_path, menv, base, mid, phase):
    d = tmp_path / "ckpt"
    source = source_of(phase, base, mid)
    t = Trainer(menv, d, *CHAT, f"--source_dir={source}", "--num_iterations=100000", "--save_every=0",
                module=PHASES[phase].script, tiny=[])  # fmt: skip
    t.wait_for(r"^step 00003/")
    t.proc.send_signal(signal.SIGINT)
    assert t.finish() == 128 + signal.SIGINT
    (saved,) = checkpoint.scan(d, verify=True)
    assert saved.valid and saved.step >= 3 and saved.meta["stop_reason"] == "signal:SIGINT"


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, menv, base):
    before = snapshot(base)
    damaged = Path(shutil.copytree(base, tmp_path / "damaged"))
    model_file = next(damaged.glob("model_*.pt"))
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    kept = snapshot(damaged)
    error = one_line_error(run(menv, "mid", tmp_path / "a", damaged), name="mid_train")
    assert "has no valid final checkpoint to start from" in error
    assert snapshot(damaged) == kept and not list((tmp_path / "a").glob("*.pt"))
    error = one_line_error(run(menv, "mid", tmp_path / "b", base, "--tasks=identity:0"), name="mid_train")
    assert "empty task mixture" in error
    error = one_line_error(run(menv, "mid", tmp_path / "c", base, "--tasks=arithmtic"), name="mid_train")
    assert "did you mean 'arithmetic'" in error
    error = one_line_error(run(menv, "sft", tmp_path / "d", tmp_path / "no-mid"), name="chat_sft")
    assert f"no mid model at {tmp_path / 'no-mid'} to start sft from" in error and not (tmp_path / "d").exists()
    error = one_line_error(run(menv, "mid", tmp_path / "e", base, "--source_step=39"), name="mid_train")
    assert "has no valid checkpoint at step 39 to start from" in error
    other = Path(shutil.copytree(base, tmp_path / "other"))
    error = one_line_error(run(menv, "mid", other, base), name="mid_train")  # a base model's dir given as mid's
    assert f"{other} holds base_train checkpoints, not mid_train's" in error and snapshot(other) == snapshot(base)
    assert snapshot(base) == before


def test_a_tokenizer_without_the_chat_tokens_is_one_line(tmp_path, menv, base, base_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    old = tmp_path / "old_base"
    shutil.copytree(base_dir, old)
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<|bos|>"])
    hf.save(str(old / "tokenizer" / "tokenizer.json"))
    error = one_line_error(run({**menv, "NANOCHAT_BASE_DIR": str(old)}, "mid", tmp_path / "m", base), name="mid_train")
    assert "no <|user_start|> token" in error and "retrain it with `python -m scripts.tok_train`" in error


def test_a_conversation_without_an_assistant_turn_is_a_one_line_error(tokenizer: Tokenizer):
    from nanochat.config import ConfigError
    from nanochat.tasks import Task

    class Broken(Task):
        name = "broken"

        def num_examples(self) -> int:
            return 3

        def example(self, index: int) -> dict:
            return {"messages": [{"role": "user", "content": "hello?"}]}

    loader = PaddedLoader(tokenizer, TaskMixture([Broken()]), 2, 32, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"task broken \(train\) example \d: .*assistant") as e:
        loader.next_batch()
    assert "\n" not in str(e.value)


def held_out_loss(d: Path, tokenizer: Tokenizer) -> float:
    """Mean loss on the assistant's tokens of held-out built-in conversations (the test split)."""
    ckpt = checkpoint.find_latest_valid(d, pytest.fail)
    model = GPT(GPTConfig(**ckpt.meta["model_config"]))
    model.load_state_dict(checkpoint.load_model(d, ckpt))
    tasks = [get_task(name, "test", size=40) for name in ("arithmetic", "spelling", "choice", "identity")]
    loader = PaddedLoader(tokenizer, TaskMixture(tasks, seed=1), 8, T, torch.device("cpu"))
    total = count = 0.0
    with torch.no_grad():
        for _ in range(10):
            x, y = loader.next_batch()
            losses = model(x, y, reduction="none")
            total += float(losses[y != IGNORE].sum())
            count += int((y != IGNORE).sum())
    return total / count


@pytest.fixture(scope="session")
def sft(tmp_path_factory, menv, mid) -> Path:
    d = tmp_path_factory.mktemp("chat_sft") / "ckpt"
    proc = run(menv, "sft", d, mid, "--num_iterations=60", "--save_every=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "padding:" in proc.stdout
    return d


def test_sft_lowers_the_loss_on_held_out_conversations(base, sft, tokenizer):
    base_loss, sft_loss = held_out_loss(base, tokenizer), held_out_loss(sft, tokenizer)
    assert sft_loss < base_loss - 0.1, (base_loss, sft_loss)


def chat(env: dict, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], input=stdin, env=env, text=True,
                          capture_output=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip


def test_chat_cli_answers_once_chats_and_leaves_cleanly(menv, sft):
    once = chat(menv, f"--checkpoint_dir={sft}", "-p", "What is 2+2?", "--temperature=0", "--max_tokens=20")
    assert once.returncode == 0 and once.stdout.strip() and not once.stderr, once.stderr
    again = chat(menv, f"--checkpoint_dir={sft}", "-p", "What is 2+2?", "--temperature=0", "--max_tokens=20")
    assert again.stdout == once.stdout  # greedy: the same answer
    talk = chat(menv, f"--checkpoint_dir={sft}", "--max_tokens=10", stdin="hello\n/clear\nspell cat\n/quit\nnever\n")
    assert talk.returncode == 0 and "(a new conversation)" in talk.stdout and "Traceback" not in talk.stderr
    assert talk.stdout.count("> ") == 4  # the prompt after hello, /clear, spell cat, then /quit ends it
    eof = chat(menv, f"--checkpoint_dir={sft}", stdin="hello\n")  # end of input: leave quietly
    assert eof.returncode == 0 and "Traceback" not in eof.stderr
    missing = chat(menv, f"--checkpoint_dir={sft.parent / 'nope'}", "-p", "hi")
    assert (
        missing.returncode == 2 and missing.stderr.startswith("chat_cli: error: ") and missing.stderr.count("\n") == 1
    )


def test_chat_cli_ctrl_c_at_the_prompt_leaves_without_a_traceback(menv, sft):
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", f"--checkpoint_dir={sft}"], env=menv,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT)  # fmt: skip
    deadline = time.monotonic() + 60
    while "chatting with" not in (line := proc.stdout.readline()) and time.monotonic() < deadline:
        assert line, proc.stderr.read()
    time.sleep(0.5)  # waiting in input()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_chat_eval_prints_a_table_and_records_it_beside_the_checkpoint(menv, sft):
    args = [f"--checkpoint_dir={sft}", "--max_problems=5", "--max_tokens=24"]
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", *args], env=menv, text=True,
                          capture_output=True, timeout=300, cwd=REPO_ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for task in ("arithmetic", "spelling", "choice"):
        assert re.search(rf"^{task}\s+(generative|categorical)\s+\d+\s+5\s+\d+\.\d%$", proc.stdout, re.M), proc.stdout
    record = json.loads((sft / "chat_eval_000060.json").read_text())
    assert record["step"] == 60 and record["tasks"]["choice"]["kind"] == "categorical"
    assert [c.step for c in checkpoint.scan(sft)] == [60]  # a record is not a checkpoint
    bad = subprocess.run([sys.executable, "-m", "scripts.chat_eval", f"--checkpoint_dir={sft}", "--tasks=identity"],
                         env=menv, text=True, capture_output=True, timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert bad.returncode == 2 and "has no automatic check" in bad.stderr and bad.stderr.count("\n") == 1


def test_nanochat_run_supervises_a_chat_phase_through_a_crash(tmp_path, menv, mid):
    """`nanochat-run train --phase sft`: the same supervision as base training (classify, restart, resume)."""
    from tests.supervised import NANOCHAT_RUN, Run, kill_leftovers

    d = tmp_path / "sft"
    cmd = [*NANOCHAT_RUN, "train", "--phase", "sft", "--checkpoint-dir", str(d), "--num-iterations", "12",
           "--save-every", "4", "--backoff", "0", "--", *CHAT[:2], "--eval_tokens=256", "--task_size=200",
           f"--source_dir={mid}", "--debug_fault=raise@step:6"]  # fmt: skip
    run = Run(cmd, d, menv)
    try:
        out = run.finish(0, timeout=180)
    finally:
        kill_leftovers(str(d))
    assert run.classes() == ["crash", "completed"], out[-3000:]
    assert "-m scripts.chat_sft" in " ".join(run.events("attempt_start")[0]["cmd"])
    assert [s["start_step"] for s in run.events("attempt_start")] == [None, 4]
    final = checkpoint.find_latest_valid(d, pytest.fail)
    assert final.step == 12 and final.final and final.meta["source"]["dir"] == str(mid)


def test_cli_phase_picks_the_script_and_the_checkpoint_folder(tmp_path, menv, base):
    """--phase mid: scripts.mid_train into mid_checkpoints/<the one base model's tag>; status and prune find it."""
    import subprocess

    from tests.supervised import NANOCHAT_RUN

    home = tmp_path / "home"
    shutil.copytree(base, home / "base_checkpoints" / "d1")
    env = {**menv, "NANOCHAT_BASE_DIR": str(home)}
    out = subprocess.run([*NANOCHAT_RUN, "train", "--phase", "mid", "--dry-run", "--", *CHAT], env=env, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "-m scripts.mid_train" in out.stdout and f"--checkpoint_dir={home}/mid_checkpoints/d1" in out.stdout
    assert "  source_dir = ''" in out.stdout
    for args in (["status", "--phase", "sft"], ["prune", "--phase", "mid", "--dry-run"]):
        err = subprocess.run([*NANOCHAT_RUN, *args], env=env, text=True, capture_output=True, timeout=60).stderr
        assert err.startswith("nanochat-run: error: no ") and err.count("\n") == 1, err
    err = subprocess.run([*NANOCHAT_RUN, "train", "--phase", "ppo"], env=env, text=True, capture_output=True).stderr
    assert "--phase must be one of base, mid, sft, rl, got 'ppo'" in err
    out = subprocess.run([*NANOCHAT_RUN, "train", "--script", "scripts.mid_train", "--dry-run"], env=env, text=True,
                         capture_output=True, timeout=120).stdout  # fmt: skip
    assert f"--checkpoint_dir={home}/mid_checkpoints/d1" in out  # the script names the phase
    both = ["train", "--phase", "sft", "--script", "scripts.mid_train", "--dry-run"]
    err = subprocess.run([*NANOCHAT_RUN, *both], env=env, text=True, capture_output=True, timeout=120).stderr
    assert "is the mid phase's, not --phase sft's" in err


def test_a_resumed_phase_says_when_its_source_has_changed(tmp_path, menv, base):
    source = Path(shutil.copytree(base, tmp_path / "source"))
    d = tmp_path / "mid"
    crashed = run(menv, "mid", d, source, "--debug_fault=sigkill@step:5")
    assert crashed.returncode == -signal.SIGKILL and [c.step for c in checkpoint.scan(d)] == [4]
    other = one_line_error(run(menv, "mid", d, source, "--tasks=arithmetic"), name="mid_train")
    assert "was saved with other data settings" in other and "--resume=False" in other
    shutil.rmtree(source)  # the base model it started from is gone: the phase goes on from its own checkpoint
    resumed = run(menv, "mid", d, source)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"this phase started from {source} step 40, which is gone or unreadable since" in resumed.stderr


def test_a_padded_loader_gives_up_on_conversations_cut_before_the_assistant(tokenizer: Tokenizer):
    from nanochat.config import ConfigError
    from nanochat.tasks import Task

    class LongPrompts(Task):
        name = "long"

        def num_examples(self) -> int:
            return 5

        def example(self, index: int) -> dict:
            return {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "ok"}]}

    loader = PaddedLoader(tokenizer, TaskMixture([LongPrompts()]), 2, 32, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"end before the assistant speaks at --max_seq_len=32: raise it"):
        loader.next_batch()
