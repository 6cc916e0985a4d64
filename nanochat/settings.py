"""The settings of every training phase, as the dataclasses their scripts parse the command line into
(`--key=value`): LoopConfig is what all phases share, each phase's config subclasses it (or ChatConfig, what the
chat phases share) and may change a default. Torch-free on purpose: the supervisor parses a phase's settings
before torchrun starts, and prints their defaults in its `--help`, without importing a training script.
Which phase uses which class: nanochat/registry.py."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from nanochat.config import ConfigError, convert
from nanochat.faults import Fault
from nanochat.paths import DEFAULT_DEPTH, checkpoint_tag
from nanochat.registry import PhaseInfo
from nanochat.remote import check_remote
from nanochat.tasks import parse_mixture_spec

# What a rerun may change, marked on the setting's field; an unmarked setting shapes the model or what it learns
# (a speedrun refuses to skip a finished phase made with another value of it).
#   runtime(default)  how a phase runs, not the model it produces: a speedrun rerun may change it freely; a resume
#                     applies it and logs the change
#   quiet(default)    how a run is driven (where, which attempt, drills): as runtime, and a resume does not even
#                     log a change


def runtime(default):
    return field(default=default, metadata={"rerun": "runtime"})


def quiet(default):
    return field(default=default, metadata={"rerun": "quiet"})


def rerun_mark(cls: type, name: str) -> str:
    """A setting's mark ("runtime", "quiet", or "" for a setting of the model), from the class that declared it
    (a phase that only changes a default inherits its mark)."""
    for c in cls.__mro__:
        f = c.__dict__.get("__dataclass_fields__", {}).get(name)
        if f is not None and "rerun" in f.metadata:
            return f.metadata["rerun"]
    return ""


def marked(cls: type, *marks: str) -> set[str]:
    """The settings of a config class with one of these marks."""
    return {f.name for f in fields(cls) if rerun_mark(cls, f.name) in marks}


@dataclass
class LoopConfig:
    """The settings of every phase. A phase's config subclasses this, adds its own, and may change defaults."""

    # run
    run: str = quiet("dummy")  # wandb run name; "dummy" disables wandb
    device_type: str = runtime("auto")  # auto | cuda | cpu
    seed: int = 0  # weights init and data order
    compile: str = runtime("auto")  # auto (on for CUDA, off for CPU) | True | False
    # batch: grad accumulation = total_batch_size / (device_batch_size * max_seq_len * world_size)
    max_seq_len: int = 2048  # context length in tokens
    device_batch_size: int = runtime(32)  # sequences per micro-batch on each rank
    total_batch_size: int = 524288  # tokens per optimizer step; -1 = one micro-batch on every rank
    num_iterations: int = -1  # optimizer steps; -1 = derived by the phase
    # optimization
    embedding_lr: float = 0.2  # AdamW, token embedding
    unembedding_lr: float = 0.004  # AdamW, output head
    matrix_lr: float = 0.02  # Muon, every matrix in the blocks
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.0  # fraction of steps warming the LR up
    warmdown_ratio: float = 0.2  # fraction of steps decaying the LR at the end
    final_lr_frac: float = 0.0  # LR at the last step, as a fraction of the peak
    rewarm_steps: int = 0  # raising --num_iterations of a finished run: ramp the LR back up over N steps (0: at once)
    # evaluation and logging
    eval_every: int = runtime(250)  # -1 = only at the end
    eval_tokens: int = runtime(-1)  # validation tokens per evaluation; -1 = auto (see eval_token_count)
    log_every: int = runtime(1)  # print a step line every N steps
    # checkpoints (see nanochat/checkpoint/)
    model_tag: str = ""  # the checkpoint folder's name; default: the phase's (d{depth} for base training)
    checkpoint_dir: str = quiet("")  # default $NANOCHAT_BASE_DIR/<phase dir>/<model_tag>
    save_every: int | str = runtime(500)  # every N steps; 0 = only the final checkpoint; auto: from save cost, mtbf
    mtbf: float = runtime(4 * 3600.0)  # expected seconds between failures (4 h), for --save_every=auto (Young/Daly)
    keep_last_n_checkpoints: int = runtime(3)  # keep the newest N; -1 = all; the final checkpoint is never pruned
    keep_optim_last_n: int = runtime(1)  # of those, the newest N keep optimizer state (older: weights only); -1 = all
    keep_every: int = runtime(0)  # also keep each checkpoint at a multiple of N steps, for `nanochat-run eval`; 0 = off
    resume: bool = quiet(True)  # continue from the newest valid checkpoint; False archives old ones and starts fresh
    resume_exact: bool = quiet(True)  # False: as upstream nanochat (weights, optimizer; data from its row group)
    async_save: bool = runtime(True)  # periodic saves block only for a copy to CPU; the write runs in the background
    snapshot_every: int = runtime(0)  # also snapshot into shared memory (/dev/shm) every N steps; 0 = off
    dist_timeout: int = runtime(1800)  # seconds a collective may wait; must cover the longest save (rank 0 writes)
    # remote copies (nanochat/remote.py): any fsspec URL; s3:// needs nanochat-run[s3], gs:// nanochat-run[gcs]
    remote_dir: str = ""  # copy every checkpoint here in the background, and restore from it when it is newer
    remote_keep_last_n: int = runtime(0)  # remote checkpoints kept (the final one always); 0 = as local, -1 = all
    remote_flush_timeout: int = runtime(600)  # seconds the final or signal save may wait for its upload before the exit
    compress: str = runtime("auto")  # payload files: none | zstd (lossless, ~1.2x) | auto (zstd with a --remote_dir)
    # bad numbers (nanochat/guard.py): a non-finite loss or gradient, a loss spike
    on_nan: str = runtime("rollback")  # rollback (to the newest snapshot/checkpoint, skipping the data) | warn
    on_spike: str = runtime("warn")  # warn | rollback: a loss > spike_z standard deviations above the window's
    spike_z: float = runtime(6.0)  # how far above the recent losses a spike is
    spike_window: int = runtime(50)  # the recent losses it is measured against; no check until the window is full
    max_rollbacks: int = runtime(3)  # more than this in a run: stop as diverged (exit 65; not restarted)
    skip_data: str = ""  # FROM:TO[,...]: skip the data of these steps, as a rollback did (reproduces such a run)
    # supervision and drills
    heartbeat_file: str = quiet("")  # rank 0 rewrites this JSON file every step (the supervisor watches it)
    debug_fault: str = quiet("")  # inject a fault, e.g. sigkill@step:7 or raise@step:5! (see nanochat/faults.py)

    def compiles(self, cuda: bool) -> bool:
        """Whether the model is compiled (`cuda`: the trainer runs on CUDA): --compile, auto meaning on CUDA."""
        if self.compile.lower() == "auto":
            return cuda
        return self.compile.lower() in ("true", "1")

    def __post_init__(self) -> None:
        if self.device_type not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device_type must be auto, cuda or cpu, got {self.device_type!r}")
        if self.compile.lower() not in ("auto", "true", "false", "1", "0"):
            raise ConfigError(f"--compile must be auto, True or False, got {self.compile!r}")
        for key in ("device_batch_size", "log_every"):  # max_seq_len: the phase checks it (chat phases allow -1)
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.total_batch_size == 0 or self.total_batch_size < -1:
            raise ConfigError(f"--total_batch_size must be a positive token count or -1, got {self.total_batch_size}")
        if self.num_iterations == 0 or self.num_iterations < -1:
            raise ConfigError(f"--num_iterations must be >= 1 (or -1 to derive it), got {self.num_iterations}")
        if self.eval_tokens == 0 or self.eval_tokens < -1:
            raise ConfigError(f"--eval_tokens must be a positive token count or -1 (auto), got {self.eval_tokens}")
        if self.eval_every == 0:
            raise ConfigError("--eval_every takes a step count, or -1 for only at the end")
        if not 0 <= self.warmup_ratio + self.warmdown_ratio <= 1:
            raise ConfigError("--warmup_ratio + --warmdown_ratio must lie in [0, 1]")
        self.save_every = _save_every(self.save_every)
        if self.mtbf <= 0:
            raise ConfigError(f"--mtbf must be a number of seconds > 0, got {self.mtbf}")
        if self.snapshot_every < 0:
            raise ConfigError(f"--snapshot_every must be >= 0 (0 = off), got {self.snapshot_every}")
        if self.dist_timeout < 1:
            raise ConfigError(f"--dist_timeout must be >= 1 second, got {self.dist_timeout}")
        checkpoint_tag(self.model_tag, 1)  # raises for a tag that is not a plain folder name
        if self.keep_optim_last_n == 0 or self.keep_optim_last_n < -1:
            raise ConfigError(f"--keep_optim_last_n must be >= 1 or -1 (all), got {self.keep_optim_last_n}")
        if self.rewarm_steps < 0:
            raise ConfigError(f"--rewarm_steps must be >= 0, got {self.rewarm_steps}")
        if self.keep_every < 0:
            raise ConfigError(f"--keep_every must be >= 0 (0: off), got {self.keep_every}")
        if self.keep_last_n_checkpoints == 0 or self.keep_last_n_checkpoints < -1:
            raise ConfigError(f"--keep_last_n_checkpoints must be >= 1 or -1 (all), got {self.keep_last_n_checkpoints}")
        if self.on_nan not in ("rollback", "warn") or self.on_spike not in ("rollback", "warn"):
            raise ConfigError(f"--on_nan and --on_spike take rollback or warn, got {self.on_nan!r}, {self.on_spike!r}")
        if self.spike_z <= 0 or self.spike_window < 2 or self.max_rollbacks < 0:
            raise ConfigError("--spike_z must be > 0, --spike_window >= 2 and --max_rollbacks >= 0")
        parse_skips(self.skip_data)  # raises a one-line ConfigError for a malformed range
        try:
            Fault.parse(self.debug_fault)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.compress not in ("auto", "none", "zstd"):
            raise ConfigError(f"--compress must be auto, none or zstd, got {self.compress!r}")
        if self.remote_keep_last_n < -1 or self.remote_flush_timeout < 0:
            raise ConfigError("--remote_keep_last_n must be >= -1 (0: as local) and --remote_flush_timeout >= 0")
        if self.remote_dir:
            check_remote(self.remote_dir)  # a malformed URL or a missing filesystem package: one line, now


def parse_skips(text: str) -> list[tuple[int, int]]:
    """--skip_data: "FROM:TO[,FROM:TO...]", the steps (inclusive, 1-based) whose data is skipped, ascending."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit()) or not 1 <= int(lo) <= int(hi):
            raise ConfigError(
                f"--skip_data={text!r}: give FROM:TO step ranges, e.g. 6:7 or 6:7,40:41 (1 <= FROM <= TO)"
            )
        out.append((int(lo), int(hi)))
    if any(b[0] <= a[1] for a, b in zip(out, out[1:])):
        raise ConfigError(f"--skip_data={text!r}: the ranges must ascend without overlapping")
    return out


def _save_every(value: int | str) -> int | str:
    """--save_every: a step count >= 0, or "auto" (the interval chosen from the measured save cost and --mtbf)."""
    if value == "auto":
        return value
    try:
        steps = convert("save_every", str(value), int)  # as every integer setting: 500, 5e2
    except ConfigError:
        steps = -1
    if steps < 0:
        raise ConfigError(f"--save_every must be a step count >= 0 (0 = only at the end) or auto, got {str(value)!r}")
    return steps


BUILTIN_MIXTURE = "arithmetic,spelling,choice,identity"


@dataclass
class ChatConfig(LoopConfig):
    max_seq_len: int = -1  # context length in tokens; -1 = the source model's
    # source: the checkpoint this phase starts from
    source_dir: str = quiet("")  # default $NANOCHAT_BASE_DIR/<previous phase's dir>/<model_tag>
    source_step: int = -1  # -1 = the source's final checkpoint
    # data (nanochat/tasks): name[:weight],... ; the downloaded tasks need the `datasets` package
    tasks: str = BUILTIN_MIXTURE  # the training mixture, e.g. smoltalk,mmlu,gsm8k:2,identity
    eval_tasks: str = runtime("")  # evaluated on their test split; default: the training tasks
    task_size: int = 10000  # examples per generated task for training (a twentieth of it held out for evaluation)
    num_epochs: float = 1.0  # the horizon when num_iterations is -1: passes over the training mixture

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_seq_len == 0 or self.max_seq_len < -1:
            raise ConfigError(f"--max_seq_len must be >= 1 or -1 (the source model's), got {self.max_seq_len}")
        if self.source_step < -1:
            raise ConfigError(f"--source_step must be a step >= 0 (or -1: the final one), got {self.source_step}")
        if self.task_size < 1 or self.num_epochs <= 0:
            raise ConfigError(f"--task_size must be >= 1 and --num_epochs > 0, got {self.task_size}, {self.num_epochs}")
        for spec in filter(None, (self.tasks, self.eval_tasks)):
            try:
                parse_mixture_spec(spec)  # names and weights only: nothing is loaded yet
            except ValueError as e:
                raise ConfigError(f"--tasks / --eval_tasks: {e}") from None


@dataclass
class TrainConfig(LoopConfig):
    # model
    depth: int = DEFAULT_DEPTH  # the model dial: width = depth x 64, rounded up to a multiple of head_dim
    head_dim: int = 128  # channels per attention head
    # horizon: num_iterations wins if > 0, else tokens = target_param_data_ratio * params (Chinchilla 20)
    target_param_data_ratio: float = 20.0  # training tokens per parameter when num_iterations is -1
    # samples
    sample_every: int = runtime(2000)  # print greedy samples every N steps; -1 = never

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("depth", "head_dim", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.sample_every == 0:
            raise ConfigError("--sample_every takes a step count, or -1 to disable")

    @property
    def tag(self) -> str:
        return checkpoint_tag(self.model_tag, self.depth)


@dataclass
class MidConfig(ChatConfig):
    eval_every: int = 150  # -1 = only at the end


@dataclass
class SFTConfig(ChatConfig):
    # batch: rows of whole conversations, so the step is counted in rows x max_seq_len tokens (padding included)
    pack: bool = True  # several conversations to a row, best fit (nanochat/chat_data.py); False = one, padded
    doc_mask: bool = True  # with pack: attention stays inside each conversation of a row (scripts/bench_mask.py)
    device_batch_size: int = 4  # rows per micro-batch on each rank
    total_batch_size: int = -1  # tokens (rows x max_seq_len) per step; -1 = one micro-batch on every rank
    # fine-tuning nudges: 2% of the pretraining learning rates, decayed linearly to 0 over the whole run
    embedding_lr: float = 0.004  # AdamW, token embedding
    unembedding_lr: float = 0.00008  # AdamW, output head
    matrix_lr: float = 0.0004  # Muon, every matrix in the blocks
    warmdown_ratio: float = 1.0  # fraction of steps decaying the LR at the end
    eval_every: int = 100  # -1 = only at the end


@dataclass
class RLConfig(ChatConfig):
    # data: tasks with an automatic check (arithmetic offline; gsm8k with the `datasets` package)
    tasks: str = "arithmetic"  # the training mixture, name[:weight],...
    max_seq_len: int = -1  # prompt + answer, in tokens; -1 = the source model's context
    # sampling
    prompts_per_step: int = 16  # prompts per optimizer step, over all ranks (a multiple of the world size)
    num_samples: int = 16  # the group: completions sampled per prompt
    max_new_tokens: int = 256  # the longest answer
    temperature: float = 1.0
    top_k: int = 50  # 0 = sample from the whole vocabulary
    device_batch_size: int = 8  # completions per forward/backward pass (divides num_samples)
    total_batch_size: int = -1  # -1: a step is prompts_per_step x num_samples completions (any other total refused)
    # optimization: 5% of the pretraining learning rates, decayed linearly to 0
    embedding_lr: float = 0.01
    unembedding_lr: float = 0.0002
    matrix_lr: float = 0.001
    warmdown_ratio: float = 1.0
    # evaluation: pass@k on held-out problems
    eval_every: int = 60  # -1 = only at the end
    eval_problems: int = runtime(256)  # held-out problems per evaluation, over all ranks
    pass_k: int = runtime(8)  # samples per problem
    save_every: int | str = 60

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("prompts_per_step", "num_samples", "max_new_tokens", "eval_problems", "pass_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.num_samples % self.device_batch_size:
            raise ConfigError(f"--device_batch_size={self.device_batch_size} must divide --num_samples="
                              f"{self.num_samples} (a micro-batch holds completions of one prompt)")  # fmt: skip
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (a group of identical greedy answers teaches nothing), got"
                              f" {self.temperature}")  # fmt: skip
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if self.eval_tokens != -1:  # inherited from LoopConfig: RL's evaluation counts problems
            raise ConfigError(f"--eval_tokens does not apply to RL (it evaluates --eval_problems problems), got"
                              f" {self.eval_tokens}; leave it out")  # fmt: skip


def config_of(phase: PhaseInfo) -> type:
    """A phase's settings class (the registry names it; its script parses the command line into it): reached
    without importing a training script or torch."""
    return globals()[phase.config]
