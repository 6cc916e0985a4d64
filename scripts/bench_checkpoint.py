"""What do checkpoints cost a training run? Arms measured side by side in one run, on CPU.

    python -m scripts.bench_checkpoint                  # depth 8, 1 round of 5 arms (~6 minutes on 2 cores)
    python -m scripts.bench_checkpoint --quick          # depth 4 (~2 minutes)

A benchmark, never a test. Every arm is the same training (same seed, model, random-token data, thread count)
in a fresh process of its own (so peak RSS is the arm's), saving every --save_every steps, at least 5 saves:

  none        no checkpoints: the reference step time and wall time
  torch.save  torch.save(model) + torch.save(optim) to step-named files + fsync, deleting those of two saves
              back (keep 2, as the Saver arms do), in the loop: the baseline the ratios are against
  sync        nanochat.saver.Saver, async_save=False: our writer (checksums, atomic renames, meta, pruning)
  async       Saver, async_save=True: the loop copies the state into reused buffers, a thread writes to disk
  snapshot    Saver, async_save=True, in-memory snapshots only (shared memory, no disk)

Per save: blocked = how long the loop stood still; durable = until the checkpoint was committed (disk) or the
snapshot was committed (memory). Step time during a write = steps that ran while a background write was in
flight, against the same arm's other steps. The first save (buffer allocation, first page faults) is shown
apart. "copy" is a plain copy of the same state into preallocated buffers: the floor for the blocking time.
Overhead per save = blocked + the extra time of the steps during the write; at save_every=50 it is that over
50 normal steps (extrapolated from the measured saves, and said so). On CPU a depth-8 step with a small batch is
mostly Muon's Newton-Schulz (seconds per step at 1 thread), which makes per-step overheads look small: read the
blocked and durable columns and the ratios against torch.save first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("none", "torch.save", "sync", "async", "snapshot")


def worker(args: argparse.Namespace) -> dict:
    """One arm, in this process: train, save every args.save_every steps, return the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from nanochat import checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import OptimConfig, Optimizers
    from nanochat.saver import Saver
    from nanochat.saver import tensors as saver_tensors

    arm, root = args.worker, Path(args.root)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len, args.head_dim))
    model.init_weights(0)
    optimizers = Optimizers(model, OptimConfig())
    gen = torch.Generator().manual_seed(0)
    saver = Saver(root / "ckpt", keep=2, warn=print, log=lambda m: None, async_save=arm in ("async", "snapshot"))
    saver.start()
    meta = {"model_config": model.config.to_dict(), "num_iterations": args.steps}
    steps, saves = [], []
    for step in range(1, args.steps + 1):
        in_flight = saver.busy()
        t0 = time.perf_counter()
        x = torch.randint(args.vocab_size, (args.batch, args.seq_len), generator=gen)
        model(x[:, :-1], x[:, 1:]).backward()
        optimizers.step(1.0, 0.95)
        optimizers.zero_grad()
        saver.settle()
        steps.append({"step": step, "dt": time.perf_counter() - t0, "in_flight": in_flight})
        if arm == "none" or step % args.save_every:
            continue
        t0 = time.perf_counter()
        if arm == "torch.save":  # a plain checkpoint series: step-named files, the newest 2 kept, like the Saver's
            d = root / "plain"
            d.mkdir(exist_ok=True)
            for kind, state in (("model", model.state_dict()), ("optim", optimizers.state_dict())):
                torch.save(state, d / f"{kind}_{step}.pt")
                checkpoint.fsync_path(d / f"{kind}_{step}.pt")
                (d / f"{kind}_{step - 2 * args.save_every}.pt").unlink(missing_ok=True)
            blocked = durable = time.perf_counter() - t0
            saves.append({"step": step, "blocked": blocked, "durable": durable})
            continue
        saver.save(step, model.state_dict(), optimizers.state_dict(), meta, {}, wait=False,
                   disk=arm != "snapshot", memory=arm == "snapshot")  # fmt: skip
        saves.append({"step": step, "record": saver.records[-1]})
    saver.finish()
    for s in saves:
        if rec := s.pop("record", None):
            done = rec.in_memory_at if arm == "snapshot" else rec.durable_at
            s.update(blocked=rec.blocked, durable=done - rec.started)
    out = {"arm": arm, "steps": steps, "saves": saves, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if arm == "async":  # the floor for the blocking time: a plain copy into buffers allocated beforehand
        states = [model.state_dict(), optimizers.state_dict()]
        tensors = [t for s in states for t in saver_tensors(s)]
        bufs = [torch.empty_like(t) for t in tensors]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for b, t in zip(bufs, tensors):
                b.copy_(t)
            times.append(time.perf_counter() - t0)
        out["copy"] = statistics.median(times)
        out["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def run_arm(arm: str, args: argparse.Namespace, tmp: Path) -> dict:
    root = tmp / arm
    shutil.rmtree(root, ignore_errors=True)
    shm = Path(tempfile.mkdtemp(prefix="bench_ckpt.", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    cmd = [sys.executable, "-m", "scripts.bench_checkpoint", "--worker", arm, "--root", str(root)]
    for key in ("depth", "vocab_size", "seq_len", "head_dim", "batch", "steps", "save_every", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "NANOCHAT_SHM_DIR": str(shm), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_checkpoint: arm {arm} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t0
    return out


def summarize(runs: list[dict], warmup: int) -> dict:
    """Medians over an arm's rounds; the first `warmup` steps of a process and the first save are set apart."""
    med = statistics.median
    steps = [s for r in runs for s in r["steps"] if s["step"] > warmup]
    normal = [s["dt"] for s in steps if not s["in_flight"]]
    during = [s["dt"] for s in steps if s["in_flight"]]
    first = [r["saves"][0] for r in runs if r["saves"]]
    rest = [s for r in runs for s in r["saves"][1:]]
    out = {
        "step": med(normal),
        "step_during": med(during) if during else None,
        "n_during": len(during) / max(1, len(runs)),
        "train": med(sum(s["dt"] for s in r["steps"] if s["step"] > warmup) for r in runs),
        "rss": max(r["peak_rss"] for r in runs) / 1024,
        "saves": len(rest) + len(first),
    }
    if rest:
        out |= {
            "blocked_first": med(s["blocked"] for s in first),
            "durable_first": med(s["durable"] for s in first),
            "blocked": med(s["blocked"] for s in rest),
            "durable": med(s["durable"] for s in rest),
        }
        # the extra time of the steps that overlapped a write, per save
        extra = sum(dt - out["step"] for r in runs for s in r["steps"] if s["in_flight"] and s["step"] > warmup
                    for dt in [s["dt"]])  # fmt: skip
        out["per_save"] = out["blocked"] + extra / max(1, len(rest) + len(first))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_checkpoint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="depth 4")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32768)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--saves", type=int, default=6, help="saves per arm (>= 5; the first is reported apart)")
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # derived from --saves
    p.add_argument("--rounds", type=int, default=1, help="more rounds alternate the arm order")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leaves a core for the writer,"
                   " as on a GPU node where the CPU is mostly idle)")  # fmt: skip
    p.add_argument("--dir", help="where checkpoints are written (default $TMPDIR)")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.depth = 4
    if args.saves < 5:
        p.error("--saves must be at least 5")
    warmup = 2
    args.steps = args.steps or args.save_every * args.saves + 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt.", dir=args.dir))
    t_start, load0 = time.time(), os.getloadavg()[0]
    results: dict[str, list[dict]] = {a: [] for a in ARMS}
    try:
        for r in range(args.rounds):  # arm order alternates between rounds: drift hits every arm alike
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                results[arm].append(run_arm(arm, args, tmp))
                print(f"round {r + 1}/{args.rounds}: {arm} done ({results[arm][-1]['wall']:.0f}s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s = {arm: summarize(results[arm], warmup) for arm in ARMS}
    a = results["async"][0]
    copy, size = statistics.median(r["copy"] for r in results["async"]), a["state_bytes"]
    print(f"\ndepth {args.depth}, state {size / 1e6:.0f} MB (model + optimizer), save every {args.save_every} steps,"
          f" {args.saves} saves x {args.rounds} rounds per arm, {args.threads} torch thread(s); medians")  # fmt: skip
    head = ("arm", "blocked 1st", "blocked", "durable 1st", "durable", "step ms", "during write", "peak RSS", "train s")
    print("".join(f"{h:>13}" for h in head))
    for arm in ARMS:
        x = s[arm]
        cells = [arm]
        for key in ("blocked_first", "blocked", "durable_first", "durable"):
            cells.append(f"{x[key]:.3f}s" if key in x else "-")
        during = f"{1000 * x['step_during']:.0f} ({x['n_during']:.0f})" if x["step_during"] else "-"
        cells += [f"{1000 * x['step']:.0f}", during, f"{x['rss']:.0f} MB", f"{x['train']:.1f}"]
        print("".join(f"{c:>13}" for c in cells))
    base, ref = s["torch.save"], s["none"]
    print(f"plain copy of the state into preallocated buffers: {copy:.3f}s ({size / 1e9 / copy:.1f} GB/s)")
    print("\nratios against torch.save + fsync (blocked, durable), and the targets:")
    for arm in ("sync", "async", "snapshot"):
        x = s[arm]
        print(f"  {arm:9s} blocked {x['blocked'] / base['blocked']:.3f}x  durable {x['durable'] / base['durable']:.2f}x"
              f"  blocked/copy {x['blocked'] / copy:.2f}x")  # fmt: skip
    x = s["async"]
    slow = x["step_during"] / x["step"] if x["step_during"] else 1.0
    at50 = x["per_save"] / (50 * ref["step"])
    measured = (x["train"] - ref["train"]) / ref["train"]
    print(f"  async blocked / torch.save blocked      {x['blocked'] / base['blocked']:.3f}  (target <= 0.1)")
    print(f"  async blocked / plain copy              {x['blocked'] / copy:.2f}  (target <= 1.5)")
    print(f"  async step during a write / normal step {slow:.2f}  (target <= 1.10)")
    print(f"  async overhead per save {x['per_save']:.3f}s -> at save_every=50: {100 * at50:.2f}% of 50 steps"
          f" (extrapolated; target < 1%); measured at save_every={args.save_every}: {100 * measured:+.1f}%"
          " train time vs none")  # fmt: skip
    print(f"\nload average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}; wall {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
