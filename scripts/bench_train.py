"""Benchmark real training steps on CPU: tokens/s and step time, 1 vs 2 processes, eager vs torch.compile.

    python -m scripts.bench_train            # full run (~6 minutes on a 2-core machine)
    python -m scripts.bench_train --quick    # no upstream arms, fewer rounds (~2 minutes)
    python -m scripts.bench_train --profile  # also print torch.profiler top ops and a data-loader cProfile

A benchmark, never a test. Every measured step is the code path scripts/base_train.py runs (grad_accum = 1):
DataLoader.next_batch, forward, (loss / grad_accum).backward(), Optimizers.step(lr_multiplier, muon_momentum),
Optimizers.zero_grad, loss.item(). The only additions are perf_counter calls around those calls and around
average_gradients / AdamW.step / Muon.step (wrapped in place, to attribute the optimizer's time).

Arms (every arm is measured in every round; rounds alternate the arm order, so machine noise hits all arms
alike; ratios are also given as the median of per-round ratios):
  d{N} 1p           one plain process, 2 threads
  d{N} 2p           torch.distributed.run --standalone --nproc_per_node=2 (gloo), 1 thread per process;
                    tokens/s is the aggregate of both ranks
  d{N} 1p compiled  the same model wrapped as base_train does: torch.compile(model, dynamic=False)
  d{N} 1p glibc-malloc  eager, in a third worker that skips base_train's nanochat.common.keep_freed_memory()
                    (glibc's default: big blocks are mmapped and unmapped every step, so every step faults
                    fresh pages in): what that setting buys. The other workers set malloc up as base_train does.
                    (Not for the upstream config. To see any config under another allocator, run the whole
                    benchmark under it, e.g. LD_PRELOAD=.../libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1.)
  upstream          depth 4, head_dim 64, seq 512, batch 8, vocab 32768, fp32, eager and compiled, against the
                    numbers upstream nanochat logged on this class of machine (~650 tok/s eager, ~1,400 compiled)

Workers are long-lived processes (the 2-process job and the two 1-process jobs are started once, one after
the other, then idle between commands), so process start-up, data setup and compilation are never inside a
measurement. Without --base_dir the built-in corpus and the tokenizers are made under a temporary
NANOCHAT_BASE_DIR. Each arm also reports the CPU that other programs used meanwhile ("other load"): on a
shared machine, trust the runs where it is near 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_VOCAB = 32768
UPSTREAM_TOK_S = {False: 650.0, True: 1400.0}  # upstream nanochat, this class of machine: eager, compiled
PHASES = ("data", "fwd", "bwd", "optim", "zero")  # the step, in order; they add up to the wall time
OPTIM_PARTS = ("grad_avg", "adamw", "muon")  # inside "optim"
NUM_ITERATIONS = 10**6  # the schedule's horizon: lr_multiplier stays 1.0 during the benchmark
POLL_S = 0.005


@dataclass(frozen=True)
class Arm:
    key: str
    worker: str  # "1p", "2p", or "1pd" (one process with glibc's default malloc, see mirror_base_train_malloc)
    depth: int
    data: str  # "small" (the base dir's tokenizer), "upstream" (32768-vocab tokenizer) or "random" (random ids)
    seq_len: int
    batch: int
    head_dim: int
    compiled: bool
    seg_steps: int  # measured steps per round
    seg_warmup: int  # unmeasured steps at the start of each round (re-warms caches after another arm ran)
    setup_warmup: int  # unmeasured steps when the worker sets up (the first one of a compiled arm compiles)

    @property
    def model_key(self) -> str:
        return f"d{self.depth}-{self.data}-{self.seq_len}x{self.batch}-h{self.head_dim}"

    @property
    def world(self) -> int:
        return 2 if self.worker == "2p" else 1

    @property
    def tokens_per_step(self) -> int:
        return self.world * self.batch * self.seq_len


# ================================================================================================================
# small helpers


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def usage() -> tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor page faults) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_stime, ru.ru_minflt


def mirror_base_train_malloc(worker: str) -> str:
    """Set up malloc as base_train does on CPU; the "1pd" worker keeps glibc's default instead (for comparison).

    base_train calls nanochat.common.keep_freed_memory() on CPU (glibc keeps freed memory instead of
    unmapping big blocks, so steps do not fault fresh pages in). Returns a label for the tables.
    """
    from nanochat import common

    keep = getattr(common, "keep_freed_memory", None)
    if keep is None:
        return "glibc default (base_train sets nothing)"
    if worker == "1pd":
        return "glibc default"
    return "keep freed memory (as base_train)" if keep() else "glibc default (keep_freed_memory not applicable)"


def busy_jiffies() -> tuple[int, int]:
    """(busy, steal) CPU ticks of the whole machine since boot, from /proc/stat (0, 0 where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def fmt_table(headers: list[str], rows: list[list], aligns: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    aligns = aligns or "l" + "r" * (len(headers) - 1)

    def line(vals):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(vals, widths, aligns))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)), flush=True)


# ================================================================================================================
# worker: owns models, optimizers and loaders; runs steps on command


class Timer:
    """Accumulates seconds per name; wraps callables in place to time them."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        acc, self.acc = self.acc, {}
        return acc


class Runner:
    """One model with its optimizers and data source; `step` is one base_train step (grad_accum = 1)."""

    def __init__(self, arm: Arm, tokenizers: dict, data_dir: Path, rank: int, world: int, timer: Timer) -> None:
        import torch

        from nanochat.dataloader import DataLoader
        from nanochat.gpt import GPT, GPTConfig
        from nanochat.optim import OptimConfig, Optimizers

        torch.manual_seed(0)
        vocab = UPSTREAM_VOCAB if arm.data == "random" else tokenizers[arm.data].vocab_size
        self.cfg = GPTConfig.from_depth(arm.depth, vocab, arm.seq_len, arm.head_dim)
        self.model = GPT(self.cfg)
        self.model.init_weights(0)  # base_train: same seed on every rank
        self.optimizers = Optimizers(self.model, OptimConfig(), rank, world)
        # attribute the optimizer's time without changing what runs (instance attributes shadow the methods)
        self.optimizers.adamw.step = timer.wrap(self.optimizers.adamw.step, "adamw")
        self.optimizers.muon.step = timer.wrap(self.optimizers.muon.step, "muon")
        self.compiled = None
        self.step_count = 0
        self.arm = arm
        if arm.data == "random":
            gen = torch.Generator().manual_seed(1000 + rank)
            self.next_batch = lambda: tuple(torch.randint(vocab, (arm.batch, arm.seq_len), generator=gen) for _ in "xy")
            self.loader = None
        else:
            self.loader = DataLoader(
                tokenizers[arm.data], arm.batch, arm.seq_len, "train", rank, world, "cpu", seed=0, data_dir=data_dir
            )
            self.next_batch = self.loader.next_batch

    def train_model(self, compiled: bool):
        import torch

        if not compiled:
            return self.model
        if self.compiled is None:
            self.compiled = torch.compile(self.model, dynamic=False)  # exactly as base_train
        return self.compiled

    def step(self, compiled: bool, timer: Timer) -> dict[str, float]:
        from nanochat.optim import lr_multiplier, muon_momentum

        train_model = self.train_model(compiled)
        grad_accum = 1
        timer.take()
        c0, s0, f0 = usage()
        t0 = time.perf_counter()
        x, y = self.next_batch()
        t1 = time.perf_counter()
        loss = train_model(x, y)
        t2 = time.perf_counter()
        (loss / grad_accum).backward()
        t3 = time.perf_counter()
        lrm = lr_multiplier(self.step_count, NUM_ITERATIONS, 0.0, 0.2, 0.0)
        self.optimizers.step(lrm, muon_momentum(self.step_count))
        t4 = time.perf_counter()
        self.optimizers.zero_grad()
        loss_value = loss.item()
        t5 = time.perf_counter()
        self.step_count += 1
        rec = {"wall": t5 - t0, "data": t1 - t0, "fwd": t2 - t1, "bwd": t3 - t2, "optim": t4 - t3, "zero": t5 - t4}
        rec.update(timer.take())
        c1, s1, f1 = usage()
        rec.update(cpu=c1 - c0, sys=s1 - s0, faults=f1 - f0, loss=loss_value)
        return rec


def loader_throughput(tokenizer, data_dir: Path, batch: int, seq_len: int, min_tokens: int) -> dict:
    """The DataLoader alone: tokens/s over >= min_tokens, and the slowest single next_batch (a tokenise burst)."""
    from nanochat.dataloader import DataLoader

    loader = DataLoader(tokenizer, batch, seq_len, "train", 0, 1, "cpu", seed=1, data_dir=data_dir)
    times, n = [], 0
    t_start = time.perf_counter()
    while n < min_tokens:
        t0 = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - t0)
        n += batch * seq_len
    total = time.perf_counter() - t_start
    return {"tokens": n, "seconds": total, "tok_s": n / total, "max_s": max(times), "median_s": median(times)}


def worker_main(args: argparse.Namespace) -> None:
    malloc_mode = mirror_base_train_malloc(args.worker)  # before torch allocates anything
    import torch

    torch.set_num_threads(args.threads)
    from nanochat import optim as optim_mod
    from nanochat.common import cleanup_distributed, init_distributed
    from nanochat.tokenizer import Tokenizer

    ctl = Path(args.ctl)
    dist_info = init_distributed("cpu")
    rank, world = dist_info.rank, dist_info.world_size
    me = f"{args.worker}.r{rank}"
    try:
        plan = json.loads((ctl / "plan.json").read_text())
        arms = [Arm(**a) for a in plan["arms"] if a["worker"] == args.worker]
        timer = Timer()
        optim_mod.average_gradients = timer.wrap(optim_mod.average_gradients, "grad_avg")  # looked up per call
        data_dir = Path(plan["data_dir"])
        tokenizers = {name: Tokenizer.load(Path(d)) for name, d in plan["tokenizers"].items()}
        runners: dict[str, Runner] = {}
        ready: dict = {"threads": torch.get_num_threads(), "world": world, "arms": {}, "malloc": malloc_mode}
        for arm in arms:
            t0 = time.perf_counter()
            runner = runners.get(arm.model_key)
            if runner is None:
                runner = runners[arm.model_key] = Runner(arm, tokenizers, data_dir, rank, world, timer)
            build_s = time.perf_counter() - t0
            warm = [runner.step(arm.compiled, timer)["wall"] for _ in range(arm.setup_warmup)]
            ready["arms"][arm.key] = {
                "build_s": build_s,
                "warmup_s": warm,
                "params": runner.model.num_params(),
                "flops_per_token": runner.model.flops_per_token(),
                "config": runner.cfg.to_dict(),
            }
        if args.worker == "1p" and "small" in tokenizers:
            a0 = next((a for a in arms if a.data == "small"), None)
            if a0 is not None:
                ready["loader"] = loader_throughput(tokenizers["small"], data_dir, a0.batch, a0.seq_len, 1_000_000)
        write_json(ctl / f"{me}.ready", ready)

        seq, last_seen = 0, time.time()
        while True:
            cmd_path = ctl / f"{args.worker}.cmd.{seq}"
            if not cmd_path.exists():
                time.sleep(POLL_S)
                if time.time() - last_seen > 1.0:
                    last_seen = time.time()
                    try:
                        os.kill(args.parent_pid, 0)
                    except OSError:
                        return  # the controller is gone
                continue
            cmd = json.loads(cmd_path.read_text())
            if cmd["op"] == "quit":
                break
            arm = next(a for a in arms if a.key == cmd["arm"])
            runner = runners[arm.model_key]
            if cmd["op"] == "steps":
                c0 = cpu_seconds()
                for _ in range(cmd["warmup"]):
                    runner.step(arm.compiled, timer)
                recs = [runner.step(arm.compiled, timer) for _ in range(cmd["steps"])]
                cpu = cpu_seconds() - c0
                write_json(ctl / f"{me}.res.{seq}", {"steps": recs, "cpu": cpu})
            elif cmd["op"] == "profile":
                write_json(ctl / f"{me}.res.{seq}", {"text": profile_runner(runner, arm, timer, cmd["steps"])})
            seq += 1
    except Exception:
        (ctl / f"{me}.error").write_text(traceback.format_exc())
        raise
    finally:
        cleanup_distributed()


def profile_runner(runner: Runner, arm: Arm, timer: Timer, steps: int) -> str:
    """torch.profiler top ops (self CPU time) over `steps` training steps, plus a cProfile of a loader refill."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step(arm.compiled, timer)
    out = [f"--- torch.profiler, {arm.key}, {steps} step(s), top ops by self CPU time ---"]
    out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    if runner.loader is not None:
        # force a refill of the token buffer (the tokeniser burst) under cProfile
        loader = runner.loader
        need = len(loader._buf) + 1  # a benchmark may look inside
        pr = cProfile.Profile()
        pr.enable()
        t0 = time.perf_counter()
        loader._fill(need + 1)
        dt = time.perf_counter() - t0
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(8)
        out.append(f"--- cProfile of one DataLoader refill ({dt * 1000:.0f} ms) ---")
        out.append("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:3000])
    return "\n".join(out)


# ================================================================================================================
# controller: data setup, launching workers, interleaved rounds, tables


class Worker:
    def __init__(self, name: str, nprocs: int, threads: int, ctl: Path, env: dict) -> None:
        self.name, self.nprocs, self.ctl, self.seq = name, nprocs, ctl, 0
        args = [
            "-m",
            "scripts.bench_train",
            "--worker",
            name,
            "--ctl",
            str(ctl),
            "--threads",
            str(threads),
            "--parent_pid",
            str(os.getpid()),
        ]
        if nprocs == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}", *args]
        env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log_path = ctl / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def _wait_files(self, suffix: str, timeout: float) -> list[dict]:
        paths = [self.ctl / f"{self.name}.r{r}.{suffix}" for r in range(self.nprocs)]
        deadline = time.time() + timeout
        while not all(p.exists() for p in paths):
            errors = list(self.ctl.glob(f"{self.name}.r*.error"))
            if errors or self.proc.poll() is not None or time.time() > deadline:
                time.sleep(0.5)
                detail = errors[0].read_text() if errors else self.log_path.read_text()[-4000:]
                why = "timed out" if time.time() > deadline else f"exited ({self.proc.poll()})"
                raise RuntimeError(f"worker {self.name} {why}; its log:\n{detail}")
            time.sleep(POLL_S)
        return [json.loads(p.read_text()) for p in paths]

    def wait_ready(self, timeout: float = 1800) -> list[dict]:
        return self._wait_files("ready", timeout)

    def command(self, cmd: dict, timeout: float = 1800) -> list[dict]:
        seq = self.seq
        write_json(self.ctl / f"{self.name}.cmd.{seq}", cmd)
        self.seq += 1
        if cmd["op"] == "quit":
            return []
        return self._wait_files(f"res.{seq}", timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command({"op": "quit"})
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
        self.log.close()


def prepare_data(args: argparse.Namespace, tmp: Path, need_upstream: bool) -> tuple[Path, dict[str, str], dict]:
    """(data dir, {tokenizer name: dir}, info): the built-in corpus and tokenizers, made under tmp if needed."""
    from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    info: dict = {}
    t0 = time.perf_counter()
    if args.base_dir:
        base = Path(args.base_dir)
        ddir = data_dir(base)
        train, _ = train_val_shards(ddir)
        tokenizers = {"small": str(tokenizer_dir(base))}
        Tokenizer.load(tokenizer_dir(base))  # fails early, with the fix, if there is none
        info["source"] = f"--base_dir {base}"
    else:
        base = tmp / "base"
        ddir = data_dir(base)
        write_builtin_corpus(ddir)
        train, _ = train_val_shards(ddir)
        info["corpus_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        Tokenizer.train(iter_texts(train), args.vocab_size).save(tokenizer_dir(base))
        info["tok_small_s"] = time.perf_counter() - t1
        tokenizers = {"small": str(tokenizer_dir(base))}
        info["source"] = f"built-in corpus + {args.vocab_size}-vocab tokenizer under {base}"
    if need_upstream:
        t1 = time.perf_counter()
        tok = Tokenizer.train(iter_texts(train), UPSTREAM_VOCAB)
        tok.save(tmp / "tok_upstream")
        tokenizers["upstream"] = str(tmp / "tok_upstream")
        info["tok_upstream_s"] = time.perf_counter() - t1
        info["upstream_vocab"] = tok.vocab_size
    info["chars"] = sum(len(t) for t in iter_texts(train))
    info["setup_s"] = time.perf_counter() - t0
    return ddir, tokenizers, info


def make_arms(args: argparse.Namespace, upstream_vocab: int | None) -> list[Arm]:
    arms = []
    steps, warm = args.steps, args.seg_warmup
    for d in args.depths:
        common = dict(
            depth=d,
            data="small",
            seq_len=args.seq_len,
            batch=args.batch,
            head_dim=args.head_dim,
            seg_steps=steps,
            seg_warmup=warm,
            setup_warmup=args.warmup,
        )
        arms.append(Arm(f"d{d} 1p", "1p", compiled=False, **common))
        if not args.no_malloc:
            arms.append(Arm(f"d{d} 1p glibc-malloc", "1pd", compiled=False, **common))
        if not args.no_2p:
            arms.append(Arm(f"d{d} 2p", "2p", compiled=False, **common))
        if not args.no_compile:
            arms.append(Arm(f"d{d} 1p compiled", "1p", compiled=True, **common))
    if upstream_vocab is not None:
        sources = ["upstream"]
        if upstream_vocab < UPSTREAM_VOCAB or args.random_upstream:
            sources.append("random")
        for src in sources:
            common = dict(
                depth=4,
                data=src,
                seq_len=512,
                batch=8,
                head_dim=64,
                seg_steps=args.upstream_steps,
                seg_warmup=0,
                setup_warmup=1,
            )
            tag = "upstream" if src == "upstream" else "upstream rand-ids"
            arms.append(Arm(f"{tag}", "1p", compiled=False, **common))
            if not args.no_compile:
                arms.append(Arm(f"{tag} compiled", "1p", compiled=True, **common))
    return arms


def summarize(arm: Arm, segs: list[list[dict]]) -> dict:
    steps = [s for seg in segs for s in seg]
    wall = [s["wall"] for s in steps]
    med = median(wall)
    out = {"n": len(steps), "median": med, "min": min(wall), "max": max(wall), "tok_s": arm.tokens_per_step / med}
    for k in (*PHASES, *OPTIM_PARTS):
        out[k] = median([s.get(k, 0.0) for s in steps])
    out["cpu_util"] = sum(s["cpu"] for s in steps) / sum(wall) / arm.world  # per process, in cores
    out["sys_share"] = sum(s.get("sys", 0.0) for s in steps) / max(sum(s["cpu"] for s in steps), 1e-9)
    out["faults"] = median([s.get("faults", 0) for s in steps])  # rank 0's minor page faults per step
    out["round_medians"] = [median([s["wall"] for s in seg]) for seg in segs]
    return out


def ratio_stats(a: dict, b: dict, a_arm: Arm, b_arm: Arm) -> tuple[float, float, float]:
    """tokens/s of a over b: (from pooled medians, min and max of the per-round ratios)."""
    pooled = a["tok_s"] / b["tok_s"]
    per_round = [
        (a_arm.tokens_per_step / ra) / (b_arm.tokens_per_step / rb)
        for ra, rb in zip(a["round_medians"], b["round_medians"])
    ]
    return pooled, min(per_round), max(per_round)


def controller_main(args: argparse.Namespace) -> int:
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    workers: list[Worker] = []
    load0 = os.getloadavg()
    try:
        section("setup")
        need_upstream = not args.no_upstream
        ddir, tokenizers, info = prepare_data(args, tmp, need_upstream)
        up_vocab = info.get("upstream_vocab")
        arms = make_arms(args, up_vocab)
        print(f"data: {info['source']}; {info['chars'] / 1e6:.1f}M chars of training text")
        if up_vocab is not None:
            reached = "reached" if up_vocab >= UPSTREAM_VOCAB else "only reached"
            print(f"upstream tokenizer: asked for {UPSTREAM_VOCAB}, the corpus {reached} {up_vocab}", end="")
            print("" if up_vocab >= UPSTREAM_VOCAB else f"; also measuring vocab {UPSTREAM_VOCAB} on random ids")
        parts = {k: v for k, v in info.items() if k.endswith("_s")}
        print("data setup: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in parts.items()))
        ctl = tmp / "ctl"
        ctl.mkdir()
        write_json(
            ctl / "plan.json",
            {"arms": [asdict(a) for a in arms], "data_dir": str(ddir), "tokenizers": tokenizers},
        )
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor_cache"), "PYTHONUNBUFFERED": "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "true")
        ready: dict[str, dict] = {}
        # one worker at a time sets up, so compile times are not inflated by the other's set-up
        for name, nprocs, threads in (("2p", 2, 1), ("1p", 1, 2), ("1pd", 1, 2)):
            if not any(a.worker == name for a in arms):
                continue
            t0 = time.perf_counter()
            w = Worker(name, nprocs, threads, ctl, env)
            workers.append(w)
            ready[name] = w.wait_ready()[0]
            print(
                f"worker {name}: {nprocs} process(es) x {threads} thread(s), malloc: {ready[name]['malloc']}; ready in "
                f"{time.perf_counter() - t0:.1f}s (start-up, models, warm-up/compile)",
                flush=True,
            )
        by_name = {w.name: w for w in workers}
        arm_info = {a.key: ready[a.worker]["arms"][a.key] for a in arms}

        section("models")
        rows, seen = [], set()
        for a in arms:
            if a.model_key in seen:
                continue
            seen.add(a.model_key)
            c = arm_info[a.key]["config"]
            rows.append(
                [
                    a.model_key,
                    c["n_layer"],
                    c["n_embd"],
                    c["n_head"],
                    c["vocab_size"],
                    c["sequence_len"],
                    a.batch,
                    f"{arm_info[a.key]['params'] / 1e6:.2f}M",
                    f"{arm_info[a.key]['flops_per_token'] / 1e6:.1f}M",
                ]
            )
        print(
            fmt_table(["model", "layers", "width", "heads", "vocab", "seq", "batch/rank", "params", "FLOP/token"], rows)
        )

        # ---- interleaved rounds ------------------------------------------------------------------------------
        section(f"measuring: up to {args.rounds} rounds, arm order alternating")
        segs: dict[str, list[list[dict]]] = {a.key: [] for a in arms}
        other: dict[str, list[float]] = {a.key: [] for a in arms}
        steal: dict[str, list[float]] = {a.key: [] for a in arms}
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        t_last = 0.0
        for r in range(args.rounds):
            elapsed = time.time() - t_start
            if r >= args.min_rounds and elapsed + t_last > args.time_budget:
                print(f"stopping after {r} rounds: another would end past the --time_budget of {args.time_budget}s")
                break
            t_round = time.perf_counter()
            for a in arms if r % 2 == 0 else arms[::-1]:
                b0, s0 = busy_jiffies()
                t0 = time.perf_counter()
                res = by_name[a.worker].command(
                    {"op": "steps", "arm": a.key, "steps": a.seg_steps, "warmup": a.seg_warmup}
                )
                dt = time.perf_counter() - t0
                b1, s1 = busy_jiffies()
                ours = sum(rr["cpu"] for rr in res)  # the whole command, warm-up steps included
                # CPU the rest of the machine used meanwhile, in cores
                other[a.key].append(max(0.0, (b1 - b0) / hz - ours) / dt)
                steal[a.key].append((s1 - s0) / hz / dt)
                # per step: the slowest rank (ranks meet in every collective, so they differ little)
                recs = []
                for i, s in enumerate(res[0]["steps"]):
                    rec = dict(s)
                    rec["wall"] = max(rr["steps"][i]["wall"] for rr in res)
                    rec["cpu"] = sum(rr["steps"][i]["cpu"] for rr in res)
                    recs.append(rec)
                segs[a.key].append(recs)
            t_last = time.perf_counter() - t_round
            busy = median([other[a.key][-1] for a in arms])
            print(f"round {r + 1}/{args.rounds}: {t_last:.1f}s, other programs used {busy:.2f} cores", flush=True)
        stats = {a.key: summarize(a, segs[a.key]) for a in arms}
        arm_by_key = {a.key: a for a in arms}

        # ---- tables --------------------------------------------------------------------------------------------
        section("throughput (median of measured steps; warm-up and compilation excluded)")
        rows = []
        for a in arms:
            s = stats[a.key]
            procs = f"{a.world}x{ready[a.worker]['threads']}"
            rows.append(
                [
                    a.key,
                    procs,
                    a.tokens_per_step,
                    s["n"],
                    f"{s['median'] * 1000:.0f}",
                    f"{s['min'] * 1000:.0f}-{s['max'] * 1000:.0f}",
                    f"{s['tok_s']:,.0f}",
                    f"{s['cpu_util']:.2f}",
                    f"{median(other[a.key]):.2f}",
                ]
            )
        print(
            fmt_table(
                ["arm", "procs x thr", "tok/step", "steps", "step ms", "min-max ms", "tok/s", "cpu/proc", "other load"],
                rows,
            )
        )
        print(
            "tok/s: all ranks together. cpu/proc: CPU cores each process kept busy. other load: cores used by\n"
            "other programs during the arm (median over rounds; 0 = quiet machine, 2 = a full competing job)."
        )
        busy = median([x for v in other.values() for x in v])
        if busy > 0.25:
            print(
                f"WARNING: other programs used {busy:.2f} of the machine's cores (median) while we measured: the\n"
                "absolute numbers are low. Interleaving keeps ratios fairer, but a 2-thread process loses more to\n"
                "competing jobs than two 1-thread processes (its threads wait for each other), so 1p arms suffer most."
            )
        if any(median(steal[k]) > 0.05 for k in steal):
            print("hypervisor steal (cores): " + ", ".join(f"{k} {median(v):.2f}" for k, v in steal.items()))

        section("where a step goes (median ms per phase; optim = grad_avg + adamw + muon + bookkeeping)")
        rows = []
        for a in arms:
            s = stats[a.key]
            cells = [f"{s[k] * 1000:.1f}" for k in (*PHASES, *OPTIM_PARTS)]
            share = (s["muon"]) / s["median"]
            rows.append(
                [
                    a.key,
                    *cells,
                    f"{100 * s['optim'] / s['median']:.0f}%",
                    f"{100 * share:.0f}%",
                    f"{100 * s['sys_share']:.0f}%",
                    f"{s['faults'] / 1000:,.0f}k",
                ]
            )
        print(fmt_table(["arm", *PHASES, *OPTIM_PARTS, "optim%", "muon%", "sys%", "faults"], rows))
        print(
            "data = DataLoader.next_batch; zero = zero_grad + loss.item(); grad_avg in 2p includes waiting for the\n"
            "other rank. sys% = kernel share of the CPU time; faults = minor page faults per step (4 KiB pages the\n"
            "kernel had to map and zero: memory malloc returned to the OS and took back)."
        )
        loader = ready.get("1p", {}).get("loader")
        if loader:
            print(
                f"DataLoader alone ({ready['1p']['threads']} tokenizer threads): {loader['tok_s']:,.0f} tokens/s "
                f"over {loader['tokens']:,} tokens; median next_batch {loader['median_s'] * 1e3:.2f} ms, slowest "
                f"(a tokenise refill) {loader['max_s'] * 1e3:.0f} ms"
            )
        ratio_rows = []

        def add_ratio(label: str, num: str, den: str) -> None:
            if num in stats and den in stats:
                pooled, lo, hi = ratio_stats(stats[num], stats[den], arm_by_key[num], arm_by_key[den])
                ratio_rows.append(
                    [
                        label,
                        f"{stats[num]['tok_s']:,.0f}",
                        f"{stats[den]['tok_s']:,.0f}",
                        f"{pooled:.2f}x",
                        f"{lo:.2f}-{hi:.2f}",
                    ]
                )

        for d in args.depths:
            add_ratio(f"d{d}: 2 processes / 1 process", f"d{d} 2p", f"d{d} 1p")
        for d in args.depths:
            add_ratio(f"d{d}: compiled / eager", f"d{d} 1p compiled", f"d{d} 1p")
        add_ratio("upstream cfg: compiled / eager", "upstream compiled", "upstream")
        add_ratio("upstream rand-ids: compiled / eager", "upstream rand-ids compiled", "upstream rand-ids")
        for d in args.depths:
            add_ratio(f"d{d}: base_train malloc / glibc default", f"d{d} 1p", f"d{d} 1p glibc-malloc")
        if ratio_rows:
            section("ratios (tokens/s; per-round range in the last column)")
            print(fmt_table(["comparison", "tok/s A", "tok/s B", "A/B", "per round"], ratio_rows))

        if not args.no_compile:
            section("torch.compile: first-step cost (cold inductor cache) and break-even")
            rows = []
            for a in arms:
                if not a.compiled:
                    continue
                eager_key = a.key.removesuffix(" compiled")
                first = arm_info[a.key]["warmup_s"][0] if arm_info[a.key]["warmup_s"] else float("nan")
                eager_first = arm_info[eager_key]["warmup_s"][0] if arm_info[eager_key]["warmup_s"] else float("nan")
                c_med, e_med = stats[a.key]["median"], stats[eager_key]["median"]
                overhead = first - c_med
                saved = e_med - c_med
                breakeven = f"{overhead / saved:,.0f}" if saved > 0 else "never"
                rows.append(
                    [
                        eager_key,
                        f"{eager_first:.1f}",
                        f"{first:.1f}",
                        f"{overhead:.1f}",
                        f"{e_med * 1000:.0f}",
                        f"{c_med * 1000:.0f}",
                        f"{e_med / c_med:.2f}x",
                        breakeven,
                    ]
                )
            print(
                fmt_table(
                    [
                        "config",
                        "eager 1st s",
                        "compiled 1st s",
                        "compile s",
                        "eager ms",
                        "compiled ms",
                        "speedup",
                        "break-even steps",
                    ],
                    rows,
                )
            )
            print(
                "compile s = compiled first step - compiled median step. break-even = steps until the time saved\n"
                "per step repays it (inductor's on-disk cache makes later runs of the same shapes start faster)."
            )

        if up_vocab is not None:
            section("upstream comparison: depth 4, head_dim 64, seq 512, batch 8, fp32, 1 process")
            rows = []
            for a in arms:
                if a.data == "small":
                    continue
                ref = UPSTREAM_TOK_S[a.compiled]
                vocab = arm_info[a.key]["config"]["vocab_size"]
                src = "real text" if a.data == "upstream" else "random ids"
                rows.append(
                    [
                        a.key,
                        vocab,
                        src,
                        f"{stats[a.key]['tok_s']:,.0f}",
                        f"{ref:,.0f}",
                        f"{stats[a.key]['tok_s'] / ref:.2f}x",
                    ]
                )
            print(fmt_table(["arm", "vocab", "data", "ours tok/s", "upstream tok/s", "ours/upstream"], rows))
            print("upstream: nanochat on this class of machine, as logged (~650 tok/s eager, ~1,400 compiled).")

        if args.profile:
            section("profiles (1 process)")
            for a in arms:
                if a.worker == "1p" and not a.compiled and a.data != "random":
                    res = by_name["1p"].command({"op": "profile", "arm": a.key, "steps": 1})
                    print(res[0]["text"], flush=True)

        load1 = os.getloadavg()
        print(
            f"\nload average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}; "
            f"total wall time {time.time() - t_start:.0f}s"
        )
        return 0
    finally:
        for w in workers:
            w.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.bench_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="no upstream arms, fewer rounds and steps (~2 minutes)")
    p.add_argument("--base_dir", help="use this NANOCHAT_BASE_DIR's data and tokenizer instead of making them")
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4], help="tiny configs (none: upstream arms only)")
    p.add_argument("--seq_len", type=int, default=256, help="tiny configs' sequence length")
    p.add_argument("--batch", type=int, default=8, help="tiny configs' device batch size (per process)")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=8192, help="tiny configs' tokenizer (when made here)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds at most (default 6, --quick 3)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per round, tiny arms (default 3)")
    p.add_argument("--upstream_steps", type=int, default=1, help="measured steps per round, upstream arms")
    p.add_argument("--min_rounds", type=int, default=None, help="rounds run whatever the budget (default 1)")
    p.add_argument(
        "--time_budget",
        type=float,
        default=None,
        help="stop adding rounds past this many seconds of total run time (default 330, --quick 120)",
    )
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per tiny arm at set-up (upstream: 1)")
    p.add_argument("--seg_warmup", type=int, default=1, help="unmeasured steps per round, tiny arms")
    p.add_argument("--no_2p", action="store_true", help="skip the 2-process arms")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile arms")
    p.add_argument("--no_upstream", action="store_true", help="skip the upstream-config arms")
    p.add_argument("--no_malloc", action="store_true", help="skip the glibc-malloc comparison arms")
    p.add_argument(
        "--random_upstream",
        action="store_true",
        help="also run the upstream config on random ids at vocab 32768 (automatic if the corpus "
        "cannot train a 32768 vocab)",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler / cProfile tables at the end")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (worker logs)")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ctl", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--parent_pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 6
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    if args.min_rounds is None:
        args.min_rounds = 1
    if args.time_budget is None:
        args.time_budget = 120 if args.quick else 330
    if args.quick:
        args.no_upstream = True
    if min(args.rounds, args.steps, args.upstream_steps) < 1 or args.warmup < 1:
        p.error("--rounds, --steps, --upstream_steps and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return controller_main(args)


if __name__ == "__main__":
    sys.exit(main())
