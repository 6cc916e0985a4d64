"""The GPT model: a decoder-only transformer in the style of upstream nanochat.

- width from the depth dial: model_dim = depth * 64, rounded up to a multiple of head_dim
- rotary position embeddings, QK-norm, parameter-free RMSNorm (also right after the embedding)
- ReLU^2 MLP at 4x width, no biases anywhere, untied token embedding and lm_head
- tanh logit softcap at 15, zero-initialised output projections
- grouped-query attention through F.scaled_dot_product_attention; optionally kept inside each document of a row
  (`doc_start`: SFT's packed rows hold several conversations)
- an optional KV cache for incremental decoding (nanochat/engine.py); training never passes one
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128) -> GPTConfig:
        """The depth dial: everything else follows from depth (aspect ratio 64) and the head dim."""
        if depth < 1 or head_dim < 2 or head_dim % 2:
            raise ValueError(f"need depth >= 1 and an even head_dim >= 2, got depth={depth} head_dim={head_dim}")
        model_dim = math.ceil(depth * 64 / head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(sequence_len, vocab_size, depth, n_head, n_head, model_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def document_mask(idx: torch.Tensor, doc_start: int) -> torch.Tensor:
    """(B, 1, T, T) bool for SDPA: query i sees key j when j <= i and no `doc_start` token lies in (j, i].

    Rotary embeddings are relative, so a document attends exactly as it would at the start of a row: its outputs
    do not depend on the other documents in the row (tests/test_model.py checks this to the bit). Tokens before a
    row's first `doc_start` form one document of their own. On CUDA a mask rules out the flash kernel (SDPA picks
    the memory-efficient one): its cost is in scripts/bench_mask.py's tokens/s."""
    doc = (idx == doc_start).cumsum(dim=1)  # (B, T): which document of the row each token is in
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class Linear(nn.Linear):
    """A bias-free nn.Linear that skips torch's default init: GPT.init_weights, or a checkpoint, sets every weight.

    So building a model only allocates it, and a resume (which loads the weights anyway) does no init work."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out, bias=False)

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without the default init, like Linear."""

    def reset_parameters(self) -> None:
        pass


class KVCache:
    """The keys and values of every layer for the tokens seen so far, for incremental decoding.

    k and v are (n_layer, batch, n_kv_head, max_len, head_dim), allocated at the first write: shape, device and
    dtype come from the first keys and values (under autocast the keys are float32 after rotary while the values
    are bf16). `pos` counts the cached tokens; GPT.forward advances it once every layer has written.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer, self.max_len = n_layer, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n_kv_head, T, head_dim) at pos; return this layer's keys and values up to pos + T."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.n_layer, B, H, self.max_len, D)
            self.v = v.new_zeros(self.n_layer, B, H, self.max_len, D)
        end = self.pos + T
        assert end <= self.max_len, f"KV cache full: {self.pos} cached + {T} new > {self.max_len}"
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def expand(self, batch: int) -> None:
        """Copy a prefilled batch-1 cache into `batch` rows, so several samples share one prefill."""
        assert self.k is not None and self.k.size(1) == 1, "expand a prefilled cache of batch 1"
        self.k = self.k.repeat(1, batch, 1, 1, 1)
        self.v = self.v.repeat(1, batch, 1, 1, 1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_q = Linear(cfg.n_embd, cfg.n_head * self.head_dim)
        self.c_k = Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim)
        self.c_v = Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm after rotary
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None and doc_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, enable_gqa=gqa)
        elif kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.update(layer, k, v)
            # the new query i sits at position S - T + i and sees the keys up to it; a single query sees them all
            S = k.size(2)
            mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        layer: int,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin, kv_cache, layer, doc_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """GPT(cfg) only allocates the weights (on the default device): call init_weights() or load a state dict."""

    softcap = 15.0

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size)
        # Rotary tables are derived data: non-persistent buffers, never in a checkpoint.
        cos, sin = self._rotary_tables(cfg.sequence_len, cfg.n_embd // cfg.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
        # on the CPU whatever the default device: the same tables (to the bit) for every run and restart
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device="cpu"), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic init (same seed -> same weights on every rank, no broadcast needed)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)

        def fill(p: torch.Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=gen) * std)

        fill(self.wte.weight, 1.0)
        fill(self.lm_head.weight, 0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                # 1/sqrt(fan_in), shrunk for wide-in/narrow-out maps so activations keep unit scale
                fill(lin.weight, min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
            # zero output projections: every block starts as the identity
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        cos, sin = self._rotary_tables(self.config.sequence_len, self.config.n_embd // self.config.n_head)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        kv_cache: KVCache | None = None,
        doc_start: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or the loss against targets. With a kv_cache, idx continues the cached tokens:
        its positions start at kv_cache.pos, it attends to the cache and itself, and it is appended to the cache.
        With `doc_start` (a token id, training only), a document starts at each such token and attention stays
        inside it (`document_mask`): a row of several conversations trains each as if it were alone."""
        T = idx.size(1)
        t0 = 0 if kv_cache is None else kv_cache.pos
        assert t0 + T <= self.cos.size(1), f"sequence length {t0 + T} exceeds the rotary table ({self.cos.size(1)})"
        cos, sin = self.cos[:, t0 : t0 + T], self.sin[:, t0 : t0 + T]
        mask = None if doc_start is None or kv_cache is not None else document_mask(idx, doc_start)
        x = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, kv_cache, i, mask)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.lm_head(norm(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return loss if reduction == "mean" else loss.view(targets.shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per non-embedding weight plus attention's 12 * L * d * T."""
        cfg = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * cfg.sequence_len

    def matrix_params(self) -> list[nn.Parameter]:
        """The 2-D weights of the transformer blocks (Muon's share)."""
        return [p for p in self.blocks.parameters()]

    @torch.no_grad()
    def generate(self, idx: list[int], max_tokens: int, temperature: float = 1.0, seed: int = 42) -> list[int]:
        """Plain sampling without a KV cache: good enough for a glance at samples during training."""
        device = self.wte.weight.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        ids = torch.tensor([idx], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self(ids[:, -self.config.sequence_len :])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
        return ids[0, len(idx) :].tolist()
