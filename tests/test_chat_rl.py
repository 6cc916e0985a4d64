"""RL end to end on the tiny CPU model, with real processes: it starts from the final SFT checkpoint, learns from
rewards (the weights move), resumes bit-exactly after a SIGKILL at a random step (1 and 2 ranks), and refuses bad
settings in one line; plus the pieces (advantages, the loss, the seeds) in-process."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint
from nanochat.chat_data import IGNORE
from nanochat.rl import pg_loss, sample_seed
from tests.runs import assert_same_final_state, built_once, one_line_error, run_phase

# 8 steps of 2 prompts x 4 samples; multiple-choice and spelling problems: a tiny model gets some right by chance,
# so the groups' rewards differ and the weights move
RL = ["--num_iterations=8", "--prompts_per_step=2", "--num_samples=4", "--device_batch_size=2", "--max_new_tokens=8",
      "--tasks=choice,spelling", "--task_size=200", "--save_every=3", "--keep_last_n_checkpoints=-1",
      "--eval_every=4", "--eval_problems=4", "--pass_k=2", "--async_save=False"]  # fmt: skip


def rl(env: dict, d: Path, sft: Path, *args: str, nproc: int = 1):
    return run_phase(env, "rl", d, sft, *args, nproc=nproc, tiny=RL)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, menv, sft) -> tuple[Path, str]:
    d = built_once(tmp_path_factory, "rl_reference", lambda d: rl(menv, d, sft))
    return d, (d.parent / ".built").read_text()


@pytest.mark.slow
def test_rl_starts_from_sft_learns_from_rewards_and_reports_pass_at_k(reference, sft):
    d, out = reference
    final = checkpoint.find_latest_valid(d, pytest.fail)
    assert final.step == 8 and final.final and final.meta["phase"] == "chat_rl"
    source = final.meta["source"]
    assert (source["phase"], source["step"], source["dir"]) == ("chat_sft", 12, str(sft))
    rewards = [float(r) for r in re.findall(r"\| reward ([0-9.]+)", out)]
    assert len(rewards) == 8 and 0 < max(rewards) <= 1, out
    assert re.search(r"step 00004 \| pass@1 [0-9.]+ \| pass@2 [0-9.]+ on 4 problems", out)
    assert final.meta["val_pass@2"] is not None and final.meta["val_pass@2_step"] == 8
    before = checkpoint.load_model(sft, checkpoint.find_latest_valid(sft, pytest.fail))
    after = checkpoint.load_model(d, final)
    assert any(not torch.equal(before[k], after[k]) for k in before), "rewards differed, yet no weight moved"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_sigkill_then_resume_ends_bit_identical(tmp_path, menv, sft, reference, nproc):
    want = reference[0]
    if nproc == 2:  # the 2-rank reference: same prompts per step, half on each rank
        want = tmp_path / "reference"
        proc = rl(menv, want, sft, nproc=2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    d = tmp_path / "crashed"
    at = random.randint(4, 7)  # any step after the first save: killed right after it, before its own save
    crashed = rl(menv, d, sft, f"--debug_fault=sigkill@step:{at}", nproc=nproc)
    assert crashed.returncode != 0 and f"debug_fault: sigkill at step {at}" in crashed.stdout
    saved = [s for s in (3, 6) if s < at]
    assert [c.step for c in checkpoint.scan(d)] == saved, at
    resumed = rl(menv, d, sft, nproc=nproc)
    assert resumed.returncode == 0 and f"resumed from step {saved[-1]}" in resumed.stdout, resumed.stderr
    assert_same_final_state(d, want, step=8)


@pytest.mark.slow
def test_bad_rl_settings_are_one_line(tmp_path, menv, sft):
    cases = [
        ("--num_samples=3", "must divide --num_samples=3"),
        ("--temperature=0", "--temperature must be > 0"),
        ("--tasks=identity", "the identity task has no automatic check"),
        ("--eval_tokens=4096", "--eval_tokens does not apply to RL"),  # inherited settings RL cannot use
        ("--total_batch_size=4096", "--total_batch_size=4096 does not apply here"),
    ]
    for arg, message in cases:
        assert message in one_line_error(rl(menv, tmp_path / "x", sft, arg), name="chat_rl")
    proc = rl(menv, tmp_path / "y", sft, "--prompts_per_step=3", nproc=2)
    assert proc.returncode != 0 and "must be multiples of the world size 2" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("*/*.pt"))


def test_advantages_and_the_loss_follow_the_rewards():
    """A row whose sampled tokens have advantage a contributes a * their mean NLL; forced and padded ones nothing."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)

    def model(x, y, reduction="none"):
        return torch.nn.functional.cross_entropy(logits.view(-1, 5), y.view(-1), ignore_index=IGNORE,
                                                 reduction=reduction).view(y.shape)  # fmt: skip

    y = torch.tensor([[1, IGNORE, 2], [3, 4, IGNORE]])
    adv = torch.tensor([0.5, -0.5])
    loss = pg_loss(model, (None, y, adv))
    nll = model(None, y)
    assert torch.allclose(loss, (0.5 * (nll[0, 0] + nll[0, 2]) - 0.5 * (nll[1, 0] + nll[1, 1])) / 4)
    loss.backward()  # descending it makes row 0's tokens likelier and row 1's less likely
    assert logits.grad[0, 0, 1] < 0 and logits.grad[1, 0, 3] > 0 and torch.all(logits.grad[0, 1] == 0)


def test_sample_seeds_are_distinct_valid_torch_seeds_keyed_by_seed_kind_and_draw():
    seeds = {sample_seed(0, "train", n) for n in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, "train", 5) != sample_seed(0, "eval", 5) != sample_seed(1, "train", 5)
