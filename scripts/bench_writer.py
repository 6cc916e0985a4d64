"""How fast do we write and read a checkpoint file? Our writer against torch.save and safetensors, side by side.

    python -m scripts.bench_writer              # a d20-sized state (~5 GB with optimizer), 2 rounds (~3 minutes)
    python -m scripts.bench_writer --depth 8    # smaller

A benchmark, never a test. The state is real: a GPT of that depth with its Muon + AdamW state after one step
(random gradients). Each arm writes model + optimizer state to fresh files and fsyncs them; files are deleted
and the page cache flushed (os.sync) between arms, untimed; the arm order alternates between rounds.

  torch.save         torch.save(state, path) + fsync: torch computes a CRC32 of every record
  torch.save no-crc  the same with torch.serialization.set_crc32_options(False)
  safetensors        safetensors.torch.save_file of the flattened states + fsync (pip install safetensors)
  ours               nanochat.checkpoint.write: temp file, xxh3-64 while writing, fsync, rename, meta (commit)
  raw bytes          every tensor's bytes written with file.write + fsync: the floor for any format

Then where the time goes (checksums over the same bytes in memory), and loading: ours (verify checksums,
torch.load mmap=True, load into a model and optimizer) against plain torch.load, with the files in page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import xxhash

from nanochat import checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import OptimConfig, Optimizers


def flat(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, val in items for k, v in flat(val, f"{prefix}{key}.").items()}


def build(depth: int, vocab: int) -> tuple[GPT, Optimizers]:
    model = GPT(GPTConfig.from_depth(depth, vocab, 64))
    model.init_weights(0)
    optimizers = Optimizers(model, OptimConfig())
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizers.step(1.0, 0.95)  # AdamW moments and Muon momentum exist
    optimizers.zero_grad()
    return model, optimizers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_writer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", help="where to write (default $TMPDIR)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    t0 = time.perf_counter()
    model, optimizers = build(args.depth, args.vocab_size)
    states = {"model": model.state_dict(), "optim": optimizers.state_dict()}
    flats = {k: flat(v) for k, v in states.items()}
    size = sum(t.numel() * t.element_size() for f in flats.values() for t in f.values())
    print(f"depth {args.depth}: {model.num_params() / 1e6:.0f}M parameters, state {size / 1e9:.2f} GB "
          f"(model + optimizer), built in {time.perf_counter() - t0:.0f}s; torch {torch.__version__}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="bench_writer.", dir=args.dir))

    def torch_save(crc: bool) -> None:
        checkpoint_files = []
        torch.serialization.set_crc32_options(crc)
        try:
            for k, state in states.items():
                torch.save(state, root / f"{k}.pt")
                checkpoint_files.append(root / f"{k}.pt")
        finally:
            torch.serialization.set_crc32_options(True)
        for path in checkpoint_files:
            checkpoint.fsync_path(path)

    def safetensors() -> None:
        for k, f in flats.items():
            save_file({n: t.contiguous() for n, t in f.items()}, str(root / f"{k}.safetensors"))
            checkpoint.fsync_path(root / f"{k}.safetensors")

    def ours() -> None:
        checkpoint.write(root, 1, states["model"], states["optim"], {})

    def raw() -> None:
        for k, f in flats.items():
            with open(root / f"{k}.bin", "wb") as fh:
                for t in f.values():
                    fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                fh.flush()
                os.fsync(fh.fileno())

    arms = {"torch.save": lambda: torch_save(True), "torch.save no-crc": lambda: torch_save(False)}
    if save_file is not None:
        arms["safetensors"] = safetensors
    arms |= {"ours": ours, "raw bytes": raw}
    times: dict[str, list[float]] = {a: [] for a in arms}
    try:
        for r in range(args.rounds):
            for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
                shutil.rmtree(root)
                root.mkdir()
                os.sync()
                t0 = time.perf_counter()
                arms[name]()
                times[name].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name:18s} {times[name][-1]:6.2f}s", flush=True)
        best = min(statistics.median(times[a]) for a in ("torch.save", "safetensors") if a in times)
        print(f"\nwrite + fsync of {size / 1e9:.2f} GB, median of {args.rounds} rounds")
        print(f"{'arm':20s}{'seconds':>10}{'GB/s':>8}{'vs torch.save':>15}{'vs faster of torch.save/safetensors':>37}")
        for name in arms:
            m = statistics.median(times[name])
            base = statistics.median(times["torch.save"])
            print(f"{name:20s}{m:10.2f}{size / 1e9 / m:8.2f}{m / base:14.2f}x{m / best:36.2f}x")
        if save_file is None:
            print("(safetensors not installed: pip install safetensors, or pip install -e '.[bench]')")

        print("\nwhere the time goes: checksums of the same bytes, in memory, one thread")
        views = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for f in flats.values() for t in f.values()]
        for name, fn in (("zlib.crc32 (what torch and our old writer used)", lambda v, c: zlib.crc32(v, c)),
                         ("xxh3-64 (ours)", None)):  # fmt: skip
            t0 = time.perf_counter()
            if fn is None:
                h = xxhash.xxh3_64()
                for v in views:
                    h.update(v)
            else:
                c = 0
                for v in views:
                    c = fn(v, c)
            dt = time.perf_counter() - t0
            print(f"  {name:50s} {dt:6.2f}s  {size / 1e9 / dt:6.2f} GB/s")

        print("\nloading the files just written (page cache warm), median of 3")
        shutil.rmtree(root)
        root.mkdir()
        ours()
        checkpoint.mark_latest(root, 1)
        target, target_opt = GPT(model.config), None
        target_opt = Optimizers(target, OptimConfig())
        rows = {"verify (checksums)": [], "ours: verify + load + apply": [], "torch.load + apply": []}
        for _ in range(3):
            t0 = time.perf_counter()
            ckpt = checkpoint.find_latest_valid(root, print)
            rows["verify (checksums)"].append(time.perf_counter() - t0)
            m, o = checkpoint.load(root, ckpt)
            target.load_state_dict(m)
            target_opt.load_state_dict(o)
            rows["ours: verify + load + apply"].append(time.perf_counter() - t0)
            del m, o
            t0 = time.perf_counter()
            m = torch.load(root / checkpoint.file_name("model", 1), weights_only=True)
            o = torch.load(root / checkpoint.file_name("optim", 1), weights_only=True)
            target.load_state_dict(m)
            target_opt.load_state_dict(o)
            rows["torch.load + apply"].append(time.perf_counter() - t0)
            del m, o
        for name, ts in rows.items():
            print(f"  {name:32s} {statistics.median(ts):6.2f}s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
