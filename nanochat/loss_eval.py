"""Validation in bits per byte: a loss that does not depend on the tokenizer's vocabulary."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT


@torch.no_grad()
def evaluate_bpb(
    model: GPT,
    loader: DataLoader,
    steps: int,
    token_bytes: torch.Tensor,
    between: Callable[[int, bool], tuple[bool, bool]] | None = None,
) -> float | None:
    """Sum of per-token losses (nats) over the sum of the UTF-8 bytes those tokens stand for, in bits.

    Special tokens (0 bytes) and ignored targets (-1) are left out of both sums. Summed across ranks, so every
    rank gets the same number.
    `between(batches_done, exhausted)` runs after every batch on every rank: it reports progress and returns what
    the ranks agreed on (one small collective), (stop, ended). Stop: a stop signal arrived, and the evaluation is
    abandoned (the result is None). Ended: some rank's share of the validation split ran out, and every rank ends
    at that same batch, so that no rank waits for a batch another will never run.
    """
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for done in range(steps):
        try:
            x, y = loader.next_batch()
            exhausted = False
        except StopIteration:  # the validation split is smaller than eval_tokens: use what there is
            exhausted = True
        if not exhausted:
            loss = model(x, y, reduction="none").double()
            b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # an ignored target (-1) counts no bytes
            nats += (loss * (b > 0)).sum()
            nbytes += b.sum()
        stop, ended = between(done + 1, exhausted) if between is not None else (False, exhausted)
        if stop:
            return None
        if ended:
            break
    if dist.is_initialized():
        totals = torch.stack([nats, nbytes])
        dist.all_reduce(totals)
        nats, nbytes = totals[0], totals[1]
    if nbytes.item() == 0:
        return float("nan")
    return nats.item() / (math.log(2) * nbytes.item())


EVAL_TOKENS_CAP = 20 * 524288  # what one evaluation of a full-size run reads (nanochat's 10M tokens)


def eval_token_count(eval_tokens: int, eval_every: int, num_iterations: int, total_batch: int) -> int:
    """Validation tokens per evaluation. -1 (auto): all the run's evaluations together read at most a tenth of its
    training tokens (a forward-only pass, so about 3% of the training compute), and one reads at most
    EVAL_TOKENS_CAP. A short run evaluates briefly; a full-size one reads the full 10M. An evaluation also ends at
    the end of the validation split, whatever is asked."""
    if eval_tokens > 0:
        return eval_tokens
    evals = (num_iterations // eval_every + (num_iterations % eval_every > 0)) if eval_every > 0 else 1
    return min(EVAL_TOKENS_CAP, num_iterations * total_batch // (10 * evals))
