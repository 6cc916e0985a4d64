"""`nanochat-run`: train (supervised), status, logs, prune. Argument parsing only; the work is elsewhere.

Exit codes: 0 done, 1 failed (gave up, or a bad checkpoint dir), 2 bad usage, 75 stopped by SIGTERM after saving
(requeue the job), 130 stopped by Ctrl+C after saving.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from nanochat import checkpoint, snapshots
from nanochat.config import ConfigError, HelpRequested, describe, parse_args
from nanochat.locks import LockError, lock_holder
from nanochat.paths import (
    DEFAULT_DEPTH,
    PHASE_DIRS,
    PHASE_SCRIPTS,
    checkpoint_tag,
    get_base_dir,
    only_model,
    phase_dirs,
)
from supervisor import report, tail
from supervisor.records import RunDir, read_events

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"nanochat-run {version('nanochat-run')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("nanochat-run (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train a nanochat-style GPT under a supervisor that survives crashes, OOMs, hangs and Ctrl+C."""


DEFAULT_SCRIPT = "scripts.base_train"
CONFIGS = {"scripts.base_train": "TrainConfig", "scripts.mid_train": "MidConfig", "scripts.chat_sft": "SFTConfig"}
PhaseOption = Annotated[
    str, typer.Option(help="The training phase: base, mid (midtraining) or sft; picks its checkpoint folder.")
]
DEFAULT_DIST_TIMEOUT = 1800  # the trainer's --dist_timeout default, for a --script we cannot parse
GRACE_MARGIN = 300  # the default --grace-period is the trainer's --dist_timeout plus this


class UsageProblem(Exception):
    """Bad input: printed as one line, exit 2."""


def resolve_dirs(
    checkpoint_dir: Path | None,
    run_dir: Path | None,
    depth: int | None,
    model_tag: str | None,
    new: bool = False,
    phase: str = "base",
) -> tuple[Path, Path]:
    """Checkpoint dir as the trainer computes it; the run dir sits beside it (`<checkpoint dir>.run`)."""
    if phase not in PHASE_DIRS:
        raise UsageProblem(f"--phase must be one of {', '.join(PHASE_DIRS)}, got {phase!r}")
    if checkpoint_dir is None and run_dir is not None:
        if not new and not run_dir.is_dir():  # status and prune read an existing run; train may start one
            raise UsageProblem(f"no run dir at {run_dir}: pass the run dir of a supervised run, or --checkpoint-dir")
        starts = [e for e in read_events(RunDir(run_dir)) if e.get("event") == "run_start"]
        if starts:
            checkpoint_dir = Path(starts[-1]["checkpoint_dir"])
    if checkpoint_dir is None:
        try:  # the trainer's own check: a tag is a plain folder name under base_checkpoints/ (or the phase's)
            if phase == "base" or model_tag:
                tag = checkpoint_tag(model_tag or "", depth or DEFAULT_DEPTH)
            else:
                tag = only_model(phase)
        except ConfigError as e:
            raise UsageProblem(str(e).replace("--model_tag", "--model-tag")) from None
        checkpoint_dir = get_base_dir() / PHASE_DIRS[phase] / tag
    checkpoint_dir = checkpoint_dir.expanduser().resolve()
    return checkpoint_dir, (run_dir or checkpoint_dir.with_name(checkpoint_dir.name + ".run")).expanduser().resolve()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_torch_sees_the_gpus() -> None:
    """Refuse to train on the CPU of a GPU machine by accident: nvidia-smi lists GPUs but torch cannot use them
    (the CPU build that `make install` puts in, or a driver older than torch's CUDA)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return
    gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
    import torch

    if not gpus or torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        raise UsageProblem(
            f"nvidia-smi lists {len(gpus)} GPU(s) but torch {torch.__version__} is a CPU build: run `make install-cuda`"
            " (or pass `-- --device_type=cpu` to train on the CPU anyway)"
        )
    raise UsageProblem(
        f"nvidia-smi lists {len(gpus)} GPU(s) but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use"
        " them (torch.cuda.is_available() is False: is the driver older than that CUDA?); fix the driver or the"
        " build (`make install-cuda CUDA=cu126`), or pass `-- --device_type=cpu`"
    )


# ---------------------------------------------------------------------------------------------------------------
# train


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    depth: Annotated[int | None, typer.Option(help="Model depth (the trainer's --depth). Default: 20.")] = None,
    num_iterations: Annotated[
        int | None,
        typer.Option(help="The step budget (the trainer's --num_iterations). Default: 20 tokens per parameter."),
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Save a checkpoint every N steps; 0 = only the final one. Default: 500.")
    ] = None,
    keep_last_n: Annotated[
        int | None, typer.Option(help="Keep the newest N checkpoints; -1 keeps all. Default: 3.")
    ] = None,
    device_batch_size: Annotated[
        int | None, typer.Option(help="Sequences per micro-batch on each GPU. Default: 32.")
    ] = None,
    model_tag: Annotated[
        str | None, typer.Option(help="Checkpoint subfolder name (default: d<depth>; mid/sft: the source's one model).")
    ] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Where checkpoints go (overrides --model-tag).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Event log, heartbeat and attempt logs.")] = None,
    phase: PhaseOption = "base",
    script: Annotated[
        str | None, typer.Option(help="The training module torchrun runs on every worker (default: the phase's).")
    ] = None,
    nproc_per_node: Annotated[int | None, typer.Option(help="Workers per node (default: all GPUs, 1 on CPU).")] = None,
    nnodes: Annotated[str, typer.Option(help="torchrun --nnodes (e.g. 2 or 1:4).")] = "1",
    node_rank: Annotated[int | None, typer.Option(help="torchrun --node-rank.")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="torchrun --rdzv-endpoint host:port.")] = None,
    max_restarts: Annotated[int, typer.Option(help="Restarts allowed after the first attempt.")] = 5,
    max_no_progress: Annotated[
        int, typer.Option(help="Give up after this many attempts in a row without a new checkpoint.")
    ] = 3,  # noqa: E501
    backoff: Annotated[float, typer.Option(help="Seconds before the first restart; doubles per failed attempt.")] = 5.0,
    backoff_cap: Annotated[float, typer.Option(help="Longest wait between attempts, in seconds.")] = 300.0,
    hang_timeout: Annotated[
        float, typer.Option(help="Seconds without a step before a run counts as hung; 0 turns the check off.")
    ] = 1800.0,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds allowed until the first step; 0 turns the check off.")
    ] = 3600.0,
    grace_period: Annotated[
        float | None,
        typer.Option(
            help="Seconds a worker gets to save after a stop signal (or after its torchrun died) before it is killed."
            " Default: the trainer's --dist_timeout + 300 (2100 s); it should exceed --dist_timeout."
        ),
    ] = None,
    oom_shrink: Annotated[
        bool, typer.Option(help="Halve the device batch after a CUDA OOM (or a host OOM of a CPU trainer).")
    ] = True,
    progress_every: Annotated[float, typer.Option(help="Seconds between progress lines when not on a terminal.")] = 30,
    dry_run: Annotated[
        bool, typer.Option(help="Print the torchrun command and the resolved trainer settings, then exit.")
    ] = False,
) -> None:
    """Run the trainer under torchrun and keep it going until the step budget is reached.

    Everything after `--` goes to the trainer untouched, e.g. `nanochat-run train --depth 4 -- --max_seq_len=512`.
    Trainer defaults that matter: max_seq_len 2048, total_batch_size 524288 tokens, eval_every 250 steps,
    eval_tokens auto (all evaluations together read at most a tenth of the training tokens, one at most 10M).
    `nanochat-run train -- --help` lists every trainer setting with its default.
    """
    from supervisor.agent import Agent, TrainOptions
    from supervisor.display import Display, make_display
    from supervisor.policy import Policy

    extra = list(ctx.args)
    if phase not in PHASE_SCRIPTS:
        raise UsageProblem(f"--phase must be one of {', '.join(PHASE_SCRIPTS)}, got {phase!r}")
    phase_of = {s: p for p, s in PHASE_SCRIPTS.items()}
    if script in phase_of and phase != "base" and phase_of[script] != phase:
        raise UsageProblem(f"--script {script} is the {phase_of[script]} phase's, not --phase {phase}'s: give one")
    phase = phase_of.get(script, phase) if script else phase  # --script scripts.mid_train means --phase mid
    script = script or PHASE_SCRIPTS[phase]
    check_launch(script, nproc_per_node, nnodes, node_rank, progress_every)
    for name, value in (("max_restarts", max_restarts), ("max_no_progress", max_no_progress)):
        if value < 0 or (name == "max_no_progress" and value < 1):
            raise UsageProblem(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'max_no_progress' else '>= 0'}")
    timings = {"hang_timeout": hang_timeout, "startup_timeout": startup_timeout, "backoff": backoff,
               "backoff_cap": backoff_cap, "grace_period": grace_period}  # fmt: skip
    for name, value in timings.items():
        if value is not None and value < 0:
            raise UsageProblem(f"--{name.replace('_', '-')} must be >= 0 seconds, got {value}")
    settings = {"depth": depth, "num_iterations": num_iterations, "save_every": save_every,
                "keep_last_n_checkpoints": keep_last_n, "device_batch_size": device_batch_size,
                "model_tag": model_tag}  # fmt: skip
    trainer_args = [f"--{k}={v}" for k, v in settings.items() if v is not None] + extra
    dist_timeout, fresh, budget = DEFAULT_DIST_TIMEOUT, False, None
    if script in CONFIGS:  # a phase of ours: check its settings now, not after torchrun has started
        try:
            cfg, _ = parse_args(getattr(importlib.import_module(script), CONFIGS[script])(), trainer_args)
            if cfg.checkpoint_dir and checkpoint_dir is None:
                checkpoint_dir = Path(cfg.checkpoint_dir)
            if script != "scripts.base_train" and checkpoint_dir is None:  # where the chat phase will save
                checkpoint_dir = phase_dirs(phase, cfg.model_tag, cfg.checkpoint_dir, cfg.source_dir)[0]
        except ConfigError as e:
            raise UsageProblem(f"trainer setting: {e}") from None
        except HelpRequested as h:  # `nanochat-run train -- --help`: the trainer's settings
            print(h)
            raise typer.Exit(0) from None
        depth, model_tag = getattr(cfg, "depth", None), cfg.model_tag or None
        if cfg.device_type != "cpu":
            check_torch_sees_the_gpus()
        dist_timeout, fresh = cfg.dist_timeout, not cfg.resume
        budget = cfg.num_iterations if cfg.num_iterations > 0 else None
    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, new=True)
    nproc = nproc_per_node or gpu_count() or 1
    policy = Policy(max_restarts, max_no_progress, backoff, backoff_cap, oom_shrink)
    grace = grace_period if grace_period is not None else dist_timeout + GRACE_MARGIN
    opts = TrainOptions(script, trainer_args, ckpt_dir, run_path, nproc, nnodes, node_rank, rdzv_endpoint,
                        hang_timeout, startup_timeout, grace, fresh, budget, policy)  # fmt: skip
    if dry_run:
        print_dry_run(Agent(opts, Display()), script in CONFIGS)
        return
    display = make_display(progress_every)
    display.event(f"nanochat-run: {nproc} worker(s), checkpoints in {ckpt_dir}, run dir {run_path}")
    if grace <= dist_timeout:
        display.event(f"warning: --grace-period={grace:g}s is not longer than the trainer's --dist_timeout="
                      f"{dist_timeout}s: a stop may kill a save the other ranks still wait for")  # fmt: skip
    try:
        code = Agent(opts, display).run()
    except LockError as e:
        display.close()
        raise UsageProblem(str(e)) from None
    display.close()
    raise typer.Exit(code)


def print_dry_run(agent, resolve: bool) -> None:
    """What `train` would run first: the torchrun command line and, for the built-in trainer, every setting."""
    spec = agent.launch_spec(agent.run_dir.attempt(agent.run_dir.next_attempt()))
    print(shlex.join(spec.command()))
    if resolve:
        defaults = getattr(importlib.import_module(spec.script), CONFIGS[spec.script])()
        print(f"trainer settings of the first attempt:\n{describe(parse_args(defaults, spec.trainer_args)[0])}")
    o = agent.opts
    print(
        f"supervisor: --max-restarts={o.policy.max_restarts} --grace-period={o.grace_period:g}s"
        f" --hang-timeout={o.hang_timeout:g}s --startup-timeout={o.startup_timeout:g}s; run dir {o.run_dir}"
    )


def check_launch(script: str, nproc: int | None, nnodes: str, node_rank: int | None, progress_every: float) -> None:
    """What torchrun would only reject after a crash loop of ~20 s: refuse it now, in one line."""
    if nproc is not None and nproc < 1:
        raise UsageProblem(f"--nproc-per-node must be >= 1 (or left out: all GPUs, 1 on CPU), got {nproc}")
    m = re.fullmatch(r"(\d+)(?::(\d+))?", nnodes)
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
        raise UsageProblem(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX (e.g. 2 or 1:4), got {nnodes!r}")
    if node_rank is not None and node_rank < 0:
        raise UsageProblem(f"--node-rank must be >= 0, got {node_rank}")
    if progress_every <= 0:
        raise UsageProblem(f"--progress-every must be > 0 seconds, got {progress_every:g}")
    try:
        found = importlib.util.find_spec(script) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageProblem(f"--script {script!r}: no such Python module here; the default is {DEFAULT_SCRIPT}")


# ---------------------------------------------------------------------------------------------------------------
# status and logs


@app.command()
def status(
    run_dir: Annotated[Path | None, typer.Option(help="The run dir of a supervised run.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir.")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth (d<depth>).")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON for scripts (one line per refresh with --watch).")
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Verify every checkpoint fully: checksums and a safe load (slower: imports torch).")
    ] = False,
    watch: Annotated[
        bool, typer.Option(help="Refresh until the run ends, then print the final status (Ctrl+C stops watching).")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    phase: PhaseOption = "base",
) -> None:
    """Show checkpoints, progress to the budget, each `train` invocation with its attempts, and the live run."""
    if interval <= 0:
        raise UsageProblem(f"--interval must be > 0 seconds, got {interval:g}")
    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    if not ckpt_dir.is_dir():
        raise UsageProblem(f"no checkpoint dir at {ckpt_dir}: pass --checkpoint-dir, --run-dir or --model-tag")
    if not watch:
        print_status(report.gather_status(ckpt_dir, run_path, verify), json_out)
        return
    try:
        watch_status(ckpt_dir, run_path, verify, interval, json_out)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def print_status(info: dict, json_out: bool, indent: int | None = 1) -> None:
    if json_out:
        print(json.dumps(info, indent=indent, default=str), flush=True)
    else:
        report.console().print(report.render(info))


def watch_status(ckpt_dir: Path, run_path: Path, verify: bool, interval: float, json_out: bool) -> None:
    """Refresh until the run is over (no supervisor or trainer lock, no fresh heartbeat), then print the final
    status once. A live panel on a terminal; off one, a block (or a JSON line) per refresh, for logs and scripts."""
    live = None
    if sys.stdout.isatty() and not json_out:
        from rich.live import Live

        live = Live(console=report.console(), auto_refresh=False, transient=True)
        live.start()
    try:
        while (info := report.gather_status(ckpt_dir, run_path, verify))["active"]:
            if live:
                live.update(report.render(info), refresh=True)
            else:
                print_status(info, json_out, indent=None)
                if not json_out:
                    print(flush=True)  # a blank line between blocks
            time.sleep(interval)
    finally:
        if live:
            live.stop()
    print_status(info, json_out, indent=None if json_out else 1)


@app.command()
def logs(
    run_dir: Annotated[Path | None, typer.Option(help="The run dir of a supervised run.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir (its run dir is beside it).")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth (d<depth>).")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    attempt: Annotated[int | None, typer.Option(help="The attempt's number (default: the newest).")] = None,
    rank: Annotated[
        int | None, typer.Option(help="A worker's own stdout and stderr, by local rank, instead of torchrun's log.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run's supervisor is gone (Ctrl+C stops).")
    ] = False,
    phase: PhaseOption = "base",
) -> None:
    """Print an attempt's log: torchrun's output (every rank's lines), or one rank's stdout and stderr."""
    if rank is not None and rank < 0:
        raise UsageProblem(f"--rank must be >= 0, got {rank}")
    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    if not run_path.is_dir():
        raise UsageProblem(f"no run dir at {run_path}: pass --run-dir, or the --checkpoint-dir of a supervised run")
    run = RunDir(run_path)
    try:
        n, found = tail.pick(run, attempt, rank)
    except tail.NotFound as e:
        raise UsageProblem(str(e)) from None
    try:
        if follow:
            alive = lambda: lock_holder(ckpt_dir) is not None  # noqa: E731
            tail.follow(run, n, found, rank, newest=attempt is None, alive=alive)
        else:
            tail.show(found)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `nanochat-run logs | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        raise typer.Exit(0) from None


# ---------------------------------------------------------------------------------------------------------------
# prune


@app.command()
def prune(
    keep: Annotated[int, typer.Option(help="Keep the newest N valid checkpoints (the final one is always kept).")] = 3,
    run_dir: Annotated[Path | None, typer.Option(help="The run dir of a supervised run.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir.")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth.")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only show what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option(help="Prune even while a supervisor is running on this dir.")] = False,
    stale_snapshots: Annotated[
        bool,
        typer.Option(
            "--snapshots",
            help="Instead of checkpoints, remove your in-memory snapshots (/dev/shm) that no run needs any more: their"
            " checkpoint dir is gone or holds another run, or they are not newer than its newest checkpoint.",
        ),
    ] = False,
    phase: PhaseOption = "base",
) -> None:
    """Delete old checkpoints by the checkpoint module's rules: never the newest valid, the final or a damaged one."""
    if stale_snapshots:
        prune_snapshots(dry_run, yes)
        return
    if keep < 1:
        raise UsageProblem(f"--keep must be >= 1, got {keep}")
    ckpt_dir, _ = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    if not ckpt_dir.is_dir():
        raise UsageProblem(f"no checkpoint dir at {ckpt_dir}: pass --checkpoint-dir, --run-dir or --model-tag")
    if not any(c.committed for c in checkpoint.scan(ckpt_dir)):
        raise UsageProblem(f"no checkpoints in {ckpt_dir}: nothing to prune")
    holder = lock_holder(ckpt_dir)
    if holder and not force and not dry_run:
        raise UsageProblem(f"a supervisor (pid {holder.get('pid')}) is running on {ckpt_dir}; stop it or pass --force")
    trainer = lock_holder(ckpt_dir, "trainer")
    if trainer and not force and not dry_run:
        raise UsageProblem(f"a trainer (pid {trainer.get('pid')}) is writing to {ckpt_dir}; stop it or pass --force")
    doomed = checkpoint.plan_prune(ckpt_dir, keep)
    freed = sum(c.size for c in doomed)
    if not doomed:
        print(f"nothing to prune in {ckpt_dir} (keeping the newest {keep})")
        return
    for c in doomed:
        print(f"{'would delete' if dry_run else 'delete'} step {c.step}: {', '.join(p.name for p in c.paths)}")
    print(f"{'would free' if dry_run else 'frees'} {freed / 1e6:.1f} MB in {ckpt_dir}")
    if dry_run:
        return
    if not yes and not confirm("delete these files?"):
        raise typer.Exit(1)
    removed = checkpoint.prune(ckpt_dir, keep)
    print(f"deleted {len(removed)} files, freed {freed / 1e6:.1f} MB")
    point = checkpoint.find_resume_point(ckpt_dir, warn=lambda msg: None)
    if point and point[0] == ckpt_dir and snapshots.remove(ckpt_dir):  # a resume would not use them
        print("removed the in-memory snapshots (not newer than the newest checkpoint)")


def confirm(question: str) -> bool:
    """Ask on a terminal; off one (a script, CI) there is nobody to ask: refuse rather than guess."""
    if not sys.stdin.isatty():
        raise UsageProblem("refusing to delete without --yes (not a terminal)")
    return typer.confirm(question, default=False)


def prune_snapshots(dry_run: bool, yes: bool) -> None:
    """`prune --snapshots`: this user's snapshot folders that no live or future run needs."""
    found = snapshots.stale()
    if not found:
        print(f"no stale in-memory snapshots under {snapshots.root()}")
        return
    sizes = {home: sum(p.stat().st_size for p in home.rglob("*") if p.is_file()) for home, _ in found}
    for home, why in found:
        print(f"{'would remove' if dry_run else 'remove'} {home} ({sizes[home] / 1e6:.1f} MB): {why}")
    if dry_run:
        return
    if not yes and not confirm("remove these snapshots?"):
        raise typer.Exit(1)
    removed = [home for home, _ in found if snapshots.remove_home(home)]
    print(f"removed {len(removed)} snapshot folders, freed {sum(sizes[h] for h in removed) / 1e6:.1f} MB")


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry: one line for every usage error, never a traceback for bad input."""
    if len(sys.argv) == 1:  # bare `nanochat-run`: the help, and success
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (UsageProblem, checkpoint.CheckpointError, OSError) as e:
        print(f"nanochat-run: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageProblem) else 1)
    except Exception as e:
        if not hasattr(e, "format_message"):  # click's usage errors (typer may vendor its own click)
            raise
        print(f"nanochat-run: error: {e.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
