"""What the side-by-side benchmarks that drive real runs share: a tiny corpus and tokenizer in a temp base dir,
the environment a run gets there, and the worker processes of a run found from outside (as a user's `kill`
would find them). scripts/bench_goodput.py uses it; scripts/bench_recovery.py could too."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.tokenizer import Tokenizer, tokenizer_dir
from supervisor import procs

# one micro-batch of 4 x 128 tokens on each rank, no evaluation or samples until the end: steps of tens of ms
TINY_TRAINER = ["--head_dim=32", "--max_seq_len=128", "--device_batch_size=4", "--total_batch_size=-1",
                "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1"]  # fmt: skip


def prepare(base: Path, vocab_size: int = 1024) -> None:
    """The built-in corpus (3 shards) and a small tokenizer under the base dir `base`."""
    write_builtin_corpus(data_dir(base), num_shards=3, max_docs=400, seed=0)
    train, _ = train_val_shards(data_dir(base))
    Tokenizer.train(iter_texts(train, max_chars=2_000_000), vocab_size).save(tokenizer_dir(base))


def run_env(base: Path) -> dict[str, str]:
    """A run's environment: the base dir, one thread per worker (2 cores shared), its own snapshot dir."""
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "NANOCHAT_SHM_DIR": str(base / "shm")}  # fmt: skip


def workers(pid: int) -> list[psutil.Process]:
    """The live torchrun workers under process `pid` (any depth: a supervisor or a shell loop above torchrun),
    by rank: the processes with RANK in their environment (set by torchrun before the exec)."""
    found = []
    for p in procs.tree(pid)[1:]:
        try:
            env = p.environ()
            if "RANK" in env and procs.alive(p):
                found.append((int(env["RANK"]), p))
        except (psutil.Error, ValueError):
            continue
    return [p for _, p in sorted(found, key=lambda x: x[0])]
