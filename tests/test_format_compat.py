"""Checkpoints outlive the code that wrote them: a run killed under an older version of this repo resumes under
today's code and ends bit-identical to an uninterrupted run of today's code.

The older version is taken from git history (`git archive`), not from files stored in the repo: FORMAT_BASE is the
last commit before the checkpoint code was reshaped into a package and the settings moved (issue 22). Move it
forward only when the files' format deliberately changes (then with a reader for the old one)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.runs import REPO_ROOT, assert_same_final_state, command, steps, train

FORMAT_BASE = "3996eb6"  # main at the end of issue 21, before issue 22's reshaping


def older_tree(where: Path) -> Path:
    """FORMAT_BASE's files under `where`; skips where the clone lacks that history (a shallow clone)."""
    found = subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{FORMAT_BASE}^{{commit}}"],
                           capture_output=True)  # fmt: skip
    if found.returncode != 0:
        pytest.skip(f"this clone lacks commit {FORMAT_BASE} (a shallow clone): git fetch --unshallow")
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", FORMAT_BASE], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(where, filter="data")
    return where


@pytest.mark.slow
def test_a_checkpoint_written_by_the_older_code_resumes_bit_identical(tmp_path, menv, reference_1):
    old = older_tree(tmp_path / "old")
    d = tmp_path / "ckpt"
    # the older trainer, run from its own tree: python -m finds the package in the working directory first
    which = subprocess.run([sys.executable, "-c", "import nanochat.checkpoint as c; print(c.__file__)"], env=menv,
                           cwd=old, capture_output=True, text=True, check=True)  # fmt: skip
    assert which.stdout.strip() == str(old / "nanochat" / "checkpoint.py")  # a module then, a package now
    proc = subprocess.run(command(d, ("--debug_fault=sigkill@step:10",), 1), env=menv, cwd=old, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert steps(d) == [4, 8]
    resumed = train(menv, d)  # today's code
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step 8 in {d}" in resumed.stdout
    assert_same_final_state(d, reference_1[0])
