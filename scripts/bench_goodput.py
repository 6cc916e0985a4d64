"""Goodput side by side: the same small CPU run under the same seeded fault schedule, with and without us.

    python -m scripts.bench_goodput [--quick] [--seed 0] [--arms snapshots,disk,torchrun,loop]

Every arm trains the same tiny model (2 gloo workers, depth 1, the same trainer settings and step budget) and
gets the same faults, injected from outside by this bench with real signals on the arm's worker processes (found
with psutil, by rank): a worker SIGKILLed every ~5 s (--quick) or ~10 s of training (the gaps and ranks drawn from
--seed), one hang (SIGSTOP of one worker) and one Ctrl+C (SIGINT to the arm's process group, as a terminal sends
it), after which the bench reruns the same command. A fault's clock is training time: it starts when the arm is
back to training steps after the previous fault, so every arm trains as long between two faults.

Arms:
  snapshots  `nanochat-run train` (supervisor defaults), disk checkpoints every --save-every steps, in-memory
             snapshots every --snapshot-every steps
  disk       `nanochat-run train`, disk checkpoints only
  torchrun   plain `torchrun --max-restarts=K` over scripts.base_train with --resume=True: torchrun restarts its
             workers after a failure; nothing restarts it after the Ctrl+C but the bench's rerun
  loop       upstream-style: a shell loop that reruns `torchrun --max-restarts=0` after any failure (until it exits
             0), checkpoints every --save-every steps, no supervisor, and resumes as upstream nanochat does
             (--resume_exact=False: weights, optimizer and schedule; the data from a row-group boundary, the RNG
             afresh). The other arms resume exactly (weights, optimizer, data position, RNG)

Goodput is measured alike for all arms, by supervisor/goodput.py on the records the bench collects. Wall time is
the bench's clock over the arm's processes, one span per invocation (the gap between the Ctrl+C and the rerun is
shown apart, not counted). Supervised arms: the attempts and their parts from the run's events.jsonl. The others:
an attempt is one set of worker processes (its start: their creation; its end: the last one seen gone), its
parts from its last heartbeat (`--heartbeat_file`, the trainer writes it with no supervisor) by the ledger's own
`attempt_parts`; what neither the trainer nor the bench measured is left as unexplained.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nanochat import checkpoint
from nanochat.lifeline import started_at
from scripts.benchlib import TINY_TRAINER, prepare, run_env, workers
from supervisor import goodput, procs, report
from supervisor.records import RunDir, read_events, read_heartbeat

ARMS = ("snapshots", "disk", "torchrun", "loop")
SUPERVISED = ("snapshots", "disk")
POLL = 0.05  # seconds between looks at the processes and the heartbeat


@dataclass(frozen=True)
class Fault:
    after: float  # seconds of training since the arm was last back to training steps (or began)
    kind: str  # kill | hang | ctrl-c
    rank: int  # the worker signalled (kill, hang)


def schedule(seed: int, every: float, kills: int, nproc: int) -> list[Fault]:
    """`kills` SIGKILLs of a random rank, ~`every` seconds of training apart (0.75x to 1.25x, drawn), with the one
    hang second and the one Ctrl+C third (so that both land in mid-run, after a restart)."""
    rng = random.Random(seed)
    kinds = ["kill"] * kills
    kinds[1:1] = ["hang", "ctrl-c"]
    return [Fault(round(every * rng.uniform(0.75, 1.25), 1), k, rng.randrange(nproc)) for k in kinds]


@dataclass
class Attempt:
    """One set of worker processes (an unsupervised arm's attempt), as the bench saw it."""

    pids: set[int]
    started: float  # the earliest worker's creation
    ended: float | None = None
    hb: dict = field(default_factory=dict)  # its last heartbeat
    first: int | None = None  # the step it resumed from
    stopped: bool = False  # it got the Ctrl+C (a stop save: a clean end)


@dataclass
class Invocation:
    started: float
    ended: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    interrupted: bool = False  # ended by the Ctrl+C


@dataclass
class Arm:
    name: str
    ckpt: Path
    run_dir: Path
    invocations: list[Invocation] = field(default_factory=list)
    pending: list[Fault] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    last_hb: dict = field(default_factory=dict)
    led: goodput.Ledger | None = None  # filled in once the arm is done, while its run dir exists
    attempts: int = 0

    @property
    def heartbeat(self) -> Path:
        return RunDir(self.run_dir).heartbeat


def command(arm: Arm, args: argparse.Namespace) -> list[str]:
    """The arm's command line: the same trainer settings for all, the way each arm runs them."""
    trainer = [*TINY_TRAINER, f"--dist_timeout={args.dist_timeout}", "--seed=0"]
    if arm.name in SUPERVISED:
        snap = args.snapshot_every if arm.name == "snapshots" else 0
        return [sys.executable, "-m", "supervisor.cli", "train", "--checkpoint-dir", str(arm.ckpt), "--run-dir",
                str(arm.run_dir), "--nproc-per-node", str(args.nproc), "--depth", str(args.depth), "--num-iterations",
                str(args.steps), "--save-every", str(args.save_every), "--", *trainer,
                f"--snapshot_every={snap}"]  # fmt: skip
    restarts = args.max_restarts if arm.name == "torchrun" else 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                f"--max-restarts={restarts}", "-m", "scripts.base_train", "--", f"--depth={args.depth}",
                f"--num_iterations={args.steps}", f"--save_every={args.save_every}", "--resume=True",
                f"--checkpoint_dir={arm.ckpt}", f"--heartbeat_file={arm.heartbeat}", *trainer]  # fmt: skip
    if arm.name == "torchrun":
        return torchrun
    torchrun.append("--resume_exact=False")
    # a Ctrl+C ends the loop as it ends a user's: the trap runs once the foreground torchrun has exited
    return ["bash", "-c", "trap 'exit 130' INT; until \"$@\"; do echo 'loop: torchrun failed, rerunning'; done",
            "loop", *torchrun]  # fmt: skip


def fire(arm: Arm, fault: Fault, proc: subprocess.Popen, ws: list[psutil.Process], t_arm: float) -> None:
    step = arm.last_hb.get("step")
    if fault.kind == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # the arm's process group, as a terminal's Ctrl+C
        arm.fired.append(f"Ctrl+C at {t_arm:.0f}s (step {step})")
        return
    ws[fault.rank].send_signal(signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)
    arm.fired.append(f"{'SIGKILL' if fault.kind == 'kill' else 'SIGSTOP'} rank {fault.rank} at {t_arm:.0f}s"
                     f" (step {step})")  # fmt: skip


def invoke(arm: Arm, args: argparse.Namespace, env: dict[str, str], t_arm0: float) -> Invocation:
    """One run of the arm's command to its exit, firing the faults that fall due; tracks its worker sets."""
    inv = Invocation(time.time())
    log = open(arm.run_dir.parent / f"{arm.name}.out", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command(arm, args), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    cur: Attempt | None = None
    training_since: float | None = None  # when the current worker set beat its first training step
    faulted: set[int] = set()  # the workers the last fault hit: the clock restarts with a new set
    while True:
        done = proc.poll() is not None
        now = time.time()
        hb = read_heartbeat(arm.heartbeat) or {}
        ws = workers(proc.pid)
        pids = {p.pid for p in ws}
        if cur is not None and hb.get("pid") in cur.pids and hb.get("time", 0) >= cur.started:
            cur.hb = hb
        if hb.get("time", 0) >= inv.started:
            arm.last_hb = hb
        if cur is not None and cur.ended is None and not (pids & cur.pids):
            cur.ended = now
        if pids and (cur is None or not (pids & cur.pids)):  # a new set of workers: a new attempt
            cur = Attempt(pids, min(started_at(p.pid) for p in ws))
            inv.attempts.append(cur)
        elif cur is not None and pids:
            cur.pids |= pids  # the second worker showed up
        if cur is not None and cur.first is None and cur.hb:
            cur.first = cur.hb["step"] - (cur.hb.get("phase") != "starting")
        if done:
            break
        live = hb.get("pid") in pids and not (pids & faulted)
        if training_since is None and live and hb.get("phase") == "training" and hb["time"] > inv.started:
            training_since = hb["time"]
        if arm.pending and training_since is not None and now - training_since >= arm.pending[0].after \
                and len(ws) == args.nproc:  # fmt: skip
            fault = arm.pending.pop(0)
            fire(arm, fault, proc, ws, now - t_arm0)
            faulted, training_since = set(pids), None
            if fault.kind == "ctrl-c":
                inv.interrupted = True
                if cur is not None:
                    cur.stopped = True
        time.sleep(POLL)
    inv.ended = time.time()
    if cur is not None and cur.ended is None:
        cur.ended = inv.ended
    log.close()
    leftovers = [p for p in psutil.process_iter() if str(arm.ckpt) in " ".join(_cmdline(p))]
    procs.send(leftovers, signal.SIGCONT)  # nothing the arm started may outlive it (a stopped worker included)
    procs.send(leftovers, signal.SIGKILL)
    return inv


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def run_arm(name: str, args: argparse.Namespace, base: Path, faults: list[Fault]) -> Arm:
    arm = Arm(name, base / "ckpt" / name, base / "runs" / name, pending=list(faults))
    arm.run_dir.parent.mkdir(exist_ok=True)
    if name not in SUPERVISED:  # the supervisor makes its own (and refuses a foreign one)
        arm.run_dir.mkdir()
    env, t0 = run_env(base), time.time()
    while True:
        inv = invoke(arm, args, env, t0)
        arm.invocations.append(inv)
        t0 -= time.time() - inv.ended  # the arm's clock skips the gap before the rerun
        if not inv.interrupted:
            return arm


def ledger(arm: Arm) -> goodput.Ledger:
    """The arm's goodput ledger, by supervisor/goodput.py, each invocation spanning the bench's own clock."""
    if arm.name in SUPERVISED:  # the supervisor recorded each attempt's parts in its events
        runs = report.invocations(read_events(RunDir(arm.run_dir)), None)
        for run, inv in zip(runs, arm.invocations, strict=True):
            run.update(started=inv.started, ended=inv.ended)
        return goodput.ledger(runs)
    attempts = [a for inv in arm.invocations for a in inv.attempts]
    runs = []
    for inv in arm.invocations:
        rows = []
        for a in inv.attempts:
            after = attempts[attempts.index(a) + 1 :]
            resumes_at = after[0].first if after else None
            clean = a.hb.get("phase") == "done" or a.stopped
            parts = goodput.attempt_parts(a.hb, a.started, a.ended or inv.ended, a.first or 0, resumes_at, clean)
            rows.append({"started": a.started, "ended": a.ended, "start_step": a.first, "ledger": parts})
        runs.append({"started": inv.started, "ended": inv.ended, "outcome": "done", "attempts": rows})
    return goodput.ledger(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="800 steps, 2 kills ~5 s apart (default: 2000, 4 ~10 s apart)")
    ap.add_argument("--seed", type=int, default=0, help="draws the fault schedule (gaps, ranks)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"a comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--dist-timeout", type=int, default=20, help="the trainer's --dist_timeout, in every arm")
    ap.add_argument("--max-restarts", type=int, default=10, help="torchrun's, in the torchrun arm")
    ap.add_argument("--snapshot-every", type=int, default=5)
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"bench_goodput: unknown arm {','.join(bad) or '(none)'}; pass --arms with some of"
                         f" {','.join(ARMS)}")  # fmt: skip
    args.steps, args.save_every, every, kills = (800, 50, 5.0, 2) if args.quick else (2000, 50, 10.0, 4)
    faults = schedule(args.seed, every, kills, args.nproc)
    done: list[Arm] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare(base)
        for name in arms:
            t0 = time.time()
            done.append(run_arm(name, args, base, faults))
            print(f"bench_goodput: arm {name} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
            final = checkpoint.find_latest_valid(done[-1].ckpt, lambda _: None)
            done[-1].last_hb["final_step"] = final.step if final else None
            done[-1].led, done[-1].attempts = ledger(done[-1]), _attempts(done[-1])
    show(done, args, faults)


def show(arms: list[Arm], args: argparse.Namespace, faults: list[Fault]) -> None:
    print(f"bench_goodput: depth {args.depth}, {args.nproc} workers (gloo, CPU), {args.steps} steps, checkpoint"
          f" every {args.save_every} steps (snapshots arm: + in memory every {args.snapshot_every}), trainer"
          f" --dist_timeout={args.dist_timeout} in every arm (an unsupervised hang ends when it fires)")  # fmt: skip
    what = {"snapshots": f"nanochat-run train (defaults: --backoff 5s, --hang-timeout auto), snapshots in memory"
                         f" every {args.snapshot_every} steps",
            "disk": "nanochat-run train as above, disk checkpoints only",
            "torchrun": f"torchrun --max-restarts={args.max_restarts} over scripts.base_train --resume=True; the bench"
                        " reruns it after the Ctrl+C",
            "loop": "bash loop rerunning torchrun --max-restarts=0 after any failure, no supervisor, resuming"
                    " as upstream nanochat does (--resume_exact=False)"}  # fmt: skip
    for a in arms:
        print(f"  {a.name:<10} {what[a.name]}")
    print("  the other arms resume exactly (weights, optimizer, data position, RNG)")
    print("faults (after s of training, same for every arm): " + ", ".join(
        f"{f.after:g}s {f.kind}" + (f" rank {f.rank}" if f.kind != "ctrl-c" else "") for f in faults))  # fmt: skip
    leds = {a.name: a.led or goodput.Ledger() for a in arms}
    best = max((led.ratio or 0.0) for led in leds.values()) or 1.0
    w = 17
    print(f"{'':<22}" + "".join(f"{a.name:>{w}}" for a in arms))
    for k in goodput.PARTS:
        print(f"{k:<22}" + "".join(f"{leds[a.name].parts[k]:>{w - 8}.1f}s {_pct(leds[a.name], k):>6}" for a in arms))
    print(f"{'wall (bench clock)':<22}" + "".join(f"{leds[a.name].wall:>{w - 1}.1f}s" for a in arms))
    print(f"{'goodput':<22}" + "".join(f"{100 * (leds[a.name].ratio or 0):>{w - 1}.1f}%" for a in arms))
    print(f"{'ratio to the best':<22}" + "".join(f"{(leds[a.name].ratio or 0) / best:>{w}.2f}" for a in arms))
    print(f"{'rerun gap (excluded)':<22}" + "".join(f"{leds[a.name].between:>{w - 1}.1f}s" for a in arms))
    print(f"{'reached the budget':<22}" + "".join(f"{str(a.last_hb.get('final_step') == args.steps):>{w}}"
                                                  for a in arms))  # fmt: skip
    loss = [a.last_hb.get("loss") for a in arms]
    print(f"{'final loss':<22}" + "".join(f"{x:>{w}.4f}" if isinstance(x, float) else f"{'-':>{w}}" for x in loss))
    print(f"{'attempts':<22}" + "".join(f"{a.attempts:>{w}}" for a in arms))
    for a in arms:
        print(f"{a.name}: " + "; ".join(a.fired) + (f" ({len(a.pending)} faults not fired: it finished first)"
                                                     if a.pending else ""))  # fmt: skip


def _pct(led: goodput.Ledger, k: str) -> str:
    return f"{100 * led.parts[k] / led.wall:.0f}%" if led.wall > 0 else "-"


def _attempts(arm: Arm) -> int:
    if arm.name in SUPERVISED:
        return sum(len(r["attempts"]) for r in report.invocations(read_events(RunDir(arm.run_dir)), None))
    return sum(len(inv.attempts) for inv in arm.invocations)


if __name__ == "__main__":
    main()
