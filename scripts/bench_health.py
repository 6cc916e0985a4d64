"""What does the health check before each attempt cost? Side by side, one run.

    python -m scripts.bench_health [--repeats 3] [--nproc 2]

Arms, interleaved, each repeated: a tiny supervised `nanochat-run train` of a few steps with one injected crash
(so two attempts), with --health-check (the default) and with --no-health-check. For each: the supervisor's launch
-> its first attempt's start (the attempt_start event: the health check sits in front of it), the whole run's wall
time, and (checked arm) the check's own seconds from its `health` events: before attempt 1 (disk, memory and the
device subprocess) and before the restart (disk and memory: a Python exception does not point at the machine).
Printed: medians and the ratios checked/unchecked.
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

from scripts.bench_recovery import prepare


def run(base: Path, tag: str, nproc: int, check: bool) -> dict:
    ckpt, run_dir = base / "ckpt" / tag, base / "runs" / tag
    cmd = [sys.executable, "-m", "supervisor.cli", "train", "--checkpoint-dir", str(ckpt), "--run-dir", str(run_dir),
           "--nproc-per-node", str(nproc), "--depth", "1", "--num-iterations", "4", "--save-every", "1",
           "--health-check" if check else "--no-health-check", "--",
           "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=-1",
           "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1", "--device_type=cpu",
           "--debug_fault=raise@step:2"]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    first = next(e["time"] for e in events if e["event"] == "attempt_start")
    health = [e["seconds"] for e in events if e["event"] == "health"]
    return {"to_attempt": first - t0, "wall": wall, "health": health[0] if health else 0.0,
            "restart_health": health[1] if len(health) > 1 else 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare(base)
        arms: dict[str, list[dict]] = {"checked": [], "unchecked": []}
        for i in range(args.repeats):  # interleaved: a load change on the machine hits both arms alike
            for name in arms:
                arms[name].append(run(base, f"{name}{i}", args.nproc, name == "checked"))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in arms.items()}
    print(
        f"{'arm':<10} {'launch->attempt 1':>18} {'run wall':>9} {'check 1':>8} {'check 2':>8}"
        f"  (medians of {args.repeats}; check 1 with the device subprocess, check 2 before the restart)"
    )
    for name, m in med.items():
        print(
            f"{name:<10} {m['to_attempt']:>17.2f}s {m['wall']:>8.2f}s {m['health']:>7.2f}s {m['restart_health']:>7.2f}s"
        )
    c, u = med["checked"], med["unchecked"]
    print(f"ratio checked/unchecked: launch->attempt 1 {c['to_attempt'] / u['to_attempt']:.2f}x,"
          f" run wall {c['wall'] / u['wall']:.2f}x; the check is {c['health'] / u['wall']:.0%} of an unchecked"
          " run's wall time")  # fmt: skip


if __name__ == "__main__":
    main()
