"""What a resume may change, and what it does about it. The README's "Resume with changed settings" table is the
user's version of this module; tests/test_resume.py backs each row.

    refused        the model or its tokens: depth, head dim (width, heads), vocabulary/tokenizer, sequence length.
                   One line naming the setting; the way out is --resume=False or another --model_tag.
    continues      --num_iterations raised after the run finished: the old final checkpoint stays (final ones are
                   never pruned) and training goes on to the new budget under the new budget's schedule. If the old
                   warmdown had already lowered the LR, the new schedule would put it back up at once;
                   --rewarm_steps=N ramps it from where the old schedule ended instead (see Extension).
    applied        everything else (learning rates, weight decay, schedule ratios, batch sizes, eval and save
                   settings, ...): in force from the resumed step on. Batch sizes are exact because the loader's
                   position is counted in tokens.

Every change is logged once at the resume and recorded in the meta as `changed_on_resume` (kept across later
resumes), which `nanochat-run status` shows. `restore` does all of it for the loop: the checks, the log lines, then
the weights, optimizer, loader position and RNG, returning the run's counters (nanochat/counters.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nanochat import checkpoint
from nanochat.checkpoint import Checkpoint, CheckpointError, Meta
from nanochat.common import DistInfo, print0, warn0
from nanochat.counters import Counters
from nanochat.optim import lr_multiplier
from nanochat.redact import redact
from nanochat.registry import PHASES
from nanochat.settings import config_of, marked
from nanochat.train_loop import set_rng_state

if TYPE_CHECKING:  # phase.py calls restore
    import torch

    from nanochat.optim import Optimizers
    from nanochat.phase import Loader, Plan
    from nanochat.settings import LoopConfig

# model_config keys a checkpoint cannot change, with the settings users know them by
MODEL = {"n_layer": "depth", "n_embd": "model width (--head_dim, depth)", "n_head": "heads (--head_dim)",
         "n_kv_head": "kv heads", "vocab_size": "vocab size (the tokenizer)",
         "sequence_len": "sequence length (--max_seq_len)"}  # fmt: skip
# settings that say how a run is driven, not what it trains: a difference is not worth a line (marked `quiet` on
# their fields in nanochat/settings.py)
QUIET = set().union(*(marked(config_of(p), "quiet") for p in PHASES.values()))


def check_compatible(meta: Meta, model_cfg, train_config: dict, directory: Path) -> None:
    """Refuse to resume into a different model: one line naming the setting and the way out."""
    saved, step = meta.model_config, meta.step
    for key, label in MODEL.items():
        if key in saved and saved[key] != getattr(model_cfg, key):
            _refuse(step, directory, f"{label} {saved[key]}", getattr(model_cfg, key))
    row = (meta.train_config or {}).get("max_seq_len")  # a chat phase's row length (-1: the model's context)
    if row is not None and row != train_config.get("max_seq_len", row):
        _refuse(step, directory, f"--max_seq_len {row}", train_config["max_seq_len"])


def check_tokenizer(meta: Meta, tokenizer: str | None, directory: Path) -> None:
    """Refuse the same vocabulary size over other tokens (`tokenizer`: the current one's fingerprint, where the
    phase records one: base training)."""
    if tokenizer and meta.tokenizer and meta.tokenizer != tokenizer:
        raise CheckpointError(
            f"the checkpoint at step {meta.step} in {directory} was trained with another tokenizer.json (the"
            " same vocab size, a different file); restore that tokenizer, or use --resume=False to start fresh or"
            " pick another --model_tag"
        )


def _refuse(step: int, directory: Path, have: str, want) -> None:
    raise CheckpointError(
        f"the checkpoint at step {step} in {directory} has {have}, this run asks for {want}; use --resume=False"
        " to start fresh or pick another --model_tag"
    )


def changes(saved: dict, current: dict) -> list[dict]:
    """The settings that differ from the checkpoint's train_config, as {"setting", "from", "to"}."""
    # a meta written before credentials in URLs were redacted: compared, and carried on, redacted
    saved = {key: redact(value) if isinstance(value, str) else value for key, value in saved.items()}
    return [{"setting": key, "from": saved[key], "to": current[key]}
            for key in sorted(saved) if key in current and key not in QUIET and saved[key] != current[key]]  # fmt: skip


@dataclass
class Extension:
    """A finished run given a larger --num_iterations: from `step` on, the LR multiplier ramps linearly from
    `from_lrm` (where the old schedule ended) to the new schedule over `rewarm` steps (0: no ramp, the new schedule
    at once). Recorded in the meta, so a resume in the middle of the ramp continues the same ramp."""

    step: int
    from_lrm: float
    rewarm: int

    def lrm(self, step: int, scheduled: float) -> float:
        """The multiplier for the optimizer step taken after `step` completed ones."""
        if step < self.step or self.rewarm <= 0 or step - self.step >= self.rewarm:
            return scheduled
        t = (step - self.step + 1) / self.rewarm
        return self.from_lrm + t * (scheduled - self.from_lrm)


def extension(meta: Meta, final: bool, num_iterations: int, rewarm: int) -> Extension | None:
    """The run's schedule extension: the one in the meta, or a new one if this resume raises the budget of a
    finished run."""
    if meta.schedule_extended and not final:
        return Extension(**meta.schedule_extended)
    old = meta.num_iterations
    if final and isinstance(old, int) and num_iterations > old:
        cfg = meta.train_config
        last = lr_multiplier(old - 1, old, cfg["warmup_ratio"], cfg["warmdown_ratio"], cfg["final_lr_frac"])
        return Extension(meta.step, last, rewarm)
    return None


def restore(
    point: tuple[Path, Checkpoint],
    ckpt_dir: Path,
    cfg: LoopConfig,
    plan: Plan,
    metric: str,
    tokenizer: str | None,
    model: torch.nn.Module,
    optimizers: Optimizers,
    loader: Loader,
    dist_info: DistInfo,
    exact: bool = True,
) -> Counters:
    """Resume from `point` (where this rank reads it, and the checkpoint; found by train_loop.find_start): refuse
    another tokenizer, log the changed settings and a schedule extension, then load the weights, the optimizer, the
    loader's position (resharded for another world size, or when not `exact`) and the RNG (when exact), and return
    the run's counters. Refuses a budget lowered below a checkpoint that is not a final one."""
    source, ckpt = point
    if source != ckpt_dir:
        print0(f"resume: the in-memory snapshot at step {ckpt.step} ({source}) is newer than any checkpoint")
    saved = ckpt.meta
    check_tokenizer(saved, tokenizer, ckpt_dir)
    for change in (changed := changes(saved.train_config, asdict(cfg))):
        print0(f"resume: --{change['setting']} changed from {change['from']!r} to {change['to']!r}")
    history = saved.changed_on_resume + [{"step": saved.step, **c} for c in changed]
    extended = extension(saved, ckpt.final, plan.num_iterations, cfg.rewarm_steps)
    if extended and extended.step == saved.step:
        ramp = f"ramps up over --rewarm_steps={extended.rewarm}" if extended.rewarm else "goes back at once"
        was = f"the LR multiplier was {extended.from_lrm:.2f}; it {ramp}"
        print0(f"resume: the run had finished at step {saved.step}; it goes on to {plan.num_iterations} under"
               f" the new budget's schedule ({was})")  # fmt: skip
    before = saved.step * plan.tokens_per_step if saved.tokens_seen is None else saved.tokens_seen
    load_weights(point, model, optimizers, dist_info.device)
    step, val = saved.step, saved.metric(metric)
    counters = Counters(step, saved.smooth_loss, saved.train_time, val.value, val.step,
                        before - step * plan.tokens_per_step, history, extended, list(saved.rollbacks),
                        list(saved.loss_window))  # fmt: skip
    load_position(saved.ranks, loader, dist_info, step, ckpt_dir, exact)
    if step >= plan.num_iterations and not ckpt.final:  # the budget was lowered below where the run is
        raise CheckpointError(
            f"the checkpoint at step {step} in {ckpt_dir} is already at or past --num_iterations="
            f"{plan.num_iterations} but is not a final one; raise --num_iterations to go on, or --resume=False"
            " to start fresh"
        )
    return counters


def load_weights(point: tuple[Path, Checkpoint], model: torch.nn.Module, optimizers: Optimizers, device: torch.device):
    """The model's weights and the optimizer's state (a weights-only fallback checkpoint: the optimizer starts
    afresh, and says so)."""
    source, ckpt = point
    model_state, optim_state = checkpoint.load(source, ckpt, device, model)
    model.load_state_dict(model_state)
    if optim_state is None:  # every newer checkpoint was damaged: the fallback is a weights-only one
        warn0(f"resuming from the weights-only checkpoint at step {ckpt.step}: the optimizer state (Adam"
              " moments, Muon momentum) starts afresh, so this resume is not exact")  # fmt: skip
    else:
        optimizers.load_state_dict(optim_state)


def load_position(ranks: list[dict], loader: Loader, dist_info: DistInfo, step: int, ckpt_dir: Path,
                  exact: bool = True) -> None:  # fmt: skip
    """The loader's position and the RNG of this rank, from the checkpoint's `ranks`; at another world size, or when
    not `exact` (--resume_exact=False), the loader reshards (the data order continues approximately, from a
    row-group boundary) and the RNG goes on as it is."""
    world = dist_info.world_size
    same = len(ranks) == world and exact
    try:
        if same:  # the loader position is in tokens: a changed batch size continues exactly
            loader.load_state_dict(ranks[dist_info.rank]["loader"])
        else:
            loader.load_resharded([r["loader"] for r in ranks])
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"the checkpoint at step {step} in {ckpt_dir} was saved with other data settings ({e}); restore"
            " them (e.g. --tasks, --task_size, --seed) or start fresh with --resume=False"
        ) from None
    if same:
        set_rng_state(ranks[dist_info.rank]["rng"], dist_info.device)
        print0(f"resumed from step {step} in {ckpt_dir}")
    else:
        why = f"at a new geometry ({len(ranks)} -> {world} ranks)" if len(ranks) != world else "not exactly"
        print0(
            f"resumed from step {step} in {ckpt_dir} {why}: weights, optimizer and schedule are exact; the data"
            " order continues approximately" + ("" if exact else " (--resume_exact=False), the RNG afresh")
        )
