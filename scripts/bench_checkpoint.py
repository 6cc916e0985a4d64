"""Benchmark checkpoint save and load on CPU: nanochat.checkpoint against plain torch.save / torch.load.

    python -m scripts.bench_checkpoint           # depths 2, 4, 8; 7 repetitions (~2-4 minutes)
    python -m scripts.bench_checkpoint --quick   # depths 2, 4; 5 repetitions

A benchmark, never a test. For each depth a GPT gets two real optimizer steps (so AdamW moments and Muon
momentum exist), then every repetition runs each arm once, for every depth, the arm order alternating
between repetitions (noise hits all arms alike); the tables show medians.

  save ours     Saver(dir).save(step, model_state, optim_state, meta, rank_state): temp file, CRC32 while
                writing, fsync, rename, directory fsync, meta (the commit point), latest marker, pruning to
                keep=3 (a new step every repetition, as in training). Timed until the call returns (durable).
  save plain    torch.save(model_state, path) and torch.save(optim_state, path), then fsync of both files.
  verify        inspect(dir, step, verify=True): sizes + CRC32 of both files (part of load ours).
  load ours     find_latest_valid(dir) (verifies the CRC32s) + load(dir, ckpt) (torch.load, mmap=True).
  load plain    torch.load of the same two files (weights_only=True, no mmap).
  ... + apply   then model.load_state_dict + Optimizers.load_state_dict into a second model, as a resume does.
  cold          the same after evicting the files from the page cache (posix_fadvise DONTNEED), as after a
                reboot; warm = the files are still cached from the save, as after a crash on the same machine.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

ARMS_SAVE = ("save ours", "save plain")
ARMS_LOAD = ("verify", "load ours", "load plain")


def set_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def evict(paths: list[Path]) -> None:
    """Drop these files' clean pages from the page cache (only ours: nothing machine-wide)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Subject:
    """One depth: a trained-for-two-steps model with its optimizer state, and a second model to load into."""

    def __init__(self, depth: int, args: argparse.Namespace, root: Path) -> None:
        import torch

        from nanochat.gpt import GPT, GPTConfig
        from nanochat.optim import OptimConfig, Optimizers

        self.depth = depth
        self.cfg = GPTConfig.from_depth(depth, args.vocab_size, args.seq_len, args.head_dim)
        self.model = GPT(self.cfg)
        self.model.init_weights(0)
        self.optimizers = Optimizers(self.model, OptimConfig())
        gen = torch.Generator().manual_seed(depth)
        for step in range(2):  # real steps: AdamW moments and Muon momentum exist and are non-trivial
            x, y = (torch.randint(args.vocab_size, (2, 64), generator=gen) for _ in "xy")
            self.model(x, y).backward()
            self.optimizers.step(1.0, 0.85 + 0.05 * step)
            self.optimizers.zero_grad()
        self.target = GPT(self.cfg)
        self.target_opt = Optimizers(self.target, OptimConfig())
        self.ours_dir = root / f"d{depth}_ours"
        self.plain_dir = root / f"d{depth}_plain"
        self.plain_dir.mkdir(parents=True)
        self.step = 0
        self.meta = {
            "num_iterations": 1000,
            "final": False,
            "stop_reason": "periodic",
            "model_config": self.cfg.to_dict(),
            "train_config": {f"setting_{i}": i for i in range(40)},  # base_train's TrainConfig has ~35 fields
            "world_size": 1,
            "smooth_loss": 5.0,
            "train_time": 100.0,
            "torch_version": torch.__version__,
        }
        self.rank_state = {
            "loader": {
                "version": 1,
                "split": "train",
                "rank": 0,
                "world_size": 1,
                "seed": 0,
                "num_units": 23,
                "batch_size": 8,
                "seq_len": 512,
                "epoch": 0,
                "unit": 3,
                "shard": 1,
                "row_group": 4,
                "doc": 17,
                "offset": 123,
            },
            "rng": {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
        }

    def states(self) -> tuple[dict, dict]:
        return self.model.state_dict(), self.optimizers.state_dict()

    @property
    def plain_paths(self) -> list[Path]:
        return [self.plain_dir / "model.pt", self.plain_dir / "optim.pt"]

    def ours_paths(self) -> list[Path]:
        from nanochat.checkpoint import file_name

        return [self.ours_dir / file_name(k, self.step) for k in ("model", "optim")]


def quiet(_msg: str) -> None:
    pass


def run_arm(arm: str, s: Subject, saver) -> tuple[float, object, float]:
    """Run one arm once: (seconds, loaded states or None, seconds of it spent finding + verifying).

    Loading into the target model (apply) is timed separately."""
    import torch

    from nanochat import checkpoint

    if arm == "save ours":
        acc = instrumented_save(s, saver)
        return acc["total"], acc, 0.0
    if arm == "save plain":
        model_state, optim_state = s.states()
        t0 = time.perf_counter()
        for state, path in zip((model_state, optim_state), s.plain_paths):
            torch.save(state, path)
        for path in s.plain_paths:
            checkpoint.fsync_path(path)
        return time.perf_counter() - t0, None, 0.0
    if arm == "verify":
        t0 = time.perf_counter()
        ckpt = checkpoint.inspect(s.ours_dir, s.step, verify=True)
        dt = time.perf_counter() - t0
        assert ckpt.valid, ckpt.problem
        return dt, None, dt
    if arm == "load ours":
        t0 = time.perf_counter()
        ckpt = checkpoint.find_latest_valid(s.ours_dir, warn=quiet)
        t_found = time.perf_counter() - t0
        states = checkpoint.load(s.ours_dir, ckpt)
        dt = time.perf_counter() - t0
        assert ckpt.step == s.step
        return dt, states, t_found
    if arm == "load plain":
        t0 = time.perf_counter()
        states = tuple(torch.load(p, map_location="cpu", weights_only=True) for p in s.ours_paths())
        return time.perf_counter() - t0, states, 0.0
    raise ValueError(arm)


def apply(s: Subject, states) -> float:
    t0 = time.perf_counter()
    s.target.load_state_dict(states[0])
    s.target_opt.load_state_dict(states[1])
    dt = time.perf_counter() - t0
    # drop the loaded optimizer tensors: mmap-backed ones would pin the files' pages (and defeat evict())
    for opt in (s.target_opt.adamw, s.target_opt.muon):
        opt.state.clear()
    return dt


def instrumented_save(s: Subject, saver) -> dict:
    """One save ours, attributing its time: os.fsync, zlib.crc32 while writing, nanochat.checkpoint.file_crc32
    (re-reading and checksumming files already on disk, e.g. pruning's verification) and os.unlink (pruning).

    The hooks are patched in for this call only; they add a few microseconds per call (a few hundred calls)."""
    from nanochat import checkpoint

    real = {"fsync": os.fsync, "crc": zlib.crc32, "reverify": checkpoint.file_crc32, "unlink": os.unlink}
    acc = {k: 0.0 for k in real} | {f"{k}_n": 0 for k in real}
    inside = [False]

    def timed(key):
        def wrapper(*a, **k):
            if key == "crc" and inside[0]:  # crc32 inside file_crc32 counts as re-verification
                return real[key](*a, **k)
            inside[0] = inside[0] or key == "reverify"
            t0 = time.perf_counter()
            try:
                return real[key](*a, **k)
            finally:
                acc[key] += time.perf_counter() - t0
                acc[f"{key}_n"] += 1
                if key == "reverify":
                    inside[0] = False

        return wrapper

    s.step += 1
    model_state, optim_state = s.states()
    os.fsync, zlib.crc32, checkpoint.file_crc32, os.unlink = (timed(k) for k in real)  # Path.unlink: os.unlink
    try:
        t0 = time.perf_counter()
        saver.save(s.step, model_state, optim_state, s.meta, s.rank_state)
        acc["total"] = time.perf_counter() - t0
    finally:
        os.fsync, zlib.crc32, checkpoint.file_crc32, os.unlink = real.values()
    acc["rest"] = acc["total"] - acc["fsync"] - acc["crc"] - acc["reverify"] - acc["unlink"]
    return acc


def main(argv: list[str] | None = None) -> int:
    from scripts.bench_train import busy_jiffies, fmt_table, median, section

    p = argparse.ArgumentParser(
        prog="python -m scripts.bench_checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="depths 2 and 4, 5 repetitions")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="default 2 4 8 (--quick: 2 4)")
    p.add_argument("--reps", type=int, default=None, help="measured repetitions (default 7, --quick 5; min 5)")
    p.add_argument("--vocab_size", type=int, default=32768)
    p.add_argument("--seq_len", type=int, default=512, help="only sizes the (unsaved) rotary tables")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no_cold", action="store_true", help="skip the cold-cache (evicted) load arms")
    p.add_argument("--dir", help="where to write (default: a temp dir under $TMPDIR); removed afterwards")
    args = p.parse_args(argv)
    args.depths = args.depths or ([2, 4] if args.quick else [2, 4, 8])
    args.reps = args.reps or (5 if args.quick else 7)
    if args.reps < 5:
        p.error("--reps must be at least 5")
    set_threads(args.threads)
    import torch

    from nanochat.checkpoint import Saver, _nbytes

    t_start = time.time()
    load0 = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt.", dir=args.dir))
    try:
        section("setup")
        subjects = [Subject(d, args, root) for d in args.depths]
        savers = {}
        for s in subjects:
            savers[s.depth] = Saver(s.ours_dir, keep=3, warn=quiet, log=quiet)
            savers[s.depth].start()
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {root} "
            f"({shutil.disk_usage(root).free / 1e9:.0f} GB free); zlib {zlib.ZLIB_RUNTIME_VERSION}"
        )
        rows = []
        for s in subjects:
            ms, os_ = s.states()
            rows.append(
                [
                    f"d{s.depth}",
                    s.cfg.n_embd,
                    s.cfg.vocab_size,
                    f"{s.model.num_params() / 1e6:.1f}M",
                    f"{_nbytes(ms) / 1e6:.0f}",
                    f"{_nbytes(os_) / 1e6:.0f}",
                ]
            )
        print(fmt_table(["depth", "width", "vocab", "params", "model MB", "optim MB"], rows))

        load_arms = [*ARMS_LOAD] + ([] if args.no_cold else [f"{a} cold" for a in ARMS_LOAD])
        arms = [*ARMS_SAVE, *load_arms]
        times: dict[tuple[int, str], list[float]] = {(s.depth, a): [] for s in subjects for a in arms}
        applied: dict[tuple[int, str], list[float]] = {(s.depth, a): [] for s in subjects for a in arms}
        found: dict[tuple[int, str], list[float]] = {(s.depth, a): [] for s in subjects for a in arms}
        parts: dict[int, list[dict]] = {s.depth: [] for s in subjects}
        other: list[float] = []
        hz = os.sysconf("SC_CLK_TCK")
        section(f"measuring: 1 warm-up + {args.reps} repetitions, arm order alternating")
        for rep in range(args.reps + 1):
            t_rep = time.perf_counter()
            b0, c0 = busy_jiffies()[0], time.process_time()
            flip = rep % 2 == 1
            for s in subjects:
                for arm in ARMS_SAVE[::-1] if flip else ARMS_SAVE:
                    dt, acc, _ = run_arm(arm, s, savers[s.depth])
                    if rep:
                        times[(s.depth, arm)].append(dt)
                        if acc is not None:
                            parts[s.depth].append(acc)
                for arm in load_arms[::-1] if flip else load_arms:
                    base = arm.removesuffix(" cold")
                    if arm.endswith(" cold"):
                        evict(s.ours_paths())
                    dt, states, t_found = run_arm(base, s, savers[s.depth])
                    dt_apply = apply(s, states) if states is not None else 0.0
                    del states
                    gc.collect()
                    if rep:
                        times[(s.depth, arm)].append(dt)
                        applied[(s.depth, arm)].append(dt + dt_apply)
                        found[(s.depth, arm)].append(t_found / dt)
            dt_rep = time.perf_counter() - t_rep
            ours_cpu = time.process_time() - c0
            if rep:
                other.append(max(0.0, (busy_jiffies()[0] - b0) / hz - ours_cpu) / dt_rep)
            label = "warm-up" if rep == 0 else f"rep {rep}/{args.reps}"
            print(f"{label}: {dt_rep:.1f}s, other programs used {other[-1] if rep else 0:.2f} cores", flush=True)

        section("medians, seconds (MB/s of checkpoint bytes in brackets)")
        rows = []
        for s in subjects:
            size_ours = sum(p.stat().st_size for p in s.ours_paths())
            size_plain = sum(p.stat().st_size for p in s.plain_paths)
            row = [f"d{s.depth}", f"{size_ours / 1e6:.1f}", f"{size_plain / 1e6:.1f}"]
            for a in arms:
                m = median(times[(s.depth, a)])
                row.append(f"{m:.3f} ({size_ours / 1e6 / m:,.0f})")
            rows.append(row)
        print(fmt_table(["depth", "MB ours", "MB plain", *arms], rows))
        section("ratios and shares (medians)")
        rows = []
        for s in subjects:
            m = {a: median(times[(s.depth, a)]) for a in arms}
            ma = {a: median(applied[(s.depth, a)]) for a in load_arms if applied[(s.depth, a)]}
            row = [
                f"d{s.depth}",
                f"{m['save ours'] / m['save plain']:.2f}x",
                f"{m['load ours'] / m['load plain']:.2f}x",
                f"{ma['load ours'] / ma['load plain']:.2f}x",
                f"{100 * median(found[(s.depth, 'load ours')]):.0f}%",
            ]
            if not args.no_cold:
                row += [
                    f"{m['load ours cold'] / m['load plain cold']:.2f}x",
                    f"{ma['load ours cold'] / ma['load plain cold']:.2f}x",
                    f"{100 * median(found[(s.depth, 'load ours cold')]):.0f}%",
                ]
            rows.append(row)
        heads = ["depth", "save ours/plain", "load ours/plain", "+apply ours/plain", "verify share of load"]
        if not args.no_cold:
            heads += ["cold load o/p", "cold +apply o/p", "cold verify share"]
        print(fmt_table(heads, rows))
        print(
            "load = the call returns; +apply = then load_state_dict into a model and Optimizers (a resume).\n"
            "ours loads with mmap=True: the optimizer tensors stay file-backed after apply (no copy), while\n"
            "plain torch.load has read everything into memory. verify share: the part of load ours spent in\n"
            "find_latest_valid (verifying the CRC32s), measured inside the same call."
        )

        section("where our save goes (medians over the measured saves)")
        rows = []
        for s in subjects:
            b = {k: median([acc[k] for acc in parts[s.depth]]) for k in parts[s.depth][0]}
            size = sum(p.stat().st_size for p in s.ours_paths())
            rows.append(
                [
                    f"d{s.depth}",
                    f"{b['total']:.3f}",
                    f"{b['fsync']:.3f} ({b['fsync_n']:.0f})",
                    f"{b['crc']:.3f} ({size / 1e6 / max(b['crc'], 1e-9):,.0f} MB/s)",
                    f"{b['reverify']:.3f} ({b['reverify_n']:.0f})",
                    f"{b['unlink']:.3f} ({b['unlink_n']:.0f})",
                    f"{b['rest']:.3f}",
                    f"{median(times[(s.depth, 'save plain')]):.3f}",
                ]
            )
        heads = ["depth", "total s", "fsync s (calls)", "crc32 while writing", "re-read+crc32 s (files)"]
        print(fmt_table([*heads, "unlink s (files)", "rest s", "save plain s"], rows))
        print(
            "re-read+crc32: nanochat.checkpoint.file_crc32 inside the save (pruning verifying the checkpoint it is\n"
            "about to delete, where it does). unlink: pruning. rest: serialisation, write() calls, renames, meta and\n"
            "latest marker. Each column is its own median, so they need not add up to the total."
        )
        print(
            f"\nload average (1 min) at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}; "
            f"other programs used {median(other):.2f} cores (median over repetitions); "
            f"total wall time {time.time() - t_start:.0f}s"
        )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
