"""`nanochat-run`: train (supervised), speedrun (every phase), status, logs, prune, pull and push (remote copies),
plot (a PNG of a run) and eval (across checkpoints). Argument parsing only; the work is elsewhere.

Exit codes: 0 done, 1 failed (gave up, or a bad checkpoint dir), 2 bad usage, 75 stopped by SIGTERM after saving
(requeue the job), 130 stopped by Ctrl+C after saving.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from nanochat import checkpoint
from nanochat.checkpoint import snapshots
from nanochat.config import ConfigError, HelpRequested, describe, parse_args
from nanochat.lifeline import started_at
from nanochat.locks import LockError, lock_holder
from nanochat.paths import (
    DEFAULT_DEPTH,
    checkpoint_tag,
    get_base_dir,
)
from nanochat.redact import redact
from nanochat.registry import DEFAULT, by_script
from nanochat.settings import TrainConfig, config_of
from supervisor import cli_remote, eval_cmd, report, tail
from supervisor.launch import (
    Supervision,
    UsageProblem,
    check_script,
    phase_of_script,
    resolve,
    train_options,
)
from supervisor.options import (
    BackoffCapOption,
    BackoffOption,
    GraceOption,
    HangOption,
    HealthOption,
    MaxNoProgressOption,
    MaxRestartsOption,
    NprocOption,
    OomShrinkOption,
    PhaseOption,
    PreemptionEndpointOption,
    PreemptionOption,
    ProgressOption,
    RemoteOption,
    SpareOption,
    StartupOption,
    confirm,
    number,
    phase_defaults,
    resolve_dirs,
    timeout_text,
)
from supervisor.records import RunDir
from supervisor.speedrun_report import is_speedrun, phase_status

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


# ---------------------------------------------------------------------------------------------------------------
# train


_BASE = TrainConfig()
SUP = Supervision()  # the supervisor's defaults (train's and speedrun's options)
TRAIN_HELP = f"""Run the trainer under torchrun and keep it going until the step budget is reached.

Everything after `--` goes to the trainer untouched, e.g. `nanochat-run train --depth 4 -- --max_seq_len=512`.
Trainer defaults that matter: max_seq_len {_BASE.max_seq_len}, total_batch_size {_BASE.total_batch_size} tokens,
eval_every {_BASE.eval_every} steps, eval_tokens auto (all evaluations together read at most a tenth of the training
tokens, one at most 10M). `nanochat-run train -- --help` lists every trainer setting with its default (with --phase:
that phase's).
"""


@app.command(help=TRAIN_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    depth: Annotated[
        int | None, typer.Option(help=f"Model depth (the trainer's --depth). {phase_defaults('depth')}")
    ] = None,
    num_iterations: Annotated[
        int | None,
        typer.Option(
            help="The step budget (the trainer's --num_iterations). Default:"
            f" {_BASE.target_param_data_ratio:g} tokens per parameter."
        ),
    ] = None,
    save_every: Annotated[
        str | None,
        typer.Option(
            help="Save a checkpoint every N steps; 0 = only the final one; auto = an interval chosen from the measured"
            f" cost of a save and the trainer's --mtbf (Young/Daly). {phase_defaults('save_every')}"
        ),
    ] = None,
    keep_last_n: Annotated[
        int | None,
        typer.Option(help=f"Keep the newest N checkpoints; -1 keeps all. {phase_defaults('keep_last_n_checkpoints')}"),
    ] = None,
    device_batch_size: Annotated[
        int | None, typer.Option(help=f"Sequences per micro-batch on each GPU. {phase_defaults('device_batch_size')}")
    ] = None,
    model_tag: Annotated[
        str | None, typer.Option(help="Checkpoint subfolder name (default: d<depth>; mid/sft: the source's one model).")
    ] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Where checkpoints go (overrides --model-tag).")] = None,
    remote_dir: RemoteOption = None,
    run_dir: Annotated[Path | None, typer.Option(help="Event log, heartbeat and attempt logs.")] = None,
    phase: PhaseOption = DEFAULT.name,
    script: Annotated[
        str | None, typer.Option(help="The training module torchrun runs on every worker (default: the phase's).")
    ] = None,
    nproc_per_node: NprocOption = None,
    nnodes: Annotated[str, typer.Option(help="torchrun --nnodes (e.g. 2 or 1:4).")] = SUP.nnodes,
    node_rank: Annotated[int | None, typer.Option(help="torchrun --node-rank.")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="torchrun --rdzv-endpoint host:port.")] = None,
    local_addr: Annotated[
        str | None, typer.Option(help="torchrun --local-addr: this node's address (a host with several networks).")
    ] = None,
    node_timeout: Annotated[
        float,
        typer.Option(
            help="Multi-node: seconds the leader waits for every node to report an attempt's end.", parser=number
        ),
    ] = SUP.node_timeout,
    max_restarts: MaxRestartsOption = SUP.max_restarts,
    max_no_progress: MaxNoProgressOption = SUP.max_no_progress,
    backoff: BackoffOption = SUP.backoff,
    backoff_cap: BackoffCapOption = SUP.backoff_cap,
    hang_timeout: HangOption = SUP.hang_timeout,
    startup_timeout: StartupOption = SUP.startup_timeout,
    grace_period: GraceOption = None,
    oom_shrink: OomShrinkOption = SUP.oom_shrink,
    health_check: HealthOption = SUP.health_check,
    progress_every: ProgressOption = SUP.progress_every,
    preemption: PreemptionOption = SUP.preemption,
    preemption_endpoint: PreemptionEndpointOption = None,
    spare: SpareOption = SUP.spare,
    dry_run: Annotated[
        bool, typer.Option(help="Print the torchrun command and the resolved trainer settings, then exit.")
    ] = False,
) -> None:
    # (its help is TRAIN_HELP, above: the defaults in it are read from the base phase's config)
    from supervisor import slurm
    from supervisor.agent import Agent
    from supervisor.display import Display, make_display

    phase, script = phase_of_script(phase, script)
    sup = Supervision(nproc_per_node, nnodes, node_rank, rdzv_endpoint, max_restarts, max_no_progress, backoff,
                      backoff_cap, hang_timeout, startup_timeout, grace_period, oom_shrink, progress_every,
                      node_timeout, local_addr=local_addr, preemption=preemption,
                      preemption_endpoint=preemption_endpoint, spare=spare,
                      health_check=health_check)  # fmt: skip
    from_slurm = slurm.fill(sup, os.environ, ctx)  # in a SLURM job: what the command line left out
    sup.check()
    check_script(script)
    settings = {"depth": depth, "num_iterations": num_iterations, "save_every": save_every,
                "keep_last_n_checkpoints": keep_last_n, "device_batch_size": device_batch_size,
                "model_tag": model_tag, "remote_dir": remote_dir}  # fmt: skip
    trainer_args = [f"--{k}={v}" for k, v in settings.items() if v is not None] + list(ctx.args)
    try:
        launch = resolve(phase, script, trainer_args, checkpoint_dir)
    except HelpRequested as h:  # `nanochat-run train -- --help`: the trainer's settings
        print(h)
        raise typer.Exit(0) from None
    ckpt_dir, run_path = resolve_dirs(launch.checkpoint_dir, run_dir, launch.depth, launch.model_tag, new=True)
    if sup.max_nodes > 1 and sup.node_rank:  # a follower's records go beside the leader's, never over them
        run_path = run_path / f"node{sup.node_rank}"
    opts = train_options(launch, run_path, sup)
    if dry_run:
        print_dry_run(Agent(opts, Display()), by_script(script) is not None)
        return
    display = make_display(progress_every)
    display.event(f"nanochat-run: {opts.nproc_per_node} worker(s), checkpoints in {ckpt_dir}, run dir {run_path}")
    if from_slurm:
        display.event(from_slurm)
    if opts.grace_period <= launch.dist_timeout:
        display.event(
            f"warning: --grace-period={opts.grace_period:g}s is not longer than the trainer's"
            f" --dist_timeout={launch.dist_timeout}s: a stop may kill a save the other ranks still wait for"
        )
    nodes = None
    if sup.max_nodes > 1:
        from supervisor.nodes import Coordinator

        role = "the leader" if sup.node_rank == 0 else f"node {sup.node_rank}"
        display.event(f"multi-node: {role} of --nnodes {sup.nnodes}; the leader decides for every node")
        nodes = Coordinator.connect(sup.node_rank, sup.max_nodes, sup.rdzv_endpoint, sup.min_nodes)
    try:
        code = Agent(opts, display, nodes, since=started_at()).run()
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
        defaults = config_of(by_script(spec.script))()
        print(f"trainer settings of the first attempt:\n{describe(parse_args(defaults, spec.trainer_args)[0])}")
    o = agent.opts
    print(
        f"supervisor: --max-restarts={o.policy.max_restarts} --grace-period={o.grace_period:g}s"
        f" --hang-timeout={timeout_text(o.hang_timeout)} --startup-timeout={o.startup_timeout:g}s; run dir {o.run_dir}"
    )


@app.command()
def speedrun(
    depth: Annotated[int, typer.Option(help="Model depth of the base model (20: nanochat's d20).")] = DEFAULT_DEPTH,
    model_tag: Annotated[
        str | None, typer.Option(help="Checkpoint folder name in every phase's folder. Default: d<depth>.")
    ] = None,
    builtin: Annotated[
        bool, typer.Option(help="Train on the built-in corpus (no download) instead of FineWeb-edu shards.")
    ] = False,
    rl: Annotated[bool, typer.Option(help="Run the RL phase (--no-rl stops after SFT).")] = True,
    redo: Annotated[
        str | None,
        typer.Option(help="Start this phase afresh, and every phase after it (its old checkpoints are archived)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A TOML file with a table of settings per phase ([base], [sft], ...; see README)."),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="The event log, logs and report.md of the whole run.")] = None,
    remote_dir: RemoteOption = None,
    nproc_per_node: NprocOption = None,
    max_restarts: MaxRestartsOption = SUP.max_restarts,
    max_no_progress: MaxNoProgressOption = SUP.max_no_progress,
    backoff: BackoffOption = SUP.backoff,
    backoff_cap: BackoffCapOption = SUP.backoff_cap,
    hang_timeout: HangOption = SUP.hang_timeout,
    startup_timeout: StartupOption = SUP.startup_timeout,
    grace_period: GraceOption = None,
    oom_shrink: OomShrinkOption = SUP.oom_shrink,
    health_check: HealthOption = SUP.health_check,
    progress_every: ProgressOption = SUP.progress_every,
    preemption: PreemptionOption = SUP.preemption,
) -> None:
    """From nothing to a chat model: data, tokenizer, base, mid, SFT, RL and evaluation, every training phase under
    the same supervision as `train`. Rerun it after any stop or crash: finished phases are skipped, the interrupted
    one resumes from its newest valid checkpoint. `nanochat-run status --speedrun` shows every phase.
    """
    from supervisor.agent import Agent
    from supervisor.display import make_display
    from supervisor.speedrun import Speedrun, check_config, load_config

    sup = Supervision(nproc_per_node, max_restarts=max_restarts, max_no_progress=max_no_progress, backoff=backoff,
                      backoff_cap=backoff_cap, hang_timeout=hang_timeout, startup_timeout=startup_timeout,
                      grace_period=grace_period, oom_shrink=oom_shrink, progress_every=progress_every,
                      preemption=preemption, health_check=health_check)  # fmt: skip
    sup.check()
    tables = load_config(config)
    try:
        check_config(tables)
        tag = checkpoint_tag(model_tag or "", depth)
    except ConfigError as e:
        raise UsageProblem(str(e).replace("--model_tag", "--model-tag")) from None
    run_path = (run_dir or speedrun_dir(tag)).expanduser().resolve()
    display = make_display(progress_every)

    phases_run: list[str] = []

    def supervise(launch, fresh: bool) -> int:
        # the devices are checked before the first phase (health.py: a torch import each time), not before each
        agent = Agent(train_options(launch, run_path, sup, fresh=fresh), display, check_devices=not phases_run)
        phases_run.append(launch.phase)
        return agent.run()

    try:
        code = Speedrun(tag, depth, builtin, rl, redo, run_path, tables, supervise, display.event, remote_dir).run()
    except LockError as e:
        raise UsageProblem(str(e)) from None
    except KeyboardInterrupt:  # between phases (a download, the tokenizer): nothing to save
        code = 130
    finally:
        display.close()
    raise typer.Exit(code)


def speedrun_dir(tag: str) -> Path:
    return get_base_dir() / "speedrun" / tag


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
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", parser=number)] = 2.0,
    phase: PhaseOption = DEFAULT.name,
    speedrun: Annotated[
        bool,
        typer.Option("--speedrun", help="The speedrun of --depth/--model-tag: every phase (or pass its --run-dir)."),
    ] = False,
    remote_dir: Annotated[
        str | None, typer.Option(help="Also show this run's remote copies (an fsspec URL) and how far they lag.")
    ] = None,
    text_plot: Annotated[
        bool, typer.Option("--plot", help="Also draw the training loss as a text curve (for a remote shell).")
    ] = False,
) -> None:
    """Show checkpoints, progress to the budget, each `train` invocation with its attempts, and the live run; for a
    speedrun, every phase first."""
    if interval <= 0:
        raise UsageProblem(f"--interval must be > 0 seconds, got {interval:g}")
    if text_plot and json_out:
        raise UsageProblem("--plot draws for people and --json prints for scripts: pick one")
    if speedrun and run_dir is None:
        try:
            run_dir = speedrun_dir(checkpoint_tag(model_tag or "", depth or DEFAULT_DEPTH))
        except ConfigError as e:
            raise UsageProblem(str(e).replace("--model_tag", "--model-tag")) from None
        if not run_dir.is_dir():
            raise UsageProblem(f"no speedrun at {run_dir}: pass its --depth or --model-tag, or its --run-dir")
    pipeline = run_dir is not None and checkpoint_dir is None and run_dir.is_dir() and is_speedrun(run_dir)
    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    if not pipeline and not ckpt_dir.is_dir():
        raise UsageProblem(f"no checkpoint dir at {ckpt_dir}: pass --checkpoint-dir, --run-dir or --model-tag")

    def gather() -> dict:
        info = report.gather_status(ckpt_dir, run_path, verify, pipeline) if ckpt_dir.is_dir() else None
        if info is not None and remote_dir:
            from nanochat import remote

            info["remote"] = cli_remote.remote_call("reading", remote_dir, lambda: remote.lag(ckpt_dir, remote_dir))
        if not pipeline:
            return info
        return {**phase_status(run_path), "current": info}

    try:
        if watch:
            tail.interruptible()
        report.watch_status(gather, json_out, interval if watch else None)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if text_plot:
        from supervisor import plot as pictures

        print(pictures.terminal(ckpt_dir, run_path))


@app.command("plot")
def plot_run(
    run_dir: Annotated[Path | None, typer.Option(help="The run dir of a supervised run.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir.")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth (d<depth>).")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    phase: PhaseOption = DEFAULT.name,
    out: Annotated[
        Path | None,
        typer.Option(help="The PNG to write. Default: plot.png in the run dir (unsupervised: in the checkpoint dir)."),
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="<dir>", help="Another run's checkpoint dir whose loss curve to draw too; repeat it for several."
        ),
    ] = None,
) -> None:
    """Draw a run into a PNG from its metrics.jsonl: loss and validation by step, every restart with why it happened
    and the steps it lost, and tokens per second. Prints the PNG's path."""
    from supervisor import plot as pictures

    ckpt_dir, run_path = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    others = [c.expanduser().resolve() for c in compare or []]
    try:
        print(pictures.make(ckpt_dir, run_path, out.expanduser().resolve() if out else None, others))
    except pictures.PlotError as e:
        raise UsageProblem(str(e)) from None


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
    phase: PhaseOption = DEFAULT.name,
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
            tail.interruptible()
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
    keep_every: Annotated[
        int, typer.Option(help="Also keep every checkpoint whose step is a multiple of N (for eval); 0: off.")
    ] = 0,
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
    phase: PhaseOption = DEFAULT.name,
    remote_dir: Annotated[
        str | None,
        typer.Option(help="Prune this remote copy (an fsspec URL) instead: the run's newest N and its final one stay."),
    ] = None,
) -> None:
    """Delete old checkpoints by the checkpoint module's rules: never the newest valid, the final or a damaged one."""
    if stale_snapshots:
        prune_snapshots(dry_run, yes)
        return
    if keep < 1 or keep_every < 0:
        raise UsageProblem(f"--keep must be >= 1 and --keep-every >= 0, got {keep} and {keep_every}")
    if remote_dir:
        cli_remote.prune_remote(
            remote_dir, keep, keep_every, checkpoint_dir, run_dir, depth, model_tag, phase, dry_run, yes
        )
        return
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
    doomed = checkpoint.plan_prune(ckpt_dir, keep, keep_every=keep_every)
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
    removed = checkpoint.prune(ckpt_dir, keep, keep_every=keep_every)
    print(f"deleted {len(removed)} files, freed {freed / 1e6:.1f} MB")
    point = checkpoint.find_resume_point(ckpt_dir, warn=lambda msg: None)
    if point and point[0] == ckpt_dir and snapshots.remove(ckpt_dir):  # a resume would not use them
        print("removed the in-memory snapshots (not newer than the newest checkpoint)")


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
# remote copies (supervisor/cli_remote.py)

app.command()(cli_remote.pull)
app.command()(cli_remote.push)


# ---------------------------------------------------------------------------------------------------------------
# evaluation across checkpoints (supervisor/eval_cmd.py, nanochat/ensemble.py)


app.command("eval")(eval_cmd.command)  # supervisor/eval_cmd.py


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
        print(f"nanochat-run: error: {redact(str(e))}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageProblem) else 1)
    except Exception as e:
        if not hasattr(e, "format_message"):  # click's usage errors (typer may vendor its own click)
            raise
        print(f"nanochat-run: error: {e.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
