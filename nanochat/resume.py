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
resumes), which `nanochat-run status` shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nanochat.checkpoint import CheckpointError, Meta
from nanochat.optim import lr_multiplier
from nanochat.redact import redact
from nanochat.registry import PHASES
from nanochat.settings import config_of, marked

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


def record(ext: Extension | None) -> dict | None:
    return asdict(ext) if ext else None
