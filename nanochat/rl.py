"""Reinforcement learning on answers a task can check (nanochat's simplified GRPO): rollouts, rewards, advantages,
the policy-gradient loss, and pass@k on held-out problems.

Every optimizer step, each rank takes its share of the step's prompts from the task mixture, samples a group of
num_samples completions of each with the engine (KV cache, calculator tool), rewards each completion 1 or 0 by the
task's own check, and trains on the group with advantage = reward - the group's mean reward: completions that beat
their siblings become more likely, worse ones less likely, and a group that is all right or all wrong teaches
nothing. Every step samples from the current weights, so the update is on-policy: no reference model, no KL term,
no ratio clipping (they guard stale samples, which this loop never has).

Exact resume: a prompt's samples come from a generator seeded by (seed, the prompt's global draw number), and a
step consumes whole groups, so the loader's position (the mixture's counters) and the weights decide everything a
step does; the checkpoint holds both.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.distributed as dist

from nanochat.chat_data import IGNORE, furthest
from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.engine import Engine
from nanochat.tasks import TaskMixture

MAX_SKIPS = 1000  # prompts in a row too long for the context before the loader gives up
ROW_MULTIPLE = 64  # rows are padded to a multiple of this: few distinct shapes for torch.compile


def sample_seed(seed: int, kind: str, draw: int) -> int:
    """The sampling seed of one prompt: a hash of (run seed, train/eval, its global draw number), so every rank
    and every restart samples the same prompt the same way, whatever the world size."""
    digest = hashlib.blake2b(f"rl/{seed}/{kind}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # torch seeds are signed 64-bit


def draw_number(mixture: TaskMixture) -> int:
    """The global draw number of this rank's last draw (the mixture advances all ranks by a round of world_size)."""
    return mixture.state_dict()["step"] - mixture.world_size + mixture.rank


def rollout(
    engine: Engine, prompt: list[int], num_samples: int, max_tokens: int, temperature: float, top_k: int, seed: int
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """num_samples completions of the prompt: (tokens including the final <|assistant_end|> if one came, the mask of
    what the model sampled (1) vs what the calculator forced (0), the decoded answer without the stop token)."""
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    masks: list[list[int]] = [[] for _ in range(num_samples)]
    for step in engine.generate(prompt, num_samples, max_tokens, temperature, top_k or None, seed):
        for i, (token, forced, done) in enumerate(zip(*step)):
            if not done:  # the stop token is kept: ending the answer is part of what gets rewarded
                tokens[i].append(token)
                masks[i].append(0 if forced else 1)
    texts = [engine.tokenizer.decode([t for t in row if t not in engine.stop]) for row in tokens]
    return tokens, masks, texts


def pg_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The policy-gradient loss of a micro-batch: -sum(advantage * log p(sampled token)) over the sampled tokens,
    divided by their count (the tool's forced tokens and the padding have target IGNORE and count nothing)."""
    x, y, advantages = batch
    nll = model(x, y, reduction="none")  # (B, T): -log p of each target, 0 where the target is IGNORE
    return (nll * advantages[:, None]).sum() / (y != IGNORE).sum().clamp(min=1)


class Rollouts:
    """The RL phase's loader: next_batch() returns (inputs, targets, advantages) micro-batches of `rows` sequences,
    sampling a new group whenever the previous one is used up. A step consumes whole groups (the script sees to
    it), so between steps nothing is buffered and the mixture's position is the whole state."""

    def __init__(self, engine: Engine, mixture: TaskMixture, rows: int, context: int, num_samples: int,
                 max_tokens: int, temperature: float, top_k: int, seed: int, autocast=None) -> None:  # fmt: skip
        self.engine, self.tokenizer, self.mixture = engine, engine.tokenizer, mixture
        self.rows, self.context, self.num_samples, self.max_tokens = rows, context, num_samples, max_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.autocast = autocast or contextlib.nullcontext
        self.device = engine.model.wte.weight.device
        self.pad = self.tokenizer.special_id("<|assistant_end|>")  # any id: padded positions are never targets
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.rewards = self.samples = self.sampled_tokens = 0.0  # since the last stats() call, this rank

    def _prompt(self) -> tuple[int, dict, list[int]]:
        for _ in range(MAX_SKIPS):
            task, index = self.mixture.advance()
            conversation = self.mixture.tasks[task][index]
            prompt = self.tokenizer.render_for_completion(conversation)
            if len(prompt) < self.context:  # room for at least one answer token
                return task, conversation, prompt
        raise ConfigError(
            f"{MAX_SKIPS} prompts in a row fill the whole context ({self.context} tokens): raise --max_seq_len or use"
            " tasks with shorter prompts"
        )

    def _sample_group(self) -> None:
        task, conversation, prompt = self._prompt()
        seed = sample_seed(self.seed, "train", draw_number(self.mixture))
        max_tokens = min(self.max_tokens, self.context - len(prompt))
        with self.autocast():
            tokens, masks, texts = rollout(self.engine, prompt, self.num_samples, max_tokens, self.temperature,
                                           self.top_k, seed)  # fmt: skip
        rewards = torch.tensor([float(self.mixture.tasks[task].evaluate(conversation, t)) for t in texts])
        advantages = rewards - rewards.mean()
        self.rewards += float(rewards.sum())
        self.samples += len(texts)
        self.sampled_tokens += sum(sum(m) for m in masks)
        for start in range(0, self.num_samples, self.rows):
            group = range(start, start + self.rows)
            longest = max(len(prompt) + len(tokens[i]) - 1 for i in group)
            T = min(self.context, math.ceil(longest / ROW_MULTIPLE) * ROW_MULTIPLE)
            x = torch.full((self.rows, T), self.pad, dtype=torch.long)
            y = torch.full((self.rows, T), IGNORE, dtype=torch.long)
            for row, i in enumerate(group):
                ids = prompt + tokens[i]
                trained = [0] * len(prompt) + masks[i]
                n = len(ids) - 1
                x[row, :n] = torch.tensor(ids[:-1])
                y[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], trained[1:])])
            adv = advantages[start : start + self.rows]
            self.queue.append((x.to(self.device), y.to(self.device), adv.to(self.device)))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.queue:
            self._sample_group()
        return self.queue.pop(0)

    def stats(self) -> dict:
        """Mean reward and sampled tokens per completion since the last call, over all ranks (a collective: every
        rank calls it at the same points)."""
        totals = torch.tensor([self.rewards, self.samples, self.sampled_tokens], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        self.rewards = self.samples = self.sampled_tokens = 0.0
        rewards, samples, tokens = totals.tolist()
        return {"reward": rewards / max(samples, 1), "answer_tokens": tokens / max(samples, 1)}

    def state_dict(self) -> dict:
        assert not self.queue, "a checkpoint between the micro-batches of a group would lose its samples"
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])

    def load_resharded(self, states: list[dict]) -> None:
        """Another world size: go on from the furthest rank's position (prompts are global draws, so none repeats)."""
        self.mixture.load_state_dict(furthest(states))


def pass_at_k(engine: Engine, mixture: TaskMixture, problems: int, k: int, max_tokens: int, temperature: float,
              top_k: int, seed: int, autocast=None):  # fmt: skip
    """The phase's evaluation: of `problems` held-out problems on this rank, the share solved by at least one of k
    samples (pass@k, over all ranks). Every evaluation samples the same problems with the same seeds, so the
    numbers compare across steps and restarts."""
    start = mixture.state_dict()
    autocast = autocast or contextlib.nullcontext
    context = engine.model.config.sequence_len

    def evaluate(step: int, between) -> float | None:
        mixture.load_state_dict(start)
        solved = correct = 0
        for done in range(1, problems + 1):
            task, index = mixture.advance()
            conversation = mixture.tasks[task][index]
            prompt = engine.tokenizer.render_for_completion(conversation)
            if len(prompt) < context:  # a prompt that fills the context is a problem not solved
                draw = sample_seed(seed, "eval", draw_number(mixture))
                with autocast():
                    _, _, texts = rollout(engine, prompt, k, min(max_tokens, context - len(prompt)), temperature,
                                          top_k, draw)  # fmt: skip
                right = [mixture.tasks[task].evaluate(conversation, t) for t in texts]
                solved += any(right)
                correct += sum(right)
            stop, _ = between(done, done == problems)
            if stop:
                return None
        totals = torch.tensor([solved, correct, problems], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        solved, correct, n = totals.tolist()
        print0(f"step {step:05d} | pass@1 {correct / (n * k):.4f} | pass@{k} {solved / n:.4f} on {n:.0f} problems")
        return solved / n

    return evaluate
