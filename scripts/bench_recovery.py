"""How fast does a supervised run recover from a dead worker? Measured side by side in one run.

    python -m scripts.bench_recovery [--nproc 2] [--depth 2] [--repeats 3]

Arms, interleaved, each repeated:
  cold      `nanochat-run train` from scratch: launch -> first completed training step
  recovery  the same run with `--debug_fault=sigkill@step:K` (the checkpoint is at K-1): a worker dies by SIGKILL;
            death -> the supervisor notices torchrun's exit (detection), and death -> the first step completed
            after the restart (recovery, including backoff 0, torchrun start-up, imports and checkpoint load)

The death time is the timestamp the fault writes just before it kills the process. Ratios are against the cold
start, which is the same work a restart has to redo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.tokenizer import Tokenizer, tokenizer_dir


def prepare(base: Path) -> None:
    write_builtin_corpus(data_dir(base), num_shards=3, max_docs=400, seed=0)
    train, _ = train_val_shards(data_dir(base))
    Tokenizer.train(iter_texts(train, max_chars=2_000_000), 1024).save(tokenizer_dir(base))


def run(args: argparse.Namespace, base: Path, tag: str, fault: str) -> dict:
    """One supervised run; polls the heartbeat to time the first step of each attempt."""
    ckpt = base / "ckpt" / tag
    run_dir = base / "runs" / tag
    cmd = [sys.executable, "-m", "supervisor.cli", "train", "--checkpoint-dir", str(ckpt), "--run-dir", str(run_dir),
           "--nproc-per-node", str(args.nproc), "--depth", str(args.depth), "--num-iterations", str(args.steps),
           "--save-every", str(args.kill_step - 1), "--backoff", "0", "--",
           "--head_dim=32", "--max_seq_len=128", "--device_batch_size=4", "--total_batch_size=-1",
           "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1"]  # fmt: skip
    if fault:
        cmd.append(f"--debug_fault={fault}")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seen: list[tuple[float, int]] = []  # (heartbeat time, step) of every training heartbeat seen
    while proc.poll() is None:
        try:
            hb = json.loads((run_dir / "heartbeat.json").read_text())
            if hb.get("phase") == "training" and (not seen or seen[-1][0] != hb["time"]):
                seen.append((hb["time"], hb["step"]))
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"bench_recovery: the {tag} run failed with exit code {proc.returncode}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "attempt_end"]
    out = {"first_step": seen[0][0] - t0}
    if fault:
        died = float(next(ckpt.glob(".fault-fired-*")).read_text())
        out["detect"] = ends[0]["worker_died_at"] - died
        out["torchrun_exit"] = ends[0]["exited_at"] - died
        out["recover"] = min(t for t, _ in seen if t > ends[0]["exited_at"]) - died  # the restarted attempt's
        out["lost"] = ends[0]["steps_lost"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill-step", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare(base)
        cold, rec = [], []
        for i in range(args.repeats):  # interleaved, so drift on a noisy machine hits both arms alike
            cold.append(run(args, base, f"cold{i}", ""))
            rec.append(run(args, base, f"kill{i}", f"sigkill@step:{args.kill_step},rank={args.nproc - 1}"))
    med = lambda rows, key: statistics.median(r[key] for r in rows)
    cold_s, detect_s, recover_s = med(cold, "first_step"), med(rec, "detect"), med(rec, "recover")
    exit_s = med(rec, "torchrun_exit")
    print(f"bench_recovery: depth {args.depth}, {args.nproc} workers (gloo, CPU), {args.repeats} runs per arm, medians")
    print(f"{'measure':<48}{'seconds':>10}{'vs cold start':>16}")
    print(f"{'cold start: launch -> first step':<48}{cold_s:>10.2f}{1.0:>15.2f}x")
    print(f"{'detection: worker SIGKILL -> supervisor notices':<48}{detect_s:>10.2f}{detect_s / cold_s:>15.2f}x")
    print(f"{'torchrun has stopped the other workers':<48}{exit_s:>10.2f}{exit_s / cold_s:>15.2f}x")
    print(f"{'recovery: worker SIGKILL -> first step after':<48}{recover_s:>10.2f}{recover_s / cold_s:>15.2f}x")
    print(f"steps lost per crash (checkpoint every {args.kill_step - 1}): {[r['lost'] for r in rec]}")
    print("per run (s): " + ", ".join(f"cold {c['first_step']:.2f} / detect {r['detect']:.2f} / recover "
                                      f"{r['recover']:.2f}" for c, r in zip(cold, rec)))  # fmt: skip


if __name__ == "__main__":
    main()
