"""How fast does a supervised run recover from a dead worker, and how much does it lose? Side by side, one run.

    python -m scripts.bench_recovery [--nproc 2] [--depth 2] [--repeats 3] [--compile]

Arms, interleaved, each repeated; the kill step is drawn at random per repeat (seeded) from the second half of
the run (a failure comes a while into a run, when a spare has long finished its imports) and shared by every
killed arm:
  cold       `nanochat-run train` from scratch, uninterrupted: launch -> first completed step, and the
             reference end state
  disk       the same run with `--debug_fault=sigkill@step:K` on the last rank, checkpoints every --save-every
  snapshots  the same kill, plus in-memory snapshots every --snapshot-every steps
  spare      the same as snapshots, under `nanochat-run train --spare` (the restart takes the warm spare)
  no cache   (--compile only) the same as snapshots, with torch.compile's caches emptied at the kill: the
             restart compiles from nothing, as one on a new machine did before the caches moved into the run dir

For each kill: detection (worker SIGKILL -> the supervisor notices), recovery (SIGKILL -> the first step
completed after the restart: backoff 0, torchrun start-up, imports, checkpoint load, first step), steps lost,
whether the end result is bit-identical to the cold run's, and where the seconds went: the trainer's own
start-up (its "startup:" log line) and the rest (the supervisor, torchrun and the workers' start). The death time
is the timestamp the fault writes just before it kills. `--compile` runs every arm with `--compile=True` (Inductor
builds CPU kernels), so the compile cache's effect on a restart shows on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat import checkpoint
from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
from nanochat.tokenizer import Tokenizer, tokenizer_dir
from supervisor import procs


def prepare(base: Path) -> None:
    write_builtin_corpus(data_dir(base), num_shards=3, max_docs=400, seed=0)
    train, _ = train_val_shards(data_dir(base))
    Tokenizer.train(iter_texts(train, max_chars=2_000_000), 1024).save(tokenizer_dir(base))


PARTS = ("imports", "process group", "finding", "model", "optim+data", "load", "first step", "trainer")


def startup_parts(log: str) -> dict[str, float]:
    """The last "startup:" line of an attempt's log (nanochat/telemetry.py's Startup.line), as seconds by part."""
    line = re.findall(r"startup: (.*)", log)[-1]
    return dict(zip(PARTS, map(float, re.findall(r"([\d.]+)s", line)), strict=True))


def run(args: argparse.Namespace, base: Path, tag: str, kill_step: int = 0, snapshot_every: int = 0,
        spare: bool = False, cold_cache: bool = False) -> dict:  # fmt: skip
    """One supervised run; polls the heartbeat to time the first step of each attempt."""
    ckpt = base / "ckpt" / tag
    run_dir = base / "runs" / tag
    cmd = [sys.executable, "-m", "supervisor.cli", "train", "--checkpoint-dir", str(ckpt), "--run-dir", str(run_dir),
           "--nproc-per-node", str(args.nproc), "--depth", str(args.depth), "--num-iterations", str(args.steps),
           "--save-every", str(args.save_every), "--backoff", "0", "--spare", "on" if spare else "off", "--",
           "--head_dim=32", "--max_seq_len=128", "--device_batch_size=4", "--total_batch_size=-1",
           "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1",
           f"--snapshot_every={snapshot_every}", f"--compile={args.compile}"]  # fmt: skip
    if kill_step:
        cmd.append(f"--debug_fault=sigkill@step:{kill_step},rank={args.nproc - 1}")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "NANOCHAT_SHM_DIR": str(base / "shm")}  # fmt: skip
    cache = base / "compile-cache" / tag  # cold_cache: ours, emptied at the kill (the supervisor keeps a user's)
    if cold_cache:
        env[procs.COMPILE_CACHE_ENV] = str(cache)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seen: list[tuple[float, int]] = []  # (heartbeat time, step) of every training heartbeat seen
    while proc.poll() is None:
        if cold_cache and cache.exists() and any(ckpt.glob(".fault-fired-*")):
            shutil.rmtree(cache)  # the restart finds no compile cache, as on a new machine before the run dir had it
            cold_cache = False  # once: the restart fills it again
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
    final = checkpoint.find_latest_valid(ckpt, print)
    starts = [e for e in events if e["event"] == "attempt_start"]
    log = (Path(starts[-1]["log_dir"]) / "torchrun.log").read_text(errors="replace")
    out = {"first_step": seen[0][0] - t0, "final": checkpoint.load(ckpt, final)[0], "parts": startup_parts(log)}
    out["parts"]["start"] = out["first_step"] - out["parts"]["trainer"]  # supervisor, torchrun, workers' exec
    if kill_step:
        died = float(next(ckpt.glob(".fault-fired-*")).read_text())
        out["detect"] = ends[0]["worker_died_at"] - died
        out["recover"] = min(t for t, _ in seen if t > ends[0]["exited_at"]) - died  # the restarted attempt's
        out["parts"]["start"] = out["recover"] - out["detect"] - out["parts"]["trainer"]
        out["lost"] = ends[0]["steps_lost"]
        out["spare"] = starts[-1].get("spare", False)
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--snapshot-every", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="every arm with --compile=True (Inductor on the CPU)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    snap = args.snapshot_every
    arms = {"disk": ("checkpoints only", {}), "snapshots": (f"+ snapshots every {snap}", {"snapshot_every": snap}),
            "spare": ("+ snapshots + --spare on", {"snapshot_every": snap, "spare": True})}  # fmt: skip
    if args.compile:
        arms["nocache"] = ("+ snapshots, cache wiped at the kill", {"snapshot_every": snap, "cold_cache": True})
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare(base)
        rows: dict[str, list[dict]] = {"cold": [], **{arm: [] for arm in arms}}
        for i in range(args.repeats):  # interleaved, so drift on a noisy machine hits every arm alike
            k = rng.randrange(max(args.save_every + 1, args.steps // 2), args.steps - 1)
            rows["cold"].append(run(args, base, f"cold{i}"))
            for arm, (_, kw) in arms.items():
                rows[arm].append(run(args, base, f"{arm}{i}", k, **kw) | {"kill": k})
    cold = statistics.median(r["first_step"] for r in rows["cold"])
    ref = rows["cold"][0]["final"]
    print(f"bench_recovery: depth {args.depth}, {args.nproc} workers (gloo, CPU), {args.steps} steps, checkpoint every"
          f" {args.save_every}, compile {args.compile}, {args.repeats} kills per arm, medians")  # fmt: skip
    print(f"cold start: launch -> first step {cold:.2f}s")
    print(f"{'arm':<34}{'detect s':>10}{'recover s':>11}{'vs cold':>9}{'steps lost':>12}{'bit-exact':>11}{'spare':>7}")
    for arm, (label, _) in arms.items():
        rs = rows[arm]
        det, rec = (statistics.median(r[key] for r in rs) for key in ("detect", "recover"))
        exact = all(same(r["final"], ref) for r in rs) and all(same(r["final"], ref) for r in rows["cold"])
        lost = ",".join(str(r["lost"]) for r in rs)
        used = all(r["spare"] for r in rs)
        print(f"{label:<34}{det:>10.2f}{rec:>11.2f}{rec / cold:>8.2f}x{lost:>12}{str(exact):>11}{str(used):>7}")
    print("kill steps: " + ", ".join(str(r["kill"]) for r in rows["disk"]))
    cols = ("start", "imports", "process group", "optim+data", "load", "first step")
    print(
        "where the seconds go (medians; start: launch or detection -> the trainer's own start, i.e. the supervisor,"
        " torchrun and the workers' exec; optim+data includes finding the checkpoint and building the model):"
    )
    print(f"{'':<34}" + "".join(f"{c:>14}" for c in cols))
    for arm, label in (("cold", "cold start"), *((arm, label) for arm, (label, _) in arms.items())):
        parts = {c: statistics.median(_part(r["parts"], c) for r in rows[arm]) for c in cols}
        print(f"{label:<34}" + "".join(f"{parts[c]:>14.2f}" for c in cols))


def _part(parts: dict[str, float], column: str) -> float:
    if column == "optim+data":
        return parts["finding"] + parts["model"] + parts["optim+data"]
    return parts[column]


if __name__ == "__main__":
    main()
