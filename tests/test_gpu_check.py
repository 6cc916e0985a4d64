"""`make gpu-check` (scripts/gpu_check.py) on the CPU: every check of the GPU run, small and eager, end to end
(real supervised runs, a real SIGKILL, real checkpoints), so the plumbing works before a GPU is ever lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import REPO_ROOT
from tests.supervised import kill_leftovers

CHECK = [sys.executable, "-m", "scripts.gpu_check"]


def table_rows(output: str) -> dict[str, list[str]]:
    """The final table's rows by their letter ("a" .. "g"): [check, result, numbers, verdict]."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 4 and cells[0][1:3] == ") ":
            rows[cells[0][0]] = [cells[0], cells[1], " | ".join(cells[2:-1]), cells[-1]]
    return rows


@pytest.mark.slow
def test_every_check_runs_on_the_cpu(base_dir: Path, env: dict[str, str], tmp_path: Path):
    work = tmp_path / "work"
    try:
        proc = subprocess.run([*CHECK, "--device", "cpu", "--base-dir", str(base_dir), "--work", str(work)],
                              capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)  # fmt: skip
    finally:
        kill_leftovers(str(work))
    out = proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert sorted(rows) == list("abcdefg"), out  # one table, one row per check
    for letter in "abcdefg":
        assert rows[letter][3] == "PASS", out
    assert "loss" in rows["a"][1] and "tok/s" in rows["a"][2], out
    assert "blocked" in rows["b"][2] and "write" in rows["b"][2], out
    assert "bit-exact: yes" in rows["c"][2], out  # on the CPU a resume must be exact, as everywhere else
    assert "cached == uncached" in rows["d"][1], out
    assert "rolled back to 5" in rows["f"][1] and "injected wrong answer caught" in rows["g"][1], out
    failed = [r for r in rows.values() if r[3] != "PASS"]
    assert proc.returncode == (1 if failed else 0), out  # the exit status says what the table says
    assert not work.exists(), "the work directory is removed unless --keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the check would run, not refuse")
def test_no_cuda_gpu_is_a_one_line_refusal():
    proc = subprocess.run(CHECK, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_check: no CUDA GPU: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
