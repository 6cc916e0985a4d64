"""Benchmark real training steps on CPU: tokens/s and step time, 1 vs 2 processes, eager vs torch.compile.

    python -m scripts.bench_train            # full run (~6 minutes on a 2-core machine)
    python -m scripts.bench_train --quick    # no upstream arms, fewer rounds (~2 minutes)

A benchmark, never a test. Each measured step is base_train's code path (grad_accum = 1) plus perf_counter calls,
also around average_gradients / AdamW.step / Muon.step (wrapped in place). Arms, all measured in every round
(rounds alternate the arm order, so machine noise hits all arms alike):
  d{N} 1p               one process, 2 threads
  d{N} 2p               torch.distributed.run --nproc_per_node=2 (gloo), 1 thread each; tok/s of both ranks
  d{N} 1p compiled      torch.compile(model, dynamic=False), as base_train does
  d{N} 1p glibc-malloc  eager, without base_train's nanochat.common.keep_freed_memory(): glibc's default unmaps
                        big blocks on free, so every step faults fresh pages in. (For another allocator, run the
                        whole benchmark under it: LD_PRELOAD=.../libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1.)
  upstream [compiled]   our trainer at upstream nanochat's CPU config: depth 4, head_dim 64, seq 512, batch 8,
                        vocab 32768, fp32. Upstream's own code is not run here, so no ratio against it is printed:
                        a number logged on another machine is not a measurement of this one.
  upstream glibc-malloc / keep-all   glibc's default malloc / keep_freed_memory(None): every freed block kept
Peak RSS: the worker's high-water mark (VmHWM) in the arm's rounds, min-max. A worker keeps what its earlier arms
freed, so the upstream arms have workers of their own (the compiled arm shares the eager one's).

Workers are long-lived and idle between commands, so start-up, data setup and compilation are never measured.
Each arm reports the CPU other programs used meanwhile ("other load"): trust runs where it is near 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_VOCAB = 32768
PHASES = ("data", "fwd", "bwd", "optim", "zero")  # the step, in order; they add up to the wall time
OPTIM_PARTS = ("grad_avg", "adamw", "muon")  # inside "optim"
NUM_ITERATIONS = 10**6  # the schedule's horizon: lr_multiplier stays 1.0 during the benchmark
POLL_S = 0.005
# (name, processes, threads each), set up one at a time so compile times are not inflated by another's set-up
WORKERS = (("2p", 2, 1), ("1p", 1, 2), ("1pd", 1, 2), ("up", 1, 2), ("upd", 1, 2), ("upk", 1, 2))
MALLOC = {"1pd": "glibc default", "upd": "glibc default", "upk": "keep all freed memory, no mmap"}  # else base_train's


@dataclass(frozen=True)
class Arm:
    key: str
    worker: str  # a WORKERS name; "1pd", "upd" and "upk" use another malloc (MALLOC)
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


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # the polling reader never sees half a file


def usage() -> tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor page faults) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_stime, ru.ru_minflt


def peak_rss(reset: bool = False) -> int:
    """Bytes: this process's peak resident set (VmHWM) since the last reset (Linux >= 4.0; else the lifetime's)."""
    if reset:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def busy_jiffies() -> tuple[int, int]:
    """(busy, steal) CPU ticks of the whole machine since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return user + nice + system + irq + softirq, steal


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)), flush=True)


def print_table(headers: list[str], rows: list[list], note: str = "") -> None:
    """First column left-aligned, the others right-aligned; then the note, if any."""
    cells = [headers, *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines + ([note] if note else [])), flush=True)


# ================================================================================================================
# worker: owns models, optimizers and loaders; runs steps on command


TIMES: dict[str, float] = {}  # seconds in each timed() callable during the current step


def timed(fn: Callable, name: str) -> Callable:
    """fn, adding its run time to TIMES[name]; wrapped in place, so what runs does not change."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


class Runner:
    """One model with its optimizers and data source; `step` is one base_train step (grad_accum = 1)."""

    def __init__(self, arm: Arm, tokenizers: dict, data_dir: Path, rank: int, world: int) -> None:
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
        # attribute the optimizer's time (instance attributes shadow the methods)
        self.optimizers.adamw.step = timed(self.optimizers.adamw.step, "adamw")
        self.optimizers.muon.step = timed(self.optimizers.muon.step, "muon")
        self.compiled, self.step_count = None, 0
        if arm.data == "random":
            gen = torch.Generator().manual_seed(1000 + rank)
            self.next_batch = lambda: tuple(torch.randint(vocab, (arm.batch, arm.seq_len), generator=gen) for _ in "xy")
        else:
            tok = tokenizers[arm.data]
            loader = DataLoader(tok, arm.batch, arm.seq_len, "train", rank, world, "cpu", seed=0, data_dir=data_dir)
            self.next_batch = loader.next_batch

    def step(self, compiled: bool) -> dict[str, float]:
        import torch

        from nanochat.optim import lr_multiplier, muon_momentum

        if compiled and self.compiled is None:
            self.compiled = torch.compile(self.model, dynamic=False)  # exactly as base_train
        model = self.compiled if compiled else self.model
        grad_accum = 1
        TIMES.clear()
        c0, s0, f0 = usage()
        t0 = time.perf_counter()
        x, y = self.next_batch()
        t1 = time.perf_counter()
        loss = model(x, y)
        t2 = time.perf_counter()
        (loss / grad_accum).backward()
        t3 = time.perf_counter()
        lrm = lr_multiplier(self.step_count, NUM_ITERATIONS, 0.0, 0.2, 0.0)
        self.optimizers.step(lrm, muon_momentum(self.step_count))
        t4 = time.perf_counter()
        self.optimizers.zero_grad()
        loss.item()
        t5 = time.perf_counter()
        self.step_count += 1
        c1, s1, f1 = usage()
        rec = {"wall": t5 - t0, "data": t1 - t0, "fwd": t2 - t1, "bwd": t3 - t2, "optim": t4 - t3, "zero": t5 - t4}
        return {**rec, **TIMES, "cpu": c1 - c0, "sys": s1 - s0, "faults": f1 - f0}


def worker_main(args: argparse.Namespace) -> None:
    from nanochat import common

    # malloc as base_train sets it on CPU, before torch allocates anything, except in the comparison workers
    malloc = MALLOC.get(args.worker, "keep freed memory (as base_train)")
    if malloc != "glibc default" and not common.keep_freed_memory(None if args.worker == "upk" else common.KEEP_BELOW):
        malloc = "glibc default"
    import torch

    from nanochat import optim as optim_mod
    from nanochat.tokenizer import Tokenizer

    ctl = Path(args.ctl)
    dist_info = common.init_distributed("cpu")
    rank, world = dist_info.rank, dist_info.world_size
    me = f"{args.worker}.r{rank}"
    try:  # a failure ends the job; the controller then shows its log
        plan = json.loads((ctl / "plan.json").read_text())
        arms = {a["key"]: Arm(**a) for a in plan["arms"] if a["worker"] == args.worker}
        optim_mod.average_gradients = timed(optim_mod.average_gradients, "grad_avg")  # looked up per call
        tokenizers = {name: Tokenizer.load(Path(d)) for name, d in plan["tokenizers"].items()}
        runners: dict[str, Runner] = {}
        ready: dict = {"threads": torch.get_num_threads(), "malloc": malloc, "arms": {}}
        for arm in arms.values():
            if arm.model_key not in runners:
                runners[arm.model_key] = Runner(arm, tokenizers, Path(plan["data_dir"]), rank, world)
            r = runners[arm.model_key]
            warm = [r.step(arm.compiled)["wall"] for _ in range(arm.setup_warmup)]
            m = r.model
            ready["arms"][arm.key] = dict(
                first_step_s=warm[0], params=m.num_params(), flops_per_token=m.flops_per_token(), config=r.cfg.to_dict()
            )
        write_json(ctl / f"{me}.ready", ready)

        seq = 0
        while True:
            cmd_path = ctl / f"{args.worker}.cmd.{seq}"
            if not cmd_path.exists():
                try:
                    os.kill(args.parent_pid, 0)
                except OSError:
                    return  # the controller is gone
                time.sleep(POLL_S)
                continue
            key = json.loads(cmd_path.read_text())
            if key is None:
                break  # quit
            arm = arms[key]
            runner = runners[arm.model_key]
            c0 = usage()[0]
            peak_rss(reset=True)
            for _ in range(arm.seg_warmup):
                runner.step(arm.compiled)
            recs = [runner.step(arm.compiled) for _ in range(arm.seg_steps)]
            write_json(ctl / f"{me}.res.{seq}", {"steps": recs, "cpu": usage()[0] - c0, "peak_rss": peak_rss()})
            seq += 1
    finally:
        common.cleanup_distributed()


# ================================================================================================================
# controller: data setup, launching workers, interleaved rounds, tables


class Worker:
    """A long-lived worker job (1 process, or 2 under torchrun) that takes commands through files in ctl."""

    def __init__(self, name: str, nprocs: int, threads: int, ctl: Path, env: dict) -> None:
        self.name, self.nprocs, self.ctl, self.seq = name, nprocs, ctl, 0
        args = ["-m", "scripts.bench_train", f"--worker={name}", f"--ctl={ctl}", f"--parent_pid={os.getpid()}"]
        if nprocs > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}", *args]
        env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}  # torch's thread count
        self.log_path = ctl / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, suffix: str, timeout: float = 1800) -> list[dict]:
        """Every rank's `{name}.r{rank}.{suffix}` file, once all exist; raises with the log if the job failed."""
        paths = [self.ctl / f"{self.name}.r{r}.{suffix}" for r in range(self.nprocs)]
        deadline = time.time() + timeout
        while not all(p.exists() for p in paths):
            if self.proc.poll() is not None or time.time() > deadline:
                why = "timed out" if self.proc.poll() is None else f"exited ({self.proc.returncode})"
                raise RuntimeError(f"worker {self.name} {why}; its log:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(POLL_S)
        return [json.loads(p.read_text()) for p in paths]

    def command(self, arm_key: str | None) -> list[dict]:
        """Every rank's steps of one round of the arm; None: quit."""
        seq, self.seq = self.seq, self.seq + 1
        write_json(self.ctl / f"{self.name}.cmd.{seq}", arm_key)
        return [] if arm_key is None else self.wait(f"res.{seq}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command(None)
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
        self.log.close()


def prepare_data(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict[str, str], int | None]:
    """(data dir, {tokenizer name: dir}, upstream tokenizer's vocab or None): made under tmp where needed."""
    from nanochat.dataset import data_dir, iter_texts, train_val_shards, write_builtin_corpus
    from nanochat.tokenizer import Tokenizer, tokenizer_dir

    t0 = time.perf_counter()
    base = Path(args.base_dir) if args.base_dir else tmp / "base"
    ddir = data_dir(base)
    if not args.base_dir:
        write_builtin_corpus(ddir)
        Tokenizer.train(iter_texts(train_val_shards(ddir)[0]), args.vocab_size).save(tokenizer_dir(base))
    Tokenizer.load(tokenizer_dir(base))  # with --base_dir: fails early, with the fix, if there is none
    source = f"--base_dir {base}" if args.base_dir else f"built-in corpus + {args.vocab_size}-vocab tokenizer"
    tokenizers, up_vocab = {"small": str(tokenizer_dir(base))}, None
    if not args.no_upstream:
        tok = Tokenizer.train(iter_texts(train_val_shards(ddir)[0]), UPSTREAM_VOCAB)
        tok.save(tmp / "tok_upstream")
        tokenizers["upstream"], up_vocab = str(tmp / "tok_upstream"), tok.vocab_size
    print(f"data: {source}; set up in {time.perf_counter() - t0:.1f}s")
    if up_vocab is not None:
        print(f"upstream tokenizer: asked for {UPSTREAM_VOCAB}, the corpus reached {up_vocab}", end="")
        print("" if up_vocab >= UPSTREAM_VOCAB else f"; also measuring vocab {UPSTREAM_VOCAB} on random ids")
    return ddir, tokenizers, up_vocab


def make_arms(args: argparse.Namespace, upstream_vocab: int | None) -> list[Arm]:
    arms = []
    for d in args.depths:
        kw = dict(depth=d, data="small", seq_len=args.seq_len, batch=args.batch, head_dim=args.head_dim)
        kw.update(seg_steps=args.steps, seg_warmup=1, setup_warmup=2)
        arms.append(Arm(f"d{d} 1p", "1p", compiled=False, **kw))
        if not args.no_malloc:
            arms.append(Arm(f"d{d} 1p glibc-malloc", "1pd", compiled=False, **kw))
        if not args.no_2p:
            arms.append(Arm(f"d{d} 2p", "2p", compiled=False, **kw))
        if not args.no_compile:
            arms.append(Arm(f"d{d} 1p compiled", "1p", compiled=True, **kw))
    if upstream_vocab is not None:
        # random ids at the full vocab where the corpus cannot train a 32768-token tokenizer
        sources = ["upstream"] + (["random"] if upstream_vocab < UPSTREAM_VOCAB or args.random_upstream else [])
        for src in sources:
            kw = dict(depth=4, data=src, seq_len=512, batch=8, head_dim=64)
            kw.update(seg_steps=1, seg_warmup=0, setup_warmup=1)  # a step takes seconds: warm enough
            tag = "upstream" if src == "upstream" else "upstream rand-ids"
            worker = "up" if src == "upstream" else "1p"  # the real-data arms: peak RSS comparable across malloc
            arms.append(Arm(tag, worker, compiled=False, **kw))
            if not args.no_compile:
                arms.append(Arm(f"{tag} compiled", worker, compiled=True, **kw))
            if src == "upstream" and not args.no_malloc:
                arms.append(Arm(f"{tag} glibc-malloc", "upd", compiled=False, **kw))
                arms.append(Arm(f"{tag} keep-all", "upk", compiled=False, **kw))
    return arms


def summarize(arm: Arm, segs: list[list[dict]], other: list[float], steal: list[float], rss: list[int]) -> dict:
    """Medians over all measured steps, per-round tok/s, other programs' load and steal (cores), peak RSS range."""
    steps = [s for seg in segs for s in seg]
    wall = [s["wall"] for s in steps]
    med = median(wall)
    out = {"n": len(steps), "median": med, "min": min(wall), "max": max(wall), "tok_s": arm.tokens_per_step / med}
    out.update({k: median([s.get(k, 0.0) for s in steps]) for k in (*PHASES, *OPTIM_PARTS)})
    cpu = sum(s["cpu"] for s in steps)
    out["cpu_util"] = cpu / sum(wall) / arm.world  # per process, in cores
    out["sys_share"] = sum(s["sys"] for s in steps) / max(cpu, 1e-9)
    out["faults"] = median([s["faults"] for s in steps])  # rank 0's minor page faults per step
    out["round_tok_s"] = [arm.tokens_per_step / median([s["wall"] for s in seg]) for seg in segs]
    out["other"], out["steal"] = median(other), median(steal)
    out["rss_min"], out["rss_max"] = min(rss), max(rss)
    return out


def measure(args: argparse.Namespace, arms: list[Arm], workers: dict[str, Worker], t_start: float) -> dict:
    """Interleaved rounds, every arm once per round, order reversed every other round: {arm key: summarize()}."""
    section(f"measuring: up to {args.rounds} rounds, arm order alternating")
    segs: dict[str, list[list[dict]]] = {a.key: [] for a in arms}
    other: dict[str, list[float]] = {a.key: [] for a in arms}
    steal: dict[str, list[float]] = {a.key: [] for a in arms}
    rss: dict[str, list[int]] = {a.key: [] for a in arms}
    hz = os.sysconf("SC_CLK_TCK")
    t_last = 0.0
    for r in range(args.rounds):
        if r > 0 and time.time() - t_start + t_last > args.time_budget:
            print(f"stopping after {r} rounds: another would end past the --time_budget of {args.time_budget}s")
            break
        t_round = time.perf_counter()
        for a in arms if r % 2 == 0 else arms[::-1]:
            b0, s0 = busy_jiffies()
            t0 = time.perf_counter()
            res = workers[a.worker].command(a.key)
            dt = time.perf_counter() - t0
            b1, s1 = busy_jiffies()
            ours = sum(rr["cpu"] for rr in res)  # the whole command, warm-up steps included
            other[a.key].append(max(0.0, (b1 - b0) / hz - ours) / dt)  # in cores
            steal[a.key].append((s1 - s0) / hz / dt)
            rss[a.key].append(max(rr["peak_rss"] for rr in res))
            # per step: the slowest rank (ranks meet in every collective, so they differ little), CPU of all ranks
            by_step = zip(*(rr["steps"] for rr in res))  # each step's records, one per rank
            segs[a.key].append(
                [dict(ss[0], wall=max(s["wall"] for s in ss), cpu=sum(s["cpu"] for s in ss)) for ss in by_step]
            )
        t_last = time.perf_counter() - t_round
        busy = median([other[a.key][-1] for a in arms])
        print(f"round {r + 1}/{args.rounds}: {t_last:.1f}s, other programs used {busy:.2f} cores", flush=True)
    return {a.key: summarize(a, segs[a.key], other[a.key], steal[a.key], rss[a.key]) for a in arms}


def report(args: argparse.Namespace, arms: list[Arm], ready: dict, stats: dict) -> None:
    info = {a.key: ready[a.worker]["arms"][a.key] for a in arms}
    section("throughput (median of measured steps; warm-up and compilation excluded)")
    rows, phase_rows = [], []
    for a in arms:
        s = stats[a.key]
        ms = f"{s['min'] * 1000:.0f}-{s['max'] * 1000:.0f}"
        procs = f"{a.world}x{ready[a.worker]['threads']}"
        rows.append([a.key, procs, a.tokens_per_step, s["n"], f"{s['median'] * 1000:.0f}", ms, f"{s['tok_s']:,.0f}"])
        rows[-1] += [f"{s['cpu_util']:.2f}", f"{s['other']:.2f}", f"{s['rss_min'] / 1e9:.2f}-{s['rss_max'] / 1e9:.2f}"]
        phase_rows.append([a.key, *(f"{s[k] * 1000:.1f}" for k in (*PHASES, *OPTIM_PARTS))])
        phase_rows[-1] += [f"{100 * s[k] / s['median']:.0f}%" for k in ("optim", "muon")]
        phase_rows[-1] += [f"{100 * s['sys_share']:.0f}%", f"{s['faults'] / 1000:,.0f}k"]
    headers = ["arm", "procs x thr", "tok/step", "steps", "step ms", "min-max ms", "tok/s", "cpu/proc", "other load"]
    headers.append("peak RSS GB")
    print_table(
        headers,
        rows,
        "tok/s: all ranks together. cpu/proc: CPU cores each process kept busy. other load: cores used by\n"
        "other programs during the arm (median over rounds; 0 = quiet machine, 2 = a full competing job).\n"
        "peak RSS GB: the worker's high-water mark during the arm's rounds, min-max over rounds (largest rank).",
    )
    busy = median([s["other"] for s in stats.values()])
    if busy > 0.25:
        print(
            f"WARNING: other programs used {busy:.2f} cores (median) while we measured: absolute numbers are low.\n"
            "Interleaving keeps ratios fairer, but a 2-thread process loses more to competing jobs than two\n"
            "1-thread processes (its threads wait for each other), so 1p arms suffer most."
        )
    if any(s["steal"] > 0.05 for s in stats.values()):
        print("hypervisor steal (cores): " + ", ".join(f"{k} {s['steal']:.2f}" for k, s in stats.items()))

    section("where a step goes (median ms per phase; optim = grad_avg + adamw + muon + bookkeeping)")
    print_table(
        ["arm", *PHASES, *OPTIM_PARTS, "optim%", "muon%", "sys%", "faults"],
        phase_rows,
        "data = DataLoader.next_batch; zero = zero_grad + loss.item(); grad_avg in 2p includes waiting for the\n"
        "other rank. sys% = kernel share of the CPU time; faults = minor page faults per step (4 KiB pages the\n"
        "kernel had to map and zero: memory malloc returned to the OS and took back).",
    )

    # tokens/s of A over B, pooled and per round: only arms measured in this run
    tok: dict = {k: (s["tok_s"], s["round_tok_s"]) for k, s in stats.items()}
    pairs = [(f"d{d}: 2 processes / 1 process", f"d{d} 2p", f"d{d} 1p") for d in args.depths]
    pairs += [(f"d{d}: compiled / eager", f"d{d} 1p compiled", f"d{d} 1p") for d in args.depths]
    pairs += [(f"{k}: compiled / eager", f"{k} compiled", k) for k in ("upstream", "upstream rand-ids")]
    pairs += [(f"d{d}: base_train malloc / glibc default", f"d{d} 1p", f"d{d} 1p glibc-malloc") for d in args.depths]
    pairs += [("upstream: base_train malloc / glibc default", "upstream", "upstream glibc-malloc")]
    pairs += [("upstream: base_train malloc / keep-all", "upstream", "upstream keep-all")]
    up = [a for a in arms if a.data != "small"]
    rows = []
    for label, num, den in pairs:
        if num in tok and den in tok:
            (a, a_rounds), (b, b_rounds) = tok[num], tok[den]
            per_round = [x / y for x, y in zip(a_rounds, b_rounds)]
            rows.append(
                [label, f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}x", f"{min(per_round):.2f}-{max(per_round):.2f}"]
            )
    if rows:
        section("ratios (tokens/s; per-round range in the last column)")
        note = (
            "upstream: our trainer at upstream nanochat's CPU config (depth 4, head_dim 64, seq 512, batch 8, fp32,\n"
            "1 process); upstream's code is not run, so nothing here is compared with it. rand-ids: random ids."
        )
        print_table(["comparison", "tok/s A", "tok/s B", "A/B", "per round"], rows, note if up else "")

    base = stats.get("upstream glibc-malloc")
    if base is not None:
        section("peak RSS of the upstream arms against glibc's default malloc (max over rounds; min-max of each)")
        rows = [[k, f"{stats[k]['rss_min'] / 1e9:.2f}-{stats[k]['rss_max'] / 1e9:.2f}",
                 f"{stats[k]['rss_max'] / base['rss_max']:.2f}x", f"{stats[k]['tok_s'] / base['tok_s']:.2f}x"]
                for k in ("upstream", "upstream keep-all", "upstream glibc-malloc") if k in stats]  # fmt: skip
        print_table(["arm", "peak RSS GB", "peak / default", "tok/s / default"], rows)

    rows = []
    for a in (a for a in arms if a.compiled):
        eager = a.key.removesuffix(" compiled")
        first_c, first_e = info[a.key]["first_step_s"], info[eager]["first_step_s"]
        c_med, e_med = stats[a.key]["median"], stats[eager]["median"]
        compile_s = first_c - c_med
        even = f"{compile_s / (e_med - c_med):,.0f}" if e_med > c_med else "never"
        rows.append([eager, f"{first_e:.1f}", f"{first_c:.1f}", f"{compile_s:.1f}", even])
    if rows:
        section("torch.compile: first-step cost (cold inductor cache) and break-even")
        print_table(
            ["config", "eager 1st s", "compiled 1st s", "compile s", "break-even steps"],
            rows,
            "compile s = compiled first step - compiled median step. break-even = steps until the time saved\n"
            "per step repays it (inductor's on-disk cache makes later runs of the same shapes start faster).",
        )


def controller_main(args: argparse.Namespace) -> int:
    t_start, load0 = time.time(), os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train."))
    workers: dict[str, Worker] = {}
    try:
        section("setup")
        ddir, tokenizers, up_vocab = prepare_data(args, tmp)
        arms = make_arms(args, up_vocab)
        ctl = tmp / "ctl"
        ctl.mkdir()
        plan = {"arms": [asdict(a) for a in arms], "data_dir": str(ddir), "tokenizers": tokenizers}
        write_json(ctl / "plan.json", plan)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor_cache"), "PYTHONUNBUFFERED": "1"}
        ready: dict[str, dict] = {}
        for name, nprocs, threads in WORKERS:
            if any(a.worker == name for a in arms):
                t0 = time.perf_counter()
                workers[name] = Worker(name, nprocs, threads, ctl, env)
                ready[name] = workers[name].wait("ready")[0]
                dt = time.perf_counter() - t0
                print(
                    f"worker {name}: {nprocs}x{threads} (processes x threads), malloc: {ready[name]['malloc']}; "
                    f"start-up, models and warm-up/compile took {dt:.1f}s",
                    flush=True,
                )

        section("models")
        rows = {}
        for a in arms:
            i = ready[a.worker]["arms"][a.key]
            shape = [i["config"][k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "sequence_len")]
            rows[a.model_key] = [a.model_key, *shape, a.batch, f"{i['params'] / 1e6:.2f}M"]
            rows[a.model_key].append(f"{i['flops_per_token'] / 1e6:.1f}M")
        headers = ["model", "layers", "width", "heads", "vocab", "seq", "batch/rank", "params", "FLOP/token"]
        print_table(headers, list(rows.values()))

        report(args, arms, ready, measure(args, arms, workers, t_start))
        print(
            f"\nload average (1 min) at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
            f"total wall time {time.time() - t_start:.0f}s"
        )
        return 0
    finally:
        for w in workers.values():
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
    p.add_argument("--rounds", type=int, help="interleaved rounds at most (default 6, --quick 3)")
    p.add_argument("--steps", type=int, help="measured steps per round, tiny arms (default 3, --quick 2; upstream 1)")
    p.add_argument("--time_budget", type=float, help="add no round past this many seconds (default 330, --quick 120)")
    p.add_argument("--no_2p", action="store_true", help="skip the 2-process arms")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile arms")
    p.add_argument("--no_upstream", action="store_true", help="skip the upstream-config arms")
    p.add_argument("--no_malloc", action="store_true", help="skip the glibc-malloc comparison arms")
    p.add_argument("--random_upstream", action="store_true", help="also run the upstream config on random ids")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (worker logs)")
    # worker mode (internal)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ctl", help=argparse.SUPPRESS)
    p.add_argument("--parent_pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, full, quick in (("rounds", 6, 3), ("steps", 3, 2), ("time_budget", 330, 120)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.no_upstream = args.no_upstream or args.quick
    if min(args.rounds, args.steps) < 1:
        p.error("--rounds and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # before the tokenizers start; workers inherit it
    return controller_main(args)


if __name__ == "__main__":
    sys.exit(main())
