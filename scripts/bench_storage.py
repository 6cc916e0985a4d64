"""What do checkpoint files cost to store and move? Measured on a real trained state, side by side in one run.

    python -m scripts.bench_storage                    # trains depth 4 for 200 steps first (~2-4 minutes on 2 cores)
    python -m scripts.bench_storage --ckpt DIR         # the newest valid checkpoint in DIR instead (any codec)

A benchmark, never a test: it prints numbers and asserts nothing about speed. The state comes from the project's
own trainer (scripts.base_train on the built-in corpus with a freshly trained tokenizer, in a temp base dir), so
the weights and optimizer moments have the statistics of a real run. Sections:

budget: a d20 checkpoint's size from the real shapes; after the compression section, the disk use at keep 3 of
  each design in the README's table (--keep_optim_last_n, + zstd at the measured ratios, bf16 older weights,
  one local checkpoint plus remote copies).
compression: every candidate codec on the model file's state and on the optimizer file's state: ratio (raw tensor
  bytes / compressed bytes), and compress and decompress speed in raw MB/s with 1 thread and with all threads,
  the best of --reps runs. "file" candidates compress the torch.save file as it is, in one zstd frame (so their
  decompression is one thread whatever the setting); "nanochat" is nanochat/compress.py (byte planes, chunked
  frames), whose decompression is the real load path (a page-cached file into tensors); blosc2 candidates (if
  python-blosc2 is installed) compress each tensor with blosc2's SIMD shuffle filters. Then what the chosen codec
  does to the time a checkpoint takes to write or send, at a few bandwidths.
remote: against a real S3 API on localhost (moto in server mode, s3fs as the client, as tests/test_remote.py):
  upload and download throughput of the checkpoint, plain and compressed; the training step time with uploads in
  flight against a run without a remote (median over the steps of each, the two runs back to back, --remote_steps
  steps, a checkpoint every 5); the start-up of a resume (to its first step) from the local checkpoint against a
  fresh machine's (an empty checkpoint dir: the checkpoint is downloaded and verified first).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zstandard

from nanochat import checkpoint, compress
from nanochat.saver import tensors

# ----------------------------------------------------------------------------------------------------------------
# the state: a short real training run


def train_state(args: argparse.Namespace, tmp: Path) -> Path:
    """Corpus, tokenizer and a depth-`args.depth` run of `args.steps` steps; returns its checkpoint dir."""
    from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    base, out = tmp / "base", tmp / "ckpt"
    t0 = time.perf_counter()
    write_builtin_corpus(data_dir(base), num_shards=3, max_docs=2000, seed=0)
    train, _ = train_val_shards(data_dir(base))
    Tokenizer.train(iter_texts(train, max_chars=4_000_000), args.vocab_size).save(tokenizer_dir(base))
    cmd = [sys.executable, "-m", "scripts.base_train", f"--depth={args.depth}", "--head_dim=64", "--max_seq_len=256",
           "--device_batch_size=4", "--total_batch_size=-1", f"--num_iterations={args.steps}", "--eval_every=-1",
           "--eval_tokens=1024", "--save_every=0", "--sample_every=-1", "--log_every=50", f"--checkpoint_dir={out}",
           "--resume=False"]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": str(compress.all_threads())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"base_train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    print(f"trained depth {args.depth} for {args.steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def load_states(directory: Path) -> dict[str, dict]:
    ckpt = checkpoint.find_latest_valid(directory)
    if ckpt is None:
        sys.exit(f"no valid checkpoint in {directory}")
    print(f"checkpoint {directory} step {ckpt.step}")
    return {kind: compress.load(directory / checkpoint.file_name(kind, ckpt.step)) for kind in checkpoint.KINDS}


# ----------------------------------------------------------------------------------------------------------------
# compression

DEFAULT = f"nanochat zstd-{compress.DEFAULT_LEVEL}  <- default"


class Sink:
    """A writer that only counts bytes: compression speed without the cost of storing the output."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes


def best(fn: Callable[[], object], reps: int, budget: float = 1.0) -> float:
    """The fastest of up to `reps` runs (fewer if they take more than `budget` seconds in all)."""
    times: list[float] = []
    while len(times) < reps and (not times or sum(times) < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def file_zstd(level: int):
    """zstd over the torch.save file, as one frame (zstd's own threads split the compression only)."""

    def measure(state: dict, threads: int, reps: int, tmp: Path) -> tuple[int, float, float]:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        zc = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
        out = zc.compress(data)
        return len(out), best(lambda: zc.compress(data), reps), best(lambda: zstandard.decompress(out), reps)

    return measure


def nanochat_zstd(level: int, group: bool = True):
    def measure(state: dict, threads: int, reps: int, tmp: Path) -> tuple[int, float, float]:
        path = tmp / "nanochat.z"
        with open(path, "wb") as f:
            compress.dump(state, f, level=level, threads=threads, group=group)
        back = compress.load(path, threads=threads)
        for a, b in zip(tensors(state), tensors(back)):  # lossless, or the numbers mean nothing
            assert a.dtype == b.dtype and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
        ct = best(lambda: compress.dump(state, Sink(), level=level, threads=threads, group=group), reps)
        return path.stat().st_size, ct, best(lambda: compress.load(path, threads=threads), reps)

    return measure


def blosc2_codec(codec: str, filters: tuple[str, ...], level: int):
    """python-blosc2 on each tensor's bytes (one call per tensor: blosc2 splits it into blocks and threads)."""

    def measure(state: dict, threads: int, reps: int, tmp: Path) -> tuple[int, float, float]:
        import blosc2

        kw = {"codec": getattr(blosc2.Codec, codec), "filters": [getattr(blosc2.Filter, f) for f in filters],
              "clevel": level, "nthreads": threads}  # fmt: skip
        arrays = [(t.contiguous().reshape(-1).view(torch.uint8).numpy(), t.element_size()) for t in tensors(state)]
        comp = lambda: [blosc2.compress2(a, typesize=k, **kw) for a, k in arrays]  # noqa: E731
        out = comp()
        decomp = lambda: [blosc2.decompress2(c, nthreads=threads) for c in out]  # noqa: E731
        return sum(len(c) for c in out), best(comp, reps), best(decomp, reps)

    return measure


def candidates() -> list[tuple[str, Callable]]:
    found = [
        ("zstd-1 file (plain)", file_zstd(1)),
        ("zstd-3 file (plain)", file_zstd(3)),
        ("nanochat zstd-1 no planes", nanochat_zstd(1, group=False)),
        (DEFAULT, nanochat_zstd(compress.DEFAULT_LEVEL)),
        ("nanochat zstd-3", nanochat_zstd(3)),
        ("nanochat zstd-9", nanochat_zstd(9)),
    ]
    try:
        import blosc2  # noqa: F401
    except ImportError:
        print("python-blosc2 is not installed: its candidates are skipped (pip install blosc2)")
        return found
    return found + [
        ("blosc2 shuffle+zstd-1", blosc2_codec("ZSTD", ("SHUFFLE",), 1)),
        ("blosc2 shuffle+zstd-5", blosc2_codec("ZSTD", ("SHUFFLE",), 5)),
        ("blosc2 shuffle+bytedelta+zstd-1", blosc2_codec("ZSTD", ("SHUFFLE", "BYTEDELTA"), 1)),
        ("blosc2 bitshuffle+zstd-1", blosc2_codec("ZSTD", ("BITSHUFFLE",), 1)),
        ("blosc2 shuffle+lz4-5", blosc2_codec("LZ4", ("SHUFFLE",), 5)),
        ("blosc2 bitshuffle+lz4-5", blosc2_codec("LZ4", ("BITSHUFFLE",), 5)),
    ]


def compression_section(states: dict[str, dict], reps: int, n: int, tmp: Path) -> dict[str, dict]:
    raw = {kind: sum(t.numel() * t.element_size() for t in tensors(s)) for kind, s in states.items()}
    arms = candidates()
    print(f"\n== compression: model {raw['model'] / 1e6:.1f} MB, optimizer {raw['optim'] / 1e6:.1f} MB of tensors;"
          f" speeds in raw MB/s over both files, best of {reps}, 1 thread and {n} threads ==")  # fmt: skip
    head = ("candidate", "model x", "optim x", "comp 1t", f"comp {n}t", "dec 1t", f"dec {n}t")
    print(f"{head[0]:32s}" + "".join(f"{h:>9s}" for h in head[1:]), flush=True)
    results = {}
    for name, measure in arms:
        row: dict = {"comp": {}, "dec": {}}
        for threads in (1, n):
            sizes, ct, dt = {}, 0.0, 0.0
            for kind, state in states.items():
                sizes[kind], c, d = measure(state, threads, reps, tmp)
                ct, dt = ct + c, dt + d
            row["comp"][threads], row["dec"][threads] = sum(raw.values()) / ct / 1e6, sum(raw.values()) / dt / 1e6
        row["ratio"] = {kind: raw[kind] / sizes[kind] for kind in states}
        row["ratio"]["all"] = sum(raw.values()) / sum(sizes.values())
        results[name] = row
        cells = [f"{row['ratio']['model']:.3f}", f"{row['ratio']['optim']:.3f}"]
        cells += [f"{row[what][t]:.0f}" for what in ("comp", "dec") for t in (1, n)]
        print(f"{name:32s}" + "".join(f"{c:>9s}" for c in cells), flush=True)
    return results


def tradeoff(row: dict, n: int) -> None:
    """What the default codec does to the time a checkpoint takes to write (or upload) and to read back (or
    download and load), per GB of state, at a few bandwidths: compression then I/O one after the other ("seq",
    as through a temp file), or overlapped ("stream": frames go out while the next chunks compress)."""
    r, c1, cn, dn = row["ratio"]["all"], row["comp"][1], row["comp"][n], row["dec"][n]
    print(f"\n== default codec (ratio {r:.3f}) against none: seconds per GB of state, compressed on 1 or {n} threads")
    head = ("none", "seq 1t", f"seq {n}t", f"stream {n}t", "read none", f"read {n}t")
    print(f"{'disk or link':30s}" + "".join(f"{h:>11s}" for h in head))
    for label, mbps in (("local NVMe ~2000 MB/s", 2000), ("network disk ~500 MB/s", 500),
                        ("remote 10 Gbit/s ~1100 MB/s", 1100), ("remote 1 Gbit/s ~110 MB/s", 110),
                        ("remote 200 Mbit/s ~22 MB/s", 22)):  # fmt: skip
        io_s = 1000 / mbps
        cells = (io_s, 1000 / c1 + io_s / r, 1000 / cn + io_s / r, max(1000 / cn, io_s / r), io_s, 1000 / dn + io_s / r)
        print(f"{label:30s}" + "".join(f"{x:11.2f}" for x in cells))
    # one after the other, compressing pays off at B MB/s when 1/c + 1/(r B) < 1/B, i.e. B < c (1 - 1/r);
    # overlapped, when max(1/c, 1/(r B)) < 1/B, i.e. B < c
    print(f"compression saves time below {c1 * (1 - 1 / r):.0f} MB/s (seq, 1 thread), {cn * (1 - 1 / r):.0f} MB/s"
          f" (seq, {n}), {cn:.0f} MB/s (stream, {n}); it saves {100 * (1 - 1 / r):.0f}% of the bytes")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the disk budget of a d20 run (README, "Disk budget"), from the real shapes of its state


def budget_section(depth: int = 20) -> tuple[int, int]:
    """A d20 checkpoint's sizes from the real shapes: (fp32 weights, optimizer state) in bytes."""
    from nanochat.gpt import GPT, GPTConfig

    with torch.device("meta"):  # shapes only, nothing allocated
        model = GPT(GPTConfig.from_depth(depth, 65536, 2048))
    n, matrices = model.num_params(), sum(p.numel() for p in model.matrix_params())
    weights, optim = 4 * n, 4 * (2 * (n - matrices) + matrices)  # fp32; AdamW: 2 moments, Muon: 1 momentum
    print(f"\n== disk budget, d{depth}: {n / 1e6:.0f}M parameters, {weights / 1e9:.2f} GB fp32 weights +"
          f" {optim / 1e9:.2f} GB optimizer state = {(weights + optim) / 1e9:.2f} GB per full checkpoint")  # fmt: skip
    return weights, optim


def budget_designs(weights: int, optim: int, ratio: dict[str, float], keep: int = 3) -> None:
    """The README's table of designs for keep `keep`: disk use, with the default codec's measured ratios."""
    full, zw, zo = weights + optim, weights / ratio["model"], optim / ratio["optim"]
    rows = [(f"--keep_optim_last_n={k}", k * full + (keep - k) * weights) for k in range(keep, 0, -1)]
    rows += [("--keep_optim_last_n=1 + --compress=zstd", zw + zo + (keep - 1) * zw),
             ("older weights in bf16 (not built)", full + (keep - 1) * weights / 2),
             ("--keep_last_n_checkpoints=1 + --remote_dir (local disk)", full)]  # fmt: skip
    print(f"\n== disk budget designs, keep {keep} (zstd at this run's measured ratios: model"
          f" {ratio['model']:.3f}x, optimizer {ratio['optim']:.3f}x)")  # fmt: skip
    for label, total in rows:
        print(f"{label:56s} {total / 1e9:5.1f} GB")


# ----------------------------------------------------------------------------------------------------------------
# remote: a moto S3 server on localhost


def moto_server(tmp: Path) -> tuple[subprocess.Popen, dict]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    os.environ.update(env)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, env


def transfer_section(ckpt_dir: Path, tmp: Path) -> None:
    from nanochat.remote import open_remote

    ckpt = checkpoint.find_latest_valid(ckpt_dir)
    model, optim = (compress.load(ckpt_dir / checkpoint.file_name(k, ckpt.step)) for k in checkpoint.KINDS)
    remote = open_remote("s3://bench")
    remote.fs.mkdir("bench")
    print("\nremote (moto S3 on localhost)     size MB   upload MB/s   download+verify MB/s")
    for codec in ("none", "zstd"):
        local = tmp / f"local-{codec}"
        checkpoint.make_dir(local)
        checkpoint.write(local, ckpt.step, model, optim, ckpt.meta, codec=codec, threads=compress.all_threads())
        size = sum(p.stat().st_size for p in local.glob("*.pt")) / 1e6
        r = open_remote(f"s3://bench/{codec}")
        t0 = time.perf_counter()
        r.upload(local, ckpt.step)
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        r.download(ckpt.step, tmp / f"down-{codec}", dict(r.committed())[ckpt.step])
        down = time.perf_counter() - t0
        print(f"  {codec:<31}{size:>8.1f}{size / up:>14.0f}{size / down:>23.0f}")


def step_times(out: str) -> list[float]:
    import re

    return [float(m) for m in re.findall(r"\| dt (\d+)ms", out)][1:]  # the first step warms up


def training_section(args: argparse.Namespace, base: Path, env_s3: dict) -> None:
    import re
    import shutil
    import statistics

    env = {**os.environ, **env_s3, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "scripts.base_train", f"--depth={args.depth}", "--head_dim=64",
              "--max_seq_len=256", "--device_batch_size=4", "--total_batch_size=-1", "--eval_every=-1",
              "--eval_tokens=1024", "--sample_every=-1", "--save_every=5", "--keep_last_n_checkpoints=2"]  # fmt: skip

    def run(d: Path, *extra: str) -> str:
        proc = subprocess.run([*common, f"--checkpoint_dir={d}", *extra], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"base_train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc.stdout

    n = f"--num_iterations={args.remote_steps}"
    plain = step_times(run(base / "plain", n, "--resume=False"))
    url = "s3://bench/train"
    uploading = run(base / "remote", n, "--resume=False", f"--remote_dir={url}")
    with_remote = step_times(uploading)
    uploads = len(re.findall(r"uploaded step", uploading))
    a, b = statistics.median(plain), statistics.median(with_remote)
    print(f"\ntraining step, depth {args.depth}, a checkpoint every 5 steps: median {a:.0f} ms without a remote,"
          f" {b:.0f} ms with uploads to S3 in flight ({uploads} uploads, compressed): {b / a:.3f}x")  # fmt: skip
    more = f"--num_iterations={args.remote_steps + 1}"
    local = run(base / "remote", more)
    shutil.rmtree(base / "remote")  # a fresh machine: only the bucket is left
    fresh = run(base / "remote", more, f"--remote_dir={url}")
    start = lambda out: float(re.search(r"startup: .*; ([\d.]+)s in all", out).group(1))  # noqa: E731
    print(f"start-up to the first step: local resume {start(local):.2f}s, fresh machine (download + verify + resume)"
          f" {start(fresh):.2f}s: {start(fresh) / start(local):.2f}x")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_storage", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ckpt", help="measure the newest valid checkpoint in this dir instead of training one")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (the best counts)")
    p.add_argument("--threads", type=int, default=compress.all_threads(), help="the 'all threads' arm (default: all)")
    p.add_argument(
        "--remote_steps",
        type=int,
        default=60,
        help="steps of each training run with and without a remote"
        " (0: skip the remote section; it needs moto[server] and s3fs, in the test extra)",
    )
    args = p.parse_args(argv)
    t_start, load0 = time.time(), os.getloadavg()[0]
    sizes = budget_section()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # decompression from memory, not a slow disk
    with tempfile.TemporaryDirectory(prefix="bench_storage.") as t, tempfile.TemporaryDirectory(dir=shm) as scratch:
        states = load_states(Path(args.ckpt) if args.ckpt else train_state(args, Path(t)))
        results = compression_section(states, args.reps, args.threads, Path(scratch))
        tradeoff(results[DEFAULT], args.threads)
        budget_designs(*sizes, results[DEFAULT]["ratio"])
        if args.remote_steps:
            server, env_s3 = moto_server(Path(t))
            try:
                transfer_section(Path(args.ckpt) if args.ckpt else Path(t) / "ckpt", Path(t) / "transfer")
                if not args.ckpt:
                    training_section(args, Path(t) / "base", env_s3)
            finally:
                server.terminate()
    print(f"\nload average at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}; wall {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
