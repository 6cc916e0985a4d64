"""Shared fixtures: a real base directory (built-in corpus slice + small tokenizer) for the whole session.

Subprocess tests run commands like
    subprocess.run([sys.executable, "-m", "scripts.base_train", ...], env=env, cwd=REPO_ROOT)
with the `env` fixture, which points NANOCHAT_BASE_DIR at `base_dir`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.tokenizer import Tokenizer, tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DOCS = 300  # a seeded slice of the built-in corpus: enough for a few training steps, quick to tokenise
TEST_SHARDS = 3  # two train shards + one val shard
TEST_VOCAB = 512
TEST_ROW_GROUP = 16  # small row groups, so up to 7 ranks each get a part of the 100-document val shard
TOKENIZER_CHARS = 2_000_000  # the tokenizer is trained on this much of the train split


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A NANOCHAT_BASE_DIR holding data shards and a trained tokenizer; also set in this process's environment."""
    base = tmp_path_factory.mktemp("nanochat_base")
    write_builtin_corpus(data_dir(base), TEST_SHARDS, TEST_DOCS, seed=0, docs_per_row_group=TEST_ROW_GROUP)
    train, _ = train_val_shards(data_dir(base))
    Tokenizer.train(iter_texts(train, max_chars=TOKENIZER_CHARS), TEST_VOCAB).save(tokenizer_dir(base))
    # in-process code that calls get_base_dir() must never touch the user's real ~/.cache/nanochat
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        yield base


@pytest.fixture(scope="session")
def tokenizer(base_dir: Path) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir(base_dir))


@pytest.fixture
def env(base_dir: Path) -> dict[str, str]:
    """Environment for subprocesses: ours plus the test base dir, unbuffered output and one thread each."""
    return {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_fs("4m") mounts a fresh tmpfs of that size and returns it; skips where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no `mount` command here to make a small filesystem")
        if proc.returncode:
            pytest.skip(f"cannot mount a {size} tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
