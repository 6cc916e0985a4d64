"""`make gpu-check`: what only a GPU can show, checked in one go (under 10 minutes on one GPU) and printed as one
table. Exit status 1 if any check fails, 2 if it cannot run at all (no CUDA GPU, a missing package).

    python -m scripts.gpu_check                  # on a CUDA GPU: compiled bf16 d12, the real thing
    python -m scripts.gpu_check --device cpu     # the same checks on the CPU, small and eager: tests the plumbing

The checks, each a row of the table and each with its own time limit:
  a) training: a supervised `nanochat-run train` of scripts.base_train (CUDA: d12, torch.compile, bf16 autocast as
     the trainer does it) for a few dozen steps; tok/s and MFU from its metrics.jsonl. Fails on an MFU <= 0 or
     > 100%, a loss that is not finite or does not fall.
  b) async save: the trainer's Saver stages a d12 model and optimizer state into its reused CPU buffers (pinned on
     CUDA) and writes them in the background; how long the caller was blocked (until the device-to-host copies
     landed) against how long the background write took. Fails unless blocking is under a quarter of the write.
  c) SIGKILL and resume: the same run again, supervised, with `--debug_fault=sigkill@step:K`: it must restart,
     resume from a checkpoint and finish; its final weights are compared with a)'s (see `resume_row`).
  d) chat engine: greedy decoding with the KV cache (nanochat/engine.py) from c)'s final checkpoint equals the
     uncached model's in fp32; bf16 decoding speed and a sample of the text.
  e) goodput: the ledger of c)'s run in `nanochat-run status --json` (where its wall time went); fails if it is
     missing or its parts do not add up to its wall time within 2 s.

Everything is written into a fresh work directory (deleted afterwards unless --keep), with its own corpus and
tokenizer unless --base-dir names a NANOCHAT_BASE_DIR that has both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.goodput import PARTS

REPO = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "  # a worker's last stdout line: this prefix, then its JSON
NEEDED = ("torch", "numpy", "tokenizers", "pyarrow", "typer", "psutil", "rich", "xxhash", "zstandard", "fsspec")


@dataclass
class Profile:
    """Everything that differs between the real check on a GPU and the plumbing check on the CPU."""

    device: str
    depth: int
    head_dim: int
    seq_len: int
    batch: int  # sequences per micro-batch; a step is one micro-batch
    steps: int
    save_every: int
    kill_at: int  # the SIGKILL of c): after this step, a few steps past a save
    eval_tokens: int
    vocab: int  # of the tokenizer trained here (when --base-dir has none)
    corpus_docs: int | None  # of the built-in corpus (None: all of it)
    limits: dict[str, float]  # seconds per check; together under 10 minutes

    def trainer_args(self) -> list[str]:
        return [f"--device_type={self.device}", f"--head_dim={self.head_dim}", f"--max_seq_len={self.seq_len}",
                f"--device_batch_size={self.batch}", "--total_batch_size=-1", "--eval_every=-1",
                f"--eval_tokens={self.eval_tokens}", "--sample_every=-1", "--log_every=5",
                f"--compile={self.device == 'cuda'}", "--keep_last_n_checkpoints=-1"]  # fmt: skip


PROFILES = {
    # d12 at 2048 tokens x 32 rows: 65k tokens a step. The limits add up to 570 s, and a check stopped at its
    # limit gets 20 s more to end cleanly: the whole stays under 10 minutes
    "cuda": Profile("cuda", 12, 128, 2048, 32, 40, 10, 25, 4 * 32 * 2048, 8192, None,
                    {"data": 40, "train": 170, "save": 50, "resume": 180, "chat": 40, "goodput": 20, "nan": 50,
                     "health": 20}),
    "cpu": Profile("cpu", 2, 64, 128, 4, 20, 5, 13, 4 * 4 * 128, 512, 300,
                   {"data": 120, "train": 180, "save": 60, "resume": 240, "chat": 60, "goodput": 30, "nan": 120,
                    "health": 60}),
}  # fmt: skip


@dataclass
class Row:
    check: str
    result: str
    numbers: str
    ok: bool


@dataclass
class Work:
    """The work directory and what the checks hand each other."""

    root: Path
    base: Path
    profile: Profile
    env: dict[str, str] = field(default_factory=dict)
    ref: Path | None = None  # a)'s checkpoint dir, when it finished
    crashed: Path | None = None  # c)'s
    status: dict | None = None  # `nanochat-run status --json` of c)'s run


def run(cmd: list[str], env: dict[str, str], limit: float, log: Path) -> tuple[int | None, str]:
    """Run `cmd` (output into `log`); at `limit` seconds stop it and everything it started: (exit code or None
    when it ran out of time, the output)."""
    import psutil

    with open(log, "w") as out:
        # its own session: a Ctrl+C here reaches this script alone, which then stops the command as below
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            code = None
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)  # the supervisor stops its trainer cleanly on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for p in family:  # whatever is left of what it started (this run's own processes only)
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            if isinstance(e, KeyboardInterrupt):
                raise
    return code, log.read_text(errors="replace")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


class CheckFailed(Exception):
    """A check found something wrong: the message is its table row's result."""


def must(ok: bool, why: str) -> None:
    if not ok:
        raise CheckFailed(why)


def finished(code: int | None, output: str, what: str, limit: float) -> None:
    if code is None:
        raise CheckFailed(f"{what} did not finish within {limit:g}s:\n{tail(output)}")
    if code != 0:
        raise CheckFailed(f"{what} exited with {code}:\n{tail(output)}")


def worker_result(code: int | None, output: str, what: str, limit: float) -> dict:
    finished(code, output, what, limit)
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    must(bool(lines), f"{what} printed no result:\n{tail(output)}")
    return json.loads(lines[-1][len(RESULT) :])


# ---- preparing: corpus and tokenizer -------------------------------------------------------------------------


def prepare(w: Work) -> None:
    from nanochat.dataset import data_dir, list_shards
    from nanochat.tokenizer import tokenizer_dir

    if len(list_shards(data_dir(w.base))) >= 2 and (tokenizer_dir(w.base) / "tokenizer.json").exists():
        return
    p, py = w.profile, sys.executable
    print(f"gpu-check: a corpus and a {p.vocab}-token tokenizer in {w.base} ...", flush=True)
    docs = [] if p.corpus_docs is None else ["--max-docs", str(p.corpus_docs)]
    for name, cmd in (("corpus", [py, "-m", "nanochat.dataset", "--builtin", *docs]),
                      ("tokenizer", [py, "-m", "scripts.tok_train", f"--vocab_size={p.vocab}",
                                     "--max_chars=20000000"])):  # fmt: skip
        code, output = run(cmd, w.env, p.limits["data"], w.root / f"{name}.log")
        finished(code, output, f"making the {name}", p.limits["data"])


# ---- a) training, c) SIGKILL and resume ------------------------------------------------------------------------


def supervised(
    w: Work, name: str, *trainer: str, steps: int = 0, limit: str = ""
) -> tuple[Path, int | None, str, float]:
    """A supervised base-training run of the profile into work/<name> (`steps`: other than the profile's): (its
    checkpoint dir, exit code, output, the time limit it had)."""
    p, ckpt = w.profile, w.root / name
    limit_s = p.limits[limit or ("resume" if trainer else "train")]
    cmd = [sys.executable, "-m", "supervisor.cli", "train", "--depth", str(p.depth), "--num-iterations",
           str(steps or p.steps), "--save-every", str(p.save_every), "--checkpoint-dir", str(ckpt),
           "--nproc-per-node", "1", "--backoff", "0", "--max-restarts", "2", "--progress-every", "5",
           "--", *p.trainer_args(), *trainer]  # fmt: skip
    code, output = run(cmd, w.env, limit_s, w.root / f"{name}.log")
    return ckpt, code, output, limit_s


def training_row(w: Work) -> Row:
    p = w.profile
    ckpt, code, output, limit = supervised(w, "ref")
    finished(code, output, "the training run", limit)
    from nanochat import metrics

    steps = [r for r in metrics.read(ckpt) if r.get("kind") == "step"]
    must(len(steps) == p.steps, f"metrics.jsonl of {ckpt} holds {len(steps)} steps, not {p.steps}")
    losses = [r["loss"] for r in steps]
    must(all(math.isfinite(x) for x in losses), f"loss not finite: {losses}")
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    must(last < first, f"loss did not fall: {first:.3f} over the first 5 steps, {last:.3f} over the last 5")
    timed = steps[2:]  # the first steps of a process compile and warm up
    tps = statistics.median(r["tok_per_s"] for r in timed)
    mfus = [r.get("mfu") for r in timed]
    numbers = f"tok/s {tps:,.0f}"
    if p.device == "cuda":  # the trainer knows the bf16 peak of the GPUs it reports MFU for (train_loop.peak_flops)
        must(all(isinstance(m, float) for m in mfus), "no MFU in metrics.jsonl: the trainer knows no peak for this GPU")
        mfu = statistics.median(mfus)
        absurd = [f"step {r['step']}: {m:.1f}%" for r, m in zip(timed, mfus) if not 0 < m <= 100]
        must(not absurd, f"absurd MFU (a step timed wrong, or a wrong peak): {', '.join(absurd[:5])}")
        numbers += f" | MFU {mfu:.1f}%"
    w.ref = ckpt
    return Row("", f"{p.steps} steps, loss {first:.2f} -> {last:.2f}", numbers, True)


def weights(directory: Path, step: int | None = None) -> dict:
    from nanochat import checkpoint

    ckpt = next(checkpoint.valid_newest_first(directory, step=step), None)
    must(ckpt is not None, f"no valid checkpoint {'' if step is None else f'at step {step} '}in {directory}")
    return checkpoint.load_model(directory, ckpt)


def resume_row(w: Work) -> Row:
    p = w.profile
    must(w.ref is not None, "not run: needs a)'s run to compare with")
    ckpt, code, output, limit = supervised(w, "crashed", f"--debug_fault=sigkill@step:{p.kill_at}")
    finished(code, output, "the supervised run with a SIGKILL", limit)
    w.crashed = ckpt
    w.status = status_json(w, ckpt)
    attempts = w.status.get("attempts", [])
    classes = [a.get("class") for a in attempts]
    must(len(attempts) == 2 and classes[-1] == "completed", f"expected a crash then a completed attempt: {classes}")
    from nanochat import metrics

    starts = [r for r in metrics.read(ckpt) if r.get("kind") == "start"]
    must(len(starts) == 2 and starts[1].get("reached") == p.kill_at,
         f"metrics.jsonl does not show a restart after step {p.kill_at}: {starts}")  # fmt: skip
    resumed = starts[1]["step"]
    must(0 < resumed <= p.kill_at, f"the restart began at step {resumed}, not from a checkpoint at or before the kill")
    import torch

    ref, got, at_resume = weights(w.ref), weights(ckpt), weights(w.ref, resumed)
    exact = all(torch.equal(ref[k], got[k]) for k in ref)
    # How far the resumed run ended from the uninterrupted one, relative to how far training moved the weights
    # after the resume point. On the CPU (fp32, eager, deterministic kernels) a resume is exact, so the weights
    # must be bit-identical. On CUDA two uninterrupted runs already differ in the last bits: inductor lowers the
    # embedding's backward (index_put with accumulate) to atomic adds, summed in whatever order the threads
    # arrive (so may the flash-attention backward), and Muon's bf16 Newton-Schulz carries that along. Such noise
    # stays far below the distance a wrong resume makes (another data position, lost momentum: the size of the
    # training itself), so on CUDA the drift must be under 10% of the weights' own motion since the resume point;
    # the row prints the drift measured, the first GPU run tells how much room that leaves.
    diff = sum(float((got[k].double() - ref[k].double()).norm() ** 2) for k in ref) ** 0.5
    moved = sum(float((ref[k].double() - at_resume[k].double()).norm() ** 2) for k in ref) ** 0.5
    drift = diff / moved if moved else float("inf")
    numbers = f"drift {drift:.1e} of the weights' motion since step {resumed} | bit-exact: {'yes' if exact else 'no'}"
    if p.device == "cpu":
        must(exact, f"the resumed weights differ from the uninterrupted run's on the CPU ({numbers})")
    else:
        must(drift < 0.1, f"the resumed run ended far from the uninterrupted one ({numbers})")
    result = f"killed after step {p.kill_at}, resumed from {resumed}, finished {p.steps}"
    return Row("", result, numbers, True)


def nan_row(w: Work) -> Row:
    """A NaN the rerun reproduces, on this device: rolled back, its data skipped, the run finished (eager: the
    compiled path is a)'s, and a second compile would not fit the time)."""
    p = w.profile
    at, steps = p.save_every + 2, p.save_every + 5
    ckpt, code, output, limit = supervised(w, "nan", f"--debug_fault=nan@step:{at}", "--compile=False", steps=steps,
                                           limit="nan")  # fmt: skip
    finished(code, output, "the run with a NaN", limit)
    from nanochat import checkpoint

    newest = next(checkpoint.valid_newest_first(ckpt), None)
    must(newest is not None and newest.step == steps, f"no final checkpoint at step {steps} in {ckpt}")
    want = [{"skipped": [p.save_every + 1, at], "reason": "nan"}]
    must(newest.meta.rollbacks == want, f"rollbacks {newest.meta.rollbacks}, expected {want}")
    return Row("", f"NaN at step {at}: rerun, rolled back to {p.save_every}, data skipped", f"{steps} steps", True)


def health_row(w: Work) -> Row:
    """The supervisor's device check on this device: right, and wrong when a wrong answer is injected."""
    from supervisor import health

    t0 = time.perf_counter()
    problems = health.device_problems(w.profile.device, 1, w.profile.limits["health"] / 2)
    took = time.perf_counter() - t0
    must(not problems, f"a healthy device failed: {'; '.join(x.line() for x in problems)}")
    os.environ["NANOCHAT_DEBUG_HEALTH"] = "wrong-answer:0"  # read by its subprocess
    try:
        injected = health.device_problems(w.profile.device, 1, w.profile.limits["health"] / 2)
    finally:
        del os.environ["NANOCHAT_DEBUG_HEALTH"]
    must(bool(injected), "an injected wrong answer passed the device check")
    return Row("", "known product right; an injected wrong answer caught", f"{took:.1f}s", True)


def status_json(w: Work, ckpt: Path) -> dict:
    cmd = [sys.executable, "-m", "supervisor.cli", "status", "--json", "--checkpoint-dir", str(ckpt)]
    limit = w.profile.limits["goodput"]
    code, output = run(cmd, w.env, limit, w.root / "status.log")
    finished(code, output, "nanochat-run status --json", limit)
    try:
        return json.loads(output[output.index("{") :])
    except ValueError as e:
        raise CheckFailed(f"nanochat-run status --json printed no JSON ({e}):\n{tail(output)}") from None


# ---- e) goodput -----------------------------------------------------------------------------------------------


def goodput_row(w: Work) -> Row:
    must(w.status is not None, "not run: needs c)'s supervised run")
    ledger = w.status.get("goodput")
    must(isinstance(ledger, dict), 'no "goodput" in `nanochat-run status --json` (the ledger: issue 23 item 1)')
    parts, wall = ledger.get("parts"), ledger.get("wall_s")
    must(isinstance(parts, dict) and isinstance(wall, int | float), f"goodput without parts or wall_s: {ledger}")
    missing = [k for k in PARTS if not isinstance(parts.get(k), int | float)]
    must(not missing, f"goodput parts missing: {', '.join(missing)}")
    total, ratio = sum(parts.values()), ledger.get("ratio")
    shown = " | ".join(f"{k} {v:.1f}s" for k, v in parts.items())
    must(abs(total - wall) <= 2, f"the parts add to {total:.1f}s, not the wall time {wall:.1f}s: {shown}")
    must(abs(parts["unexplained"]) <= 2, f"{parts['unexplained']:.1f}s unexplained: {shown}")
    must(parts["detection"] > 0 and parts["lost steps"] > 0, f"the crash is not in the ledger: {shown}")
    must(ratio is None or 0 <= ratio <= 1, f"goodput ratio {ratio} is not between 0 and 1")
    text = "n/a" if ratio is None else f"{ratio:.2f}"
    return Row("", f"ratio {text} of {wall:.1f}s wall", shown, True)


# ---- b) async save, d) chat: workers in their own process (their own time limit and CUDA context) -------------


def worker_row(w: Work, kind: str) -> Row:
    limit = w.profile.limits[kind]
    cmd = [sys.executable, "-m", "scripts.gpu_check", "--device", w.profile.device, "--worker", kind, "--work",
           str(w.root), "--base-dir", str(w.base)]  # fmt: skip
    if kind == "chat":
        must(w.crashed is not None, "not run: needs c)'s final checkpoint")
        cmd += ["--checkpoint", str(w.crashed)]
    code, output = run(cmd, w.env, limit, w.root / f"{kind}.log")
    r = worker_result(code, output, f"the {kind} worker", limit)
    return (save_verdict if kind == "save" else chat_verdict)(r)


def save_worker(p: Profile, root: Path) -> dict:
    """Three periodic saves of a d<depth> model and its optimizer state, as the trainer makes them (async)."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import OptimConfig, Optimizers
    from nanochat.saver import Saver, tensors

    device = torch.device(p.device)
    with torch.device(device):
        model = GPT(GPTConfig.from_depth(p.depth, p.vocab, p.seq_len, p.head_dim))
    model.to(device)
    model.init_weights(0)
    optimizers = Optimizers(model, OptimConfig())
    saver = Saver(root / "save", keep=2, log=lambda m: None, async_save=True)
    saver.start()
    x = torch.randint(p.vocab, (2, p.seq_len + 1), device=device)
    meta = {"model_config": model.config.to_dict(), "num_iterations": 3}
    blocked = []
    for step in (1, 2, 3):
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizers.step(1.0, 0.95)  # also creates the optimizer state the save copies
        optimizers.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        saver.save(step, model.state_dict(), optimizers.state_dict(), meta, {}, wait=False)
        if device.type == "cuda":
            # save() returns once the device-to-host copies are queued on a side stream, and the training stream
            # waits for them: the caller is free only when they have landed
            torch.cuda.synchronize()
        blocked.append(time.perf_counter() - t0)
        saver.finish()  # the write in the background, to the end, so each save is timed alone
    writes = [r.durable_at - r.started for r in saver.records]
    reported = [r.blocked for r in saver.records]  # what the trainer logs ("blocked Xs") and --save_every=auto uses
    states = [model.state_dict(), optimizers.state_dict()]
    on_gpu = sum(t.numel() * t.element_size() for s in states for t in tensors(s) if t.is_cuda)
    buffers = saver._buffers.values()  # (the saver's reused staging buffers: are they pinned?)
    pinned = sum(b.numel() * b.element_size() for b in buffers if device.type == "cuda" and b.is_pinned())
    total = sum(t.numel() * t.element_size() for s in states for t in tensors(s))
    return {"blocked": blocked, "reported": reported, "writes": writes, "bytes": total, "gpu_bytes": on_gpu,
            "pinned_bytes": pinned}  # fmt: skip


def save_verdict(r: dict) -> Row:
    # the first save allocates the buffers (pinning is slow); the later ones are what every periodic save costs
    blocked, write = statistics.median(r["blocked"][1:]), statistics.median(r["writes"][1:])
    numbers = (f"blocked {blocked:.3f}s vs write {write:.2f}s ({100 * blocked / write:.0f}%) | first save blocked"
               f" {r['blocked'][0]:.2f}s | {r['bytes'] / 1e6:,.0f} MB")  # fmt: skip
    must(r["pinned_bytes"] >= r["gpu_bytes"], f"staging buffers not pinned: {r['pinned_bytes']} of {r['gpu_bytes']}"
         " bytes of GPU state")  # fmt: skip
    must(blocked < 0.25 * write, f"blocking is not much smaller than the write: {numbers}")
    reported = statistics.median(r["reported"][1:])
    # on CUDA the copies are queued on a side stream: the saver's own figure must count them (on the CPU it is the
    # same copy, a few ms, where scheduling noise would decide)
    must(not r["gpu_bytes"] or reported >= 0.5 * blocked,
         f"the saver reports {reported:.3f}s blocked, but the caller waited {blocked:.3f}s: {numbers}")  # fmt: skip
    pinned = f", {r['pinned_bytes'] / 1e6:,.0f} MB pinned" if r["gpu_bytes"] else ""
    return Row("", f"3 background saves{pinned}", numbers, True)


def chat_worker(p: Profile, base: Path, ckpt_dir: Path) -> dict:
    import torch

    from nanochat.engine import Engine, load_checkpoint_model
    from nanochat.tokenizer import get_tokenizer

    device = torch.device(p.device)
    model, _ = load_checkpoint_model(ckpt_dir, -1, device)
    tokenizer = get_tokenizer(base)
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode("import os\nimport sys\n\n\ndef ")]
    # fp32: the KV cache path (prefill once, copy into 2 rows, one token at a time) against a full forward of the
    # whole sequence for every token; greedy, so both must pick the same tokens
    with torch.no_grad():
        reference = model.generate(prompt, max_tokens=32, temperature=0)
    ends = [i for i, t in enumerate(reference) if t in engine.stop]
    reference = reference[: ends[0]] if ends else reference
    cached, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=32, temperature=0)
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # what chat_cli runs on CUDA
        engine.generate_batch(prompt, max_tokens=8, temperature=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = sum(1 for _ in engine.generate(prompt, 1, 128, temperature=0.8, top_k=50, seed=1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        text, _ = engine.generate_batch(prompt, max_tokens=24, temperature=0)
    return {"reference": reference, "cached": cached, "tok_per_s": steps / dt, "steps": steps,
            "sample": tokenizer.decode(text[0]), "vocab": tokenizer.vocab_size}  # fmt: skip


def chat_verdict(r: dict) -> Row:
    must(r["cached"] == [r["reference"]] * 2, f"KV-cached greedy tokens differ from uncached ones: {r}")
    must(len(r["reference"]) > 0 and all(0 <= t < r["vocab"] for t in r["reference"]), f"no sane tokens: {r}")
    sample = r["sample"][:40].encode("unicode_escape").decode()
    return Row("", f"cached == uncached greedy ({len(r['reference'])} tokens)",
               f"decode {r['tok_per_s']:,.0f} tok/s | \"{sample}\"", True)  # fmt: skip


# ---- the table -----------------------------------------------------------------------------------------------


def checks(p: Profile) -> list[tuple[str, str]]:
    cuda = p.device == "cuda"
    return [("training", f"a) d{p.depth} {'compiled bf16' if cuda else 'eager fp32'} training"),
            ("save", f"b) async save ({'pinned buffers' if cuda else 'CPU'})"), ("resume", "c) SIGKILL + resume"),
            ("chat", "d) chat engine (KV cache)"), ("goodput", "e) goodput ledger"),
            ("nan", "f) NaN rollback"), ("health", "g) device health check")]  # fmt: skip


def run_checks(w: Work) -> list[Row]:
    rows: list[Row] = []
    steps = {"training": training_row, "save": lambda w: worker_row(w, "save"), "resume": resume_row,
             "chat": lambda w: worker_row(w, "chat"), "goodput": goodput_row, "nan": nan_row,
             "health": health_row}  # fmt: skip
    try:
        prepare(w)
        ready = None
    except CheckFailed as e:
        ready = f"not run: {e}"
    for key, title in checks(w.profile):
        t0 = time.perf_counter()
        print(f"gpu-check: {title} ...", flush=True)
        try:
            if ready:
                raise CheckFailed(ready)
            row = steps[key](w)
            row.check = title
        except CheckFailed as e:
            row = Row(title, str(e), "", False)
        except Exception as e:  # noqa: BLE001 - a bug of the check itself is a failed row too, not a lost table
            row = Row(title, f"{type(e).__name__}: {e}", "", False)
        print(f"gpu-check: {title}: {'PASS' if row.ok else 'FAIL'} in {time.perf_counter() - t0:.0f}s", flush=True)
        rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    head = ("check", "result", "numbers", "verdict")
    cells = [(r.check, r.result.splitlines()[0], r.numbers, "PASS" if r.ok else "FAIL") for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(4)]
    line = lambda c: "| " + " | ".join(x.ljust(n) for x, n in zip(c, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (n + 2) for n in widths) + "|", *map(line, cells)]
    details = [f"{r.check}:\n{r.result}" for r in rows if not r.ok and "\n" in r.result]
    return "\n".join(out + details)


# ---- the command ---------------------------------------------------------------------------------------------


def refusal(device: str) -> str | None:
    """Why the checks cannot run here (one line), or None."""
    missing = [m for m in NEEDED if not _importable(m)]
    if missing:
        return (f"{sys.executable} lacks {', '.join(missing)}: `make install` (or `make install-cuda`), or on a"
                f" machine with no network `pip install --no-index --find-links DIR {' '.join(missing)}`")  # fmt: skip
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return (
            f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; run it on a GPU"
            " machine after `make install-cuda`, or pass --device cpu to check the plumbing on the CPU"
        )
    return None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(PROFILES), default="cuda", help="cpu: the same checks, small and eager")
    ap.add_argument("--base-dir", type=Path, help="a NANOCHAT_BASE_DIR with data shards and a tokenizer to use")
    ap.add_argument("--work", type=Path, help="the work directory (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints, logs)")
    ap.add_argument("--worker", choices=["save", "chat"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if why := refusal(args.device):
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    p = PROFILES[args.device]
    if args.worker:
        out = save_worker(p, args.work) if args.worker == "save" else chat_worker(p, args.base_dir, args.checkpoint)
        print(RESULT + json.dumps(out), flush=True)
        return 0
    root = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = (args.base_dir or root / "base").resolve()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_SHM_DIR": str(root / "shm"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    if p.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # small models: threads cost more than they give, and tests share the cores
    t0 = time.time()
    print(describe(p, root), flush=True)
    try:
        rows = run_checks(Work(root, base, p, env))
    except KeyboardInterrupt:  # what was running is stopped already (`run`)
        print(f"gpu-check: stopped; logs in {root}", file=sys.stderr)
        return 130
    print(f"\ngpu-check: {len(rows)} checks in {time.time() - t0:.0f}s on {device_name(p.device)}\n{table(rows)}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"gpu-check: logs and checkpoints kept in {root}")
    failed = [r.check for r in rows if not r.ok]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"the CPU (torch {torch.__version__})"


def describe(p: Profile, root: Path) -> str:
    return (f"gpu-check: {device_name(p.device)}; d{p.depth}, {p.steps} steps of {p.batch}x{p.seq_len} tokens,"
            f" SIGKILL after step {p.kill_at}; work dir {root}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
