"""From a phase and its trainer settings to the agent's TrainOptions: what `nanochat-run train` and every phase of
`nanochat-run speedrun` share. A phase's settings are parsed here, before torchrun starts, so a bad one is one
line and changes nothing."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.config import ConfigError, parse_args
from nanochat.paths import DEFAULT_DEPTH, checkpoint_tag, phase_dir, phase_dirs
from nanochat.redact import ENV as REMOTE_ENV
from nanochat.redact import redact
from nanochat.registry import DEFAULT, PHASES, by_script
from nanochat.settings import LoopConfig, config_of
from supervisor import preempt
from supervisor.policy import Policy

DEFAULT_DIST_TIMEOUT = LoopConfig.dist_timeout  # for a --script we cannot parse: the default of ours
GRACE_MARGIN = 300  # the default --grace-period is the trainer's --dist_timeout plus this


class UsageProblem(Exception):
    """Bad input: printed as one line, exit 2."""


@dataclass
class Supervision:
    """The supervisor's settings (what `train` and `speedrun` both take on the command line), and their defaults:
    the command line's, TrainOptions' and (for the restart policy's own settings) Policy's."""

    nproc_per_node: int | None = None  # None: all GPUs, 1 on CPU
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    max_restarts: int = Policy.max_restarts
    max_no_progress: int = Policy.max_no_progress
    backoff: float = Policy.backoff
    backoff_cap: float = Policy.backoff_cap
    hang_timeout: float | None = None  # None: auto (supervisor/pace.py); 0 = off
    startup_timeout: float = 3600.0  # 0 = off
    grace_period: float | None = None  # None: the trainer's --dist_timeout + GRACE_MARGIN
    oom_shrink: bool = Policy.oom_shrink
    progress_every: float = 30.0
    node_timeout: float = 600.0  # multi-node: the leader's wait for every node to report an attempt's end
    rdzv_id: str | None = None  # names the run's rendezvous (SLURM: the job id); each attempt adds its number
    local_addr: str | None = None  # torchrun --local-addr: the address other nodes reach this one at
    preemption: str = "auto"  # whose preemption notices to watch (supervisor/preempt.py): auto, a cloud, or off
    preemption_endpoint: str | None = None  # http://HOST:PORT in place of the metadata service's (tests)
    spare: str = "auto"  # a warm spare for the next attempt (supervisor/spare.py): auto = on for a CUDA trainer
    health_check: bool = True  # check the node before each attempt (supervisor/health.py)

    @property
    def min_nodes(self) -> int:
        """The fewest nodes --nnodes allows (N, or MIN of MIN:MAX)."""
        m = re.fullmatch(r"(\d+)(?::(\d+))?", self.nnodes)
        return int(m.group(1)) if m else 1

    @property
    def max_nodes(self) -> int:
        """The most nodes --nnodes allows (N, or MAX of MIN:MAX); 1 for a malformed value (check() says so)."""
        m = re.fullmatch(r"(\d+)(?::(\d+))?", self.nnodes)
        return int(m.group(2) or m.group(1)) if m else 1

    def check(self) -> None:
        """What torchrun or the agent would only reject late (torchrun after a crash loop of ~20 s): now, one line."""
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UsageProblem(f"--nproc-per-node must be >= 1 (or left out: all GPUs, 1 on CPU), got"
                               f" {self.nproc_per_node}")  # fmt: skip
        m = re.fullmatch(r"(\d+)(?::(\d+))?", self.nnodes)
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UsageProblem(
                f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX (e.g. 2 or 1:4), got {self.nnodes!r}"
            )
        if self.node_rank is not None and self.node_rank < 0:
            raise UsageProblem(f"--node-rank must be >= 0, got {self.node_rank}")
        if self.max_nodes > 1 or self.rdzv_endpoint:
            if not self.rdzv_endpoint:
                raise UsageProblem(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the address every node"
                                   " reaches the first one at (e.g. --rdzv-endpoint 10.0.0.1:29500)")  # fmt: skip
            split_endpoint(self.rdzv_endpoint)
            if self.node_rank is None:
                raise UsageProblem(f"--nnodes {self.nnodes} needs --node-rank on every node: 0 on the leader (the"
                                   " node that decides restarts for all), 1, 2, ... on the others")  # fmt: skip
        if self.progress_every <= 0:
            raise UsageProblem(f"--progress-every must be > 0 seconds, got {self.progress_every:g}")
        if self.max_restarts < 0:
            raise UsageProblem("--max-restarts must be >= 0")
        if self.max_no_progress < 1:
            raise UsageProblem("--max-no-progress must be >= 1")
        if self.spare not in ("auto", "on", "off"):
            raise UsageProblem(f"--spare takes auto, on or off, got {self.spare!r}")
        if problem := preempt.check(self.preemption, self.preemption_endpoint):
            raise UsageProblem(problem)
        for name in ("hang_timeout", "startup_timeout", "backoff", "backoff_cap", "grace_period", "node_timeout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageProblem(f"--{name.replace('_', '-')} must be >= 0 seconds, got {value}")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:29500) as (host, port); anything else is one line."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})", endpoint)
    if not m or not 1 <= int(m.group(2)) <= 65534:  # the supervisors' channel takes the next port
        raise UsageProblem(f"--rdzv-endpoint must be HOST:PORT with a port in 1-65534 (e.g. 10.0.0.1:29500 or"
                           f" [fd00::1]:29500), got {endpoint!r}")  # fmt: skip
    return m.group(1).strip("[]"), int(m.group(2))


def check_script(script: str) -> None:
    try:
        found = importlib.util.find_spec(script) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageProblem(f"--script {script!r}: no such Python module here; the default is {DEFAULT.script}")


def parse_settings(script: str, trainer_args: list[str]):
    """The phase's config as its trainer will parse it (ConfigError and HelpRequested pass through); `script` is
    one of ours (registry.by_script finds its phase)."""
    return parse_args(config_of(by_script(script))(), trainer_args)[0]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_torch_sees_the_gpus() -> None:
    """Refuse to train on the CPU of a GPU machine by accident: nvidia-smi lists GPUs but torch cannot use them
    (the CPU build that `make install` puts in, or a driver older than torch's CUDA)."""
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


@dataclass
class Launch:
    """A phase, resolved: where it saves, what its trainer gets, and the settings the supervisor must know."""

    phase: str
    script: str
    trainer_args: list[str]
    checkpoint_dir: Path
    dist_timeout: int = DEFAULT_DIST_TIMEOUT
    fresh: bool = False  # the settings ask for --resume=False
    budget: int | None = None  # --num_iterations, when set
    depth: int | None = None
    model_tag: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # for torchrun and its workers: a --remote_dir's credentials
    remote: bool = False  # the settings name a --remote_dir (a checkpoint dir per node needs one)
    auto_save: bool = False  # --save_every=auto: the trainer's save interval follows its --mtbf
    device_type: str = "auto"  # the trainer's --device_type (auto, cuda, cpu)


def resolve(phase: str, script: str, trainer_args: list[str], checkpoint_dir: Path | None) -> Launch:
    """Parse a phase's trainer settings (ours only; another --script is passed through unread) and find the
    checkpoint dir it will save to, as the trainer computes it."""
    launch = Launch(phase, script, trainer_args, checkpoint_dir or Path())
    if by_script(script) is None:
        if checkpoint_dir is None:
            launch.checkpoint_dir = phase_dir(phase, checkpoint_tag("", DEFAULT_DEPTH))
        return launch
    try:
        cfg = parse_settings(script, trainer_args)
        if cfg.checkpoint_dir and checkpoint_dir is None:
            checkpoint_dir = Path(cfg.checkpoint_dir)
        if checkpoint_dir is None:
            if phase == "base":
                checkpoint_dir = phase_dir("base", checkpoint_tag(cfg.model_tag, cfg.depth))
            else:  # a chat phase saves beside its source, under the same tag
                checkpoint_dir = phase_dirs(phase, cfg.model_tag, cfg.checkpoint_dir, cfg.source_dir)[0]
    except ConfigError as e:
        raise UsageProblem(f"trainer setting: {e}") from None
    if cfg.device_type != "cpu":
        check_torch_sees_the_gpus()
    launch.checkpoint_dir = checkpoint_dir
    launch.dist_timeout, launch.fresh = cfg.dist_timeout, not cfg.resume
    launch.budget = cfg.num_iterations if cfg.num_iterations > 0 else None
    launch.depth, launch.model_tag = getattr(cfg, "depth", None), cfg.model_tag or None
    launch.remote = bool(cfg.remote_dir)
    launch.auto_save = cfg.save_every == "auto"
    launch.device_type = cfg.device_type
    # credentials in --remote_dir: off the command line (`ps` shows it, torchrun.log and the event log record it),
    # into the environment, where the trainer finds the real URL (nanochat/redact.py)
    if redact(cfg.remote_dir) != cfg.remote_dir:
        launch.trainer_args = [redact(arg) for arg in trainer_args]
        launch.env = {REMOTE_ENV: cfg.remote_dir}
    return launch


@dataclass
class TrainOptions:
    script: str
    trainer_args: list[str]  # everything the trainer gets except what the agent adds per attempt
    checkpoint_dir: Path
    run_dir: Path
    nproc_per_node: int = 1
    nnodes: str = Supervision.nnodes
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    hang_timeout: float | None = Supervision.hang_timeout  # None: auto (supervisor/pace.py); 0 = off
    startup_timeout: float = Supervision.startup_timeout  # 0 = off
    grace_period: float = DEFAULT_DIST_TIMEOUT + GRACE_MARGIN  # (Supervision.grace_period's None)
    fresh_start: bool = False  # the user asked for --resume=False
    num_iterations: int | None = None  # the step budget asked for, when known
    policy: Policy = field(default_factory=Policy)
    node_timeout: float = Supervision.node_timeout  # multi-node: the leader's wait for every node's attempt end
    rdzv_id: str | None = None  # the run's rendezvous name (default "nanochat"); each attempt adds its number
    local_addr: str | None = None  # torchrun --local-addr (ranks are sorted by it: the lowest gets global rank 0)
    phase: str = DEFAULT.name  # the training phase (base, mid, sft, rl): recorded in the event log
    env: dict[str, str] = field(default_factory=dict)  # added to torchrun's environment (Launch.env)
    remote: bool = False  # the trainer copies checkpoints to a remote (Launch.remote)
    preemption: str = Supervision.preemption  # whose preemption notices to watch (supervisor/preempt.py)
    preemption_endpoint: str | None = None  # replaces the metadata service's http://HOST[:PORT] (tests)
    tick: float = 0.1  # how often the watch loop wakes up; torchrun exit is noticed within this
    spare: str = Supervision.spare  # keep the next attempt's workers started, waiting (supervisor/spare.py)
    health_check: bool = Supervision.health_check  # check the node before each attempt (supervisor/health.py)
    device_type: str = "auto"  # the trainer's --device_type: which devices the health check computes on


def train_options(launch: Launch, run_dir: Path, sup: Supervision, fresh: bool | None = None):
    """The agent's TrainOptions for a resolved phase (`fresh` overrides the settings' --resume)."""

    policy = Policy(sup.max_restarts, sup.max_no_progress, sup.backoff, sup.backoff_cap, sup.oom_shrink,
                    launch.auto_save)  # fmt: skip
    grace = sup.grace_period if sup.grace_period is not None else launch.dist_timeout + GRACE_MARGIN
    nproc = sup.nproc_per_node or gpu_count() or 1
    return TrainOptions(launch.script, launch.trainer_args, launch.checkpoint_dir.expanduser().resolve(),
                        run_dir.expanduser().resolve(), nproc, sup.nnodes, sup.node_rank, sup.rdzv_endpoint,
                        sup.hang_timeout, sup.startup_timeout, grace, launch.fresh if fresh is None else fresh,
                        launch.budget, policy, node_timeout=sup.node_timeout, rdzv_id=sup.rdzv_id,
                        local_addr=sup.local_addr, phase=launch.phase, env=launch.env,
                        remote=launch.remote, preemption=sup.preemption,
                        preemption_endpoint=sup.preemption_endpoint, spare=sup.spare,
                        health_check=sup.health_check, device_type=launch.device_type)  # fmt: skip


def phase_of_script(phase: str, script: str | None) -> tuple[str, str]:
    """(phase, script) from `--phase` and `--script`: a script of ours implies its phase."""
    if phase not in PHASES:
        raise UsageProblem(f"--phase must be one of {', '.join(PHASES)}, got {phase!r}")
    owner = by_script(script) if script else None
    if owner and phase != DEFAULT.name and owner.name != phase:
        raise UsageProblem(f"--script {script} is the {owner.name} phase's, not --phase {phase}'s: give one")
    phase = owner.name if owner else phase
    return phase, script or PHASES[phase].script
