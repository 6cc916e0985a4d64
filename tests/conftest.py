"""Shared fixtures: a real base directory (built-in corpus slice + small tokenizer) for the whole session.

Subprocess tests run commands like
    subprocess.run([sys.executable, "-m", "scripts.base_train", ...], env=env, cwd=REPO_ROOT)
with the `env` fixture, which points NANOCHAT_BASE_DIR at `base_dir`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nanochat.checkpoint import LATEST
from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.tokenizer import Tokenizer, tokenizer_dir
from tests.runs import (
    BASE,
    REPO_ROOT,
    Trainer,
    assert_finished,
    built_once,
    crashed,
    kill_group,
    run_phase,
    steps,
    train,
)

TEST_DOCS = 300  # a seeded slice of the built-in corpus: enough for a few training steps, quick to tokenise
TEST_SHARDS = 3  # two train shards + one val shard
TEST_VOCAB = 512
TEST_ROW_GROUP = 16  # small row groups, so up to 7 ranks each get a part of the 100-document val shard
TOKENIZER_CHARS = 2_000_000  # the tokenizer is trained on this much of the train split


@pytest.fixture(scope="session", autouse=True)
def private_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fixed places on the machine that tests would otherwise share with whatever else runs there, made private
    for the session, in this process and every one it starts:
    - NANOCHAT_SHM_DIR: every trainer run looks at the in-memory snapshots (to resume from or drop them), by
      default in /dev/shm/nanochat-snapshots-<uid>, which anything else may hold;
    - NANOCHAT_BASE_DIR: an empty one until a test asks for `base_dir` (`make test` exports the user's own
      ~/.cache/nanochat, where a command that finds its checkpoint dir from --model-tag would look).
    A test that needs its own sets them again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_SHM_DIR", str(tmp_path_factory.mktemp("shm")))
        mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("empty_base")))
        yield


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 where every connection is refused, for the whole test: bound by the test and never
    listened on, so nothing else can listen there meanwhile (a fixed port such as 9 may be served anywhere)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


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


# ---- trainer runs shared by tests/test_resume.py and tests/test_crash_safety.py ------------------------------


@pytest.fixture(scope="session")
def menv(base_dir: Path) -> dict[str, str]:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def base(tmp_path_factory, menv) -> Path:
    return built_once(tmp_path_factory, "chat_base", lambda d: train(menv, d, nproc=1, tiny=BASE))


@pytest.fixture(scope="session")
def mid(tmp_path_factory, menv, base) -> Path:
    return built_once(tmp_path_factory, "chat_mid", lambda d: run_phase(menv, "mid", d, base))


@pytest.fixture(scope="session")
def sft(tmp_path_factory, menv, mid) -> Path:
    return built_once(tmp_path_factory, "chat_sft", lambda d: run_phase(menv, "sft", d, mid))


@pytest.fixture(scope="session")
def reference_1(tmp_path_factory, menv) -> tuple[Path, subprocess.CompletedProcess]:
    """One process, uninterrupted: checkpoints at 4, 8 and the final 12."""
    d = tmp_path_factory.mktemp("reference_1") / "ckpt"
    proc = train(menv, d)
    assert_finished(proc, d)
    return d, proc


@pytest.fixture(scope="session")
def reference_2(tmp_path_factory, menv) -> Path:
    d = tmp_path_factory.mktemp("reference_2") / "ckpt"
    assert_finished(train(menv, d, nproc=2), d, world=2)
    return d


@pytest.fixture(scope="session")
def crashed_1(tmp_path_factory, menv) -> Path:
    """One process, killed at step 10: checkpoints 4 and 8."""
    d = crashed(tmp_path_factory, menv, "crashed_1", 10)
    assert steps(d) == [4, 8] and (d / LATEST).read_text() == "8\n"
    return d


@pytest.fixture(scope="session")
def crashed_1_at_5(tmp_path_factory, menv) -> Path:
    """One process, killed at step 5: checkpoint 4 only."""
    d = crashed(tmp_path_factory, menv, "crashed_1_at_5", 5)
    assert steps(d) == [4]
    return d


@pytest.fixture(scope="session")
def crashed_2(tmp_path_factory, menv) -> Path:
    """Two processes under torchrun, rank 0 killed at step 10: checkpoints 4 and 8."""
    d = crashed(tmp_path_factory, menv, "crashed_2", 10, nproc=2)
    assert steps(d) == [4, 8]
    return d


@pytest.fixture
def start(menv: dict):
    """start(ckpt_dir, *args, nproc=1) -> a running Trainer, killed at teardown if a test left it running."""
    started: list[Trainer] = []

    def start(ckpt_dir: Path, *args: str, nproc: int = 1) -> Trainer:
        started.append(Trainer(menv, ckpt_dir, *args, nproc=nproc))
        return started[-1]

    yield start
    for t in started:
        if t.proc.poll() is None:
            kill_group(t.proc)
