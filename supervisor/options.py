"""The `nanochat-run` options that several commands share, and how a command finds a run's directories from
them (the checkpoint dir as the trainer computes it, the run dir beside it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nanochat.config import ConfigError, finite_float
from nanochat.paths import DEFAULT_DEPTH, checkpoint_tag, only_model, phase_dir
from nanochat.redact import ENV as REMOTE_ENV
from nanochat.registry import DEFAULT, PHASES
from nanochat.settings import LoopConfig, config_of
from supervisor.launch import GRACE_MARGIN, UsageProblem
from supervisor.records import RunDir, read_events


def number(raw: str) -> float:
    """The parser of every float option (`typer.Option(parser=number)`): typer's own float takes nan and inf,
    which pass every range check (`nan < 0` is false) and break a run late, e.g. --hang-timeout nan kills every
    attempt as hung. Read by the trainer's own rule, so both refuse the same values."""
    try:
        return finite_float(raw)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None


def hang_timeout(raw: str) -> float | None:
    """--hang-timeout: "auto" (None, supervisor/pace.py) or a finite number of seconds."""
    if raw.strip().lower() == "auto":
        return None
    try:
        return finite_float(raw)
    except ConfigError as e:
        why = str(e).replace("expected a number,", "expected auto or a number of seconds,")
        raise typer.BadParameter(why) from None


def timeout_text(seconds: float | None) -> str:
    """How --hang-timeout is shown: auto, or its seconds."""
    return "auto" if seconds is None else f"{seconds:g}s"


def phase_defaults(key: str) -> str:
    """A trainer setting's default for the help of the option that sets it, read from the phases' configs (never
    written twice): `Default: 500 (rl: 60).`, the default phase's value and each other phase's where it differs."""
    configs = {p.name: config_of(p)() for p in PHASES.values()}
    values = {name: getattr(cfg, key) for name, cfg in configs.items() if hasattr(cfg, key)}  # depth: base only
    first = values[DEFAULT.name]
    others = ", ".join(f"{name}: {v}" for name, v in values.items() if v != first)
    return f"Default: {first}" + (f" ({others})." if others else ".")


PhaseOption = Annotated[
    str, typer.Option(help=f"The training phase: {', '.join(PHASES)}; picks its checkpoint folder.")
]
# the supervisor's options, shared by `train` and `speedrun` (fields of launch.Supervision)
NprocOption = Annotated[int | None, typer.Option(help="Workers per node (default: all GPUs, 1 on CPU).")]
MaxRestartsOption = Annotated[int, typer.Option(help="Restarts allowed after the first attempt (per phase).")]
MaxNoProgressOption = Annotated[
    int, typer.Option(help="Give up after this many attempts in a row without a new checkpoint.")
]
BackoffOption = Annotated[
    float, typer.Option(help="Seconds before the first restart; doubles per failed attempt.", parser=number)
]
BackoffCapOption = Annotated[float, typer.Option(help="Longest wait between attempts, in seconds.", parser=number)]
HangOption = Annotated[
    float | None,
    typer.Option(
        help="Seconds without progress before a run counts as hung, or auto (the default): once a few steps are"
        " timed, 10x the median step (at least 20 s), and saves, evaluations and restarts each by what they took"
        " before (supervisor/pace.py); 0 turns the check off.",
        parser=lambda raw: hang_timeout(raw),
        metavar="auto|SECONDS",
        show_default=False,
    ),
]
StartupOption = Annotated[
    float, typer.Option(help="Seconds allowed until the first step; 0 turns the check off.", parser=number)
]
GraceOption = Annotated[
    float | None,
    typer.Option(
        help="Seconds a worker gets to save after a stop signal (or after its torchrun died) before it is killed."
        f" Default: the trainer's --dist_timeout + {GRACE_MARGIN} ({LoopConfig.dist_timeout + GRACE_MARGIN} s); it"
        " should exceed --dist_timeout.",
        parser=number,
    ),
]
OomShrinkOption = Annotated[
    bool, typer.Option(help="Halve the device batch after a CUDA OOM (or a host OOM of a CPU trainer).")
]
SpareOption = Annotated[
    str,
    typer.Option(
        help="A warm spare (auto | on | off): once an attempt trains, start the next attempt's torchrun, whose"
        " workers import torch and the trainer, then wait; a restart skips those seconds. Costs --nproc-per-node"
        " idle processes holding imported torch (host memory, ~0.4 GB each; no GPU memory, no process group)."
        " auto: on for a trainer on CUDA (a GPU node has the host memory), off on the CPU. One machine only."
    ),
]
HealthOption = Annotated[
    bool,
    typer.Option(
        help="Before each attempt, check this node (supervisor/health.py): room on the checkpoint disk and free"
        " memory; before the first attempt and after a failure that could be the machine's (CUDA, NCCL, Xid), also"
        " a known computation on each local GPU (on the CPU: the CPU) in a subprocess. A node that fails gives up"
        " at once as `unhealthy`, naming the check, instead of restarting into the same fault."
    ),
]
ProgressOption = Annotated[
    float, typer.Option(help="Seconds between progress lines when not on a terminal.", parser=number)
]
PreemptionOption = Annotated[
    str,
    typer.Option(
        help="Watch the cloud's metadata service for a spot/preemption notice (auto: the cloud this machine's DMI"
        " names, or none): on one, save at the current step, flush the upload and exit 75 (requeue).",
        metavar="auto|aws|gcp|azure|off",
    ),
]
PreemptionEndpointOption = Annotated[  # hidden: tests point the poller at a local server
    str | None, typer.Option(hidden=True, help="http://HOST:PORT in place of the metadata service's.")
]
RemoteOption = Annotated[
    str | None,
    typer.Option(
        help="Also copy checkpoints to this fsspec URL (s3://bucket/prefix, gs://..., file:///...) and"
        " restore from it when it is newer (the trainer's --remote_dir). Credentials in it (user:password@) are"
        " never written or shown; set the variable instead to keep them off this command line too.",
        envvar=REMOTE_ENV,
    ),
]


def resolve_dirs(
    checkpoint_dir: Path | None,
    run_dir: Path | None,
    depth: int | None,
    model_tag: str | None,
    new: bool = False,
    phase: str = DEFAULT.name,
) -> tuple[Path, Path]:
    """Checkpoint dir as the trainer computes it; the run dir sits beside it (`<checkpoint dir>.run`)."""
    if phase not in PHASES:
        raise UsageProblem(f"--phase must be one of {', '.join(PHASES)}, got {phase!r}")
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
        checkpoint_dir = phase_dir(phase, tag)
    checkpoint_dir = checkpoint_dir.expanduser().resolve()
    return checkpoint_dir, (run_dir or checkpoint_dir.with_name(checkpoint_dir.name + ".run")).expanduser().resolve()


def confirm(question: str) -> bool:
    """Ask on a terminal; off one (a script, CI) there is nobody to ask: refuse rather than guess."""
    if not sys.stdin.isatty():
        raise UsageProblem("refusing to delete without --yes (not a terminal)")
    return typer.confirm(question, default=False)
