"""Validation in bits per byte: a loss that does not depend on the tokenizer's vocabulary."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT


@torch.no_grad()
def evaluate_bpb(model: GPT, loader: DataLoader, steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of per-token losses (nats) over the sum of the UTF-8 bytes those tokens stand for, in bits.

    Special tokens (0 bytes) are left out of both sums. Summed across ranks, so every rank gets the same number.
    """
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        try:
            x, y = loader.next_batch()
        except StopIteration:  # the validation split is smaller than eval_tokens: use what there is
            break
        loss = model(x, y, reduction="none").double()
        b = token_bytes[y]
        counted = b > 0
        nats += (loss * counted).sum()
        nbytes += b.sum()
    if dist.is_initialized():
        totals = torch.stack([nats, nbytes])
        dist.all_reduce(totals)
        nats, nbytes = totals[0], totals[1]
    if nbytes.item() == 0:
        return float("nan")
    return nats.item() / (math.log(2) * nbytes.item())
