"""Helpers that several test modules share (the trainer-run helpers are in runs.py): checkpoints saved through the
real Saver and damaged on purpose, forged compressed files, tiny models for the engine, a display that records the
supervisor's lines, and the CLI's usage-error contract. Test modules import these from here, never from each other."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from nanochat import compress
from nanochat.gpt import GPT, GPTConfig
from nanochat.saver import Saver
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from supervisor import cli

# ---- checkpoints (tests/test_checkpoint.py, test_snapshots_locks.py, test_symlinks.py, test_supervisor.py) ----


def states(seed: int, rows: int = 256) -> tuple[dict, dict]:
    """A small model and optimizer state shaped like the trainer's (tensors in nested dicts)."""
    g = torch.Generator().manual_seed(seed)
    model = {"wte.weight": torch.randn(rows, 8, generator=g), "lm_head.weight": torch.randn(8, rows, generator=g)}
    optim = {
        "adamw": {
            "state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(rows, 8, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        }
    }
    return model, optim


def save(directory: Path, step: int, final: bool = False, keep: int = -1, rows: int = 256, **kw) -> list[str]:
    """Save a checkpoint through the real Saver; returns its warnings."""
    warnings: list[str] = []
    saver = Saver(directory, keep=keep, warn=warnings.append, log=lambda msg: None, **kw)
    model, optim = states(step, rows)
    saver.save(step, model, optim, {"final": final, "stop_reason": "periodic"}, {"loader": {"offset": step}})
    return warnings


def garble(path: Path) -> None:
    """Same size, different bytes: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- forged compressed files (tests/test_compress.py, test_checkpoint.py) -------------------------------------


def container(tensors: list[dict], frames: bytes = b"", tree=None) -> bytes:
    """The bytes of a compressed file with this index (forged: what a hostile or broken writer could produce)."""
    tree = {"list": [{"tensor": i} for i in range(len(tensors))]} if tree is None else tree
    index = json.dumps({"format": 1, "codec": "zstd", "level": 1, "tree": tree, "tensors": tensors}).encode()
    return compress.MAGIC + frames + index + struct.pack("<Q", len(index)) + compress.MAGIC


def forged(kind: str) -> bytes:
    """A container whose layout is consistent enough to fool a naive reader, for each way of forging one."""
    if kind == "wrapping shape":  # 2**64 elements: an int64 product wraps to 0, which "matches" no chunks
        return container([{"dtype": "float32", "shape": [2**32, 2**32], "group": 4, "chunks": []}])
    if kind == "bomb":  # 16 KiB of real zstd frames that decompress to 512 MiB of zeros, allocated before reading
        frame = zstandard.ZstdCompressor(level=19).compress(bytes(8 << 20))
        chunks = [[8 << 20, len(frame)]] * 64
        return container([{"dtype": "uint8", "shape": [512 << 20], "group": 1, "chunks": chunks}], frame * 64)
    if kind == "wrapping chunk sizes":  # a frame count that wraps the offsets back onto the index
        return container([{"dtype": "uint8", "shape": [2**63, 2], "group": 1, "chunks": [[2**64, 1]]}])
    data = container([{"dtype": "uint8", "shape": [4], "group": 1, "chunks": [[4, 13]]}],
                     zstandard.ZstdCompressor().compress(bytes(4)))  # fmt: skip
    if kind == "truncated index":
        return data[:-20] + data[-16:]
    if kind == "garbled index":
        start = len(data) - 16 - struct.unpack("<Q", data[-16:-8])[0]
        return data[:start] + b"\xff" * (len(data) - 16 - start) + data[-16:]
    if kind == "bit dtype":  # a dtype torch.empty refuses or that has no bytes to fill
        return container([{"dtype": "qint8", "shape": [4], "group": 1, "chunks": [[4, 13]]}],
                         zstandard.ZstdCompressor().compress(bytes(4)))  # fmt: skip
    raise ValueError(kind)


FORGED = ["wrapping shape", "bomb", "wrapping chunk sizes", "truncated index", "garbled index", "bit dtype"]


# ---- tiny models for the engine (tests/test_engine.py, test_chat_web.py) --------------------------------------


def random_model(vocab: int, seq: int = 64, seed: int = 0, cfg: GPTConfig | None = None) -> GPT:
    """A tiny GPT whose output depends on its context: init_weights zeroes the output projections (every block the
    identity) and gives a near-zero lm_head, so those get random weights of a useful size."""
    model = GPT(cfg or GPTConfig.from_depth(2, vocab, seq, head_dim=32))
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0, 0.05, generator=gen)
        model.lm_head.weight.normal_(0, 0.05, generator=gen)
    return model.eval()


def without_specials(model: GPT, tokenizer: Tokenizer) -> GPT:
    """Zero the lm_head rows of the special tokens: their logit is 0, below the best of the ~500 random others, so
    greedy decoding neither stops early nor calls the tool."""
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.special_id(token)] = 0
    return model


class ScriptedGPT(GPT):
    """A test double for the model: the real forward runs (so the engine's KV cache fills as usual), but on its
    n-th call row i's next token is scripts[i][n] with certainty."""

    def __init__(self, vocab: int, scripts: list[list[int]]):
        super().__init__(GPTConfig.from_depth(1, vocab, 64, head_dim=32))
        self.init_weights(0)
        self.scripts, self.calls = scripts, 0

    def forward(self, idx, targets=None, reduction="mean", kv_cache=None):
        logits = torch.full_like(super().forward(idx, kv_cache=kv_cache), -1e9)
        for i in range(idx.size(0)):
            logits[i, -1, self.scripts[i][self.calls]] = 0.0
        self.calls += 1
        return logits


# ---- the supervisor's display and CLI (tests/test_supervisor.py, test_supervisor_procs.py, test_cli_status.py,
# test_plot.py) ------------------------------------------------------------------------------------------------


class Recorder:
    """A display that keeps its event lines."""

    def __init__(self):
        self.lines: list[str] = []

    def event(self, msg: str) -> None:
        self.lines.append(msg)

    def update(self, view) -> None:
        pass

    def close(self) -> None:
        pass


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["nanochat-run", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("nanochat-run: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
