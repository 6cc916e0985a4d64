"""Optimizers: Muon for the transformer's matrices, AdamW for embedding and lm_head, and their schedules.

Distributed without DDP: after backward, `average_gradients` all-reduces every gradient, so every rank holds the
same averaged gradient. AdamW then runs on every rank (cheap, elementwise). Muon's expensive part, the Newton-Schulz
orthogonalisation, is dealt out: rank r orthogonalises every W-th matrix of each same-shape group and the results
are all-gathered. All optimizer state (Adam moments, Muon momentum) is therefore *replicated*: every rank holds the
same full state, which makes checkpoints one file and lets a run resume exactly at any world size. It costs memory
(no ZeRO sharding) and half an all-gather more traffic than a reduce-scatter design; fine up to ~1B parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.gpt import GPT

# ----------------------------------------------------------------------------------------------------------------
# schedules: pure functions of the step


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac at the last step."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


# ----------------------------------------------------------------------------------------------------------------
# gradient averaging


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], world_size: int, bucket_numel: int = 2**25) -> None:
    """All-reduce (mean) the gradients of `params` in flat buckets: few large collectives beat many small ones."""
    if world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets, current, size = [], [], 0
    for g in grads:
        if current and size + g.numel() > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.append(g)
        size += g.numel()
    if current:
        buckets.append(current)
    pending = []
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(world_size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# ----------------------------------------------------------------------------------------------------------------
# Muon


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T with a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) push singular values towards ~1 quickly rather than exactly; that is
    what Muon wants. Runs in bf16 on CUDA (tensor cores) and in fp32 on CPU.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices.

    Nesterov momentum, then orthogonalisation, then an update scaled by sqrt(max(1, rows/cols)) so that every
    matrix gets a comparable per-element step whatever its shape. Params are grouped by shape so each rank can
    orthogonalise its share of a group and all-gather the rest.
    """

    def __init__(
        self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5, rank: int = 0, world_size: int = 1
    ):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D parameters")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            rows, cols = params[0].shape
            scale = group["lr"] * math.sqrt(max(1.0, rows / cols))
            mom = group["momentum"]
            # momentum runs on every rank (replicated state), the orthogonalisation is dealt out
            directions = []
            for p in params:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.lerp_(p.grad, 1 - mom)
                directions.append(p.grad.lerp(buf, mom))  # Nesterov
            W = self.world_size
            pending = []
            for start in range(0, len(params), W):
                chunk = params[start : start + W]
                mine = start + self.rank
                update = orthogonalize(directions[mine], group["ns_steps"]) if mine < len(params) else None
                if W == 1:
                    pending.append((chunk, [update], None))
                    continue
                if update is None:  # ranks past the end of a ragged last chunk contribute a dummy
                    update = torch.zeros_like(params[0], dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
                gathered = [torch.empty_like(update) for _ in range(W)]
                pending.append((chunk, gathered, dist.all_gather(gathered, update.contiguous(), async_op=True)))
            for chunk, updates, work in pending:
                if work is not None:
                    work.wait()
                for p, u in zip(chunk, updates):
                    p.add_(u.to(p.dtype), alpha=-scale)


# ----------------------------------------------------------------------------------------------------------------
# the optimizer pair used by the trainer


@dataclass
class OptimConfig:
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.8, 0.95)


class Optimizers:
    """AdamW (embedding, lm_head) + Muon (block matrices) behind one step / state_dict interface."""

    def __init__(self, model: GPT, cfg: OptimConfig, rank: int = 0, world_size: int = 1):
        # Adam LRs were tuned at width 768; scale as 1/sqrt(width) so other widths behave alike.
        dim_scale = (model.config.n_embd / 768) ** -0.5
        adam_groups = [
            {"params": [model.wte.weight], "lr": cfg.embedding_lr * dim_scale},
            {"params": [model.lm_head.weight], "lr": cfg.unembedding_lr * dim_scale},
        ]
        # fused: one kernel per parameter on CUDA and CPU alike (on CPU ~6x faster than the per-op loop)
        self.adamw = torch.optim.AdamW(
            adam_groups, betas=cfg.adam_betas, eps=1e-10, weight_decay=cfg.weight_decay, fused=True
        )
        self.muon = Muon(model.matrix_params(), lr=cfg.matrix_lr, rank=rank, world_size=world_size)
        self.params = list(model.parameters())
        self.world_size = world_size
        for opt in (self.adamw, self.muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]

    def step(self, lr_mult: float, momentum: float) -> None:
        average_gradients(self.params, self.world_size)
        for opt in (self.adamw, self.muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        for group in self.muon.param_groups:
            group["momentum"] = momentum
        self.adamw.step()
        self.muon.step()

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)
        self.muon.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore moments and momentum. Hyperparameters (learning rates, weight decay, betas, fused...) stay those
        of the current config: torch's load_state_dict would bring back the saved ones, and a resume may change them."""
        for opt, key in ((self.adamw, "adamw"), (self.muon, "muon")):
            current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            opt.load_state_dict(state[key])
            for group, settings in zip(opt.param_groups, current):
                group.update(settings)
