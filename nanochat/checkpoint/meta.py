"""A checkpoint's meta (meta_XXXXXX.json) as one typed, versioned record: `Meta`, what writers build and readers get.

Every meta ever written stays readable: `Meta.parse` takes a meta of any version, and a field that came in after
a meta was written takes its default (a meta without a version is version 0: written before the field came in).
`to_dict` gives the JSON back, in the current schema: the keys the trainer writes at every save always, the rest
only when set, plus the version; keys this code does not know (a newer writer's) are kept, so rewriting a meta
(`update_meta`, `slim`) never drops them. Who adds which field: the trainer's save (nanochat/phase.py) the run's
record, nanochat/saver.py the ranks, warnings and a snapshot's marks, commit.py the step, files and time.

Readers use the attributes (`ckpt.meta.stop_reason`). The record is also a read-only mapping of its JSON form
(`ckpt.meta["stop_reason"]`), for code that addresses a meta as the file spells it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nanochat.errors import CheckpointError
from nanochat.registry import DEFAULT

SCHEMA_VERSION = 1  # 1: the version field itself; every key of version 0 as it was
METRIC_PREFIX = "val_"  # a phase's evaluation: val_bpb, val_pass@8, ..., with its step as `<metric>_step`

# written at every save even when null (the trainer's record); every other field only when set
_ALWAYS = {
    "run_id", "phase", "num_iterations", "final", "stop_reason", "model_config", "train_config", "world_size",
    "total_batch_size", "tokens_seen", "changed_on_resume", "schedule_extended", "train_loss", "smooth_loss",
    "train_time", "started_at", "torch_version", "ranks", "step", "files", "saved_at",
}  # fmt: skip
_NUMBER = (int, float)


@dataclass(frozen=True)
class Metric:
    """An evaluation's number and the step it was measured at (None before the first evaluation)."""

    value: float | None = None
    step: int | None = None


@dataclass(frozen=True, eq=False, kw_only=True)
class Meta(Mapping):
    """What one checkpoint records. Field order is the order of the keys in the file."""

    version: int = SCHEMA_VERSION  # of the schema the meta was written in (0: before metas had one)
    # what the trainer records at each save (nanochat/phase.py)
    tokenizer: str | None = None  # base training's tokenizer fingerprint
    source: dict | None = None  # a derived phase's starting checkpoint (lineage.source_record)
    tasks: str | None = None  # a chat phase's training mixture
    run_id: str | None = None
    phase: str = DEFAULT.run_name  # metas written before they said so were all base training's
    num_iterations: int | None = None
    final: bool = False
    stop_reason: str | None = None
    model_config: dict | None = None
    train_config: dict | None = None
    world_size: int | None = None
    total_batch_size: int | None = None
    tokens_seen: int | None = None
    changed_on_resume: list[dict] = field(default_factory=list)
    schedule_extended: dict | None = None  # resume.Extension as a dict
    rollbacks: list[dict] = field(default_factory=list)  # bad numbers: rolled back (data skipped) or warned of
    loss_window: list[float] = field(default_factory=list)  # the spike rule's recent losses (guard.py)
    metrics: dict[str, Metric] = field(default_factory=dict)  # {"val_bpb": Metric(...)}
    train_loss: float | None = None
    smooth_loss: float | None = None
    train_time: float | None = None
    started_at: float | None = None
    torch_version: str | None = None
    # the saver's (nanochat/saver.py)
    warnings: list[str] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)  # each rank's {"loader": ..., "rng": ...}, in rank order
    snapshot: bool = False
    checkpoint_dir: str | None = None  # a snapshot's: the directory its checkpoints go to
    # the commit's (commit.py, retention.slim) and an average's (nanochat/ensemble.py)
    weights_only: bool = False
    averaged_from: list[dict] | None = None
    step: int
    files: dict[str, dict]  # {file name: size, checksum (xxh3_64; crc32 in old metas), codec}: see verify.py
    saved_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, kept as they are

    @classmethod
    def parse(cls, d: dict, source: str = "the meta", committed: bool = True) -> Meta:
        """The record of a meta's JSON. Raises CheckpointError (one line, naming `source`) for a malformed one.
        `committed=False` accepts a writer's record before the commit adds its step and files."""
        try:
            return cls._parse(d, committed)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{source} is unreadable ({type(e).__name__}: {e})"[:300]) from None

    @classmethod
    def _parse(cls, d: dict, committed: bool) -> Meta:
        step = d["step"] if committed else d.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step is {step!r}"[:80] + ", not an integer")
        files = {name: entry for name, entry in (d["files"] if committed else d.get("files", {})).items()}
        metrics, used = {}, {"step", "files"}
        for key, value in d.items():
            if key.startswith(METRIC_PREFIX) and not key.endswith("_step"):
                metrics[key] = Metric(_check(key, value, _NUMBER), _check(f"{key}_step", d.get(f"{key}_step"), int))
                used |= {key, f"{key}_step"}
        known = {}
        for f in fields(cls):
            if f.name in d and f.name not in used and f.name not in ("metrics", "extra"):
                want = _TYPES.get(f.name)
                known[f.name] = _check(f.name, d[f.name], want) if want else d[f.name]
                used.add(f.name)
        if known.get("phase", "") is None:
            del known["phase"]
        known.setdefault("version", 0)
        extra = {k: v for k, v in d.items() if k not in used}
        return cls(step=step, files=files, metrics=metrics, extra=extra, **known)

    def to_dict(self) -> dict:
        """The JSON of this meta (see the module's docstring), in the current schema."""
        out: dict[str, Any] = {"version": max(self.version, SCHEMA_VERSION)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "metrics":
                for name, m in value.items():
                    out[name], out[f"{name}_step"] = m.value, m.step
            elif f.name == "extra":
                out.update(value)
            elif f.name != "version" and (f.name in _ALWAYS or not _unset(value)):
                out[f.name] = value
        return out

    def metric(self, name: str) -> Metric:
        """The evaluation `name` (e.g. "val_bpb") this meta records; an empty Metric if none."""
        return self.metrics.get(name, Metric())

    def with_fields(self, **changes: Any) -> Meta:
        """A copy with some keys set as the file spells them (a metric as `val_bpb=..., val_bpb_step=...`)."""
        return Meta.parse({**self.to_dict(), **changes}, committed=False)

    # the read-only mapping of the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Meta):
            other = other.to_dict()
        return isinstance(other, Mapping) and self.to_dict() == dict(other)

    __hash__ = None  # type: ignore[assignment]  # equal to its JSON form, which is not hashable


_TYPES: dict[str, type | tuple[type, ...]] = {
    "version": int, "tokenizer": str, "source": dict, "tasks": str, "run_id": str, "phase": str,
    "num_iterations": int, "final": bool, "stop_reason": str, "model_config": dict, "train_config": dict,
    "world_size": int, "total_batch_size": int, "tokens_seen": int, "changed_on_resume": list,
    "schedule_extended": dict, "rollbacks": list, "loss_window": list, "train_loss": _NUMBER,
    "smooth_loss": _NUMBER, "train_time": _NUMBER,
    "started_at": _NUMBER, "torch_version": str, "warnings": list, "ranks": list, "snapshot": bool,
    "checkpoint_dir": str, "weights_only": bool, "averaged_from": list, "saved_at": _NUMBER,
}  # fmt: skip


def _check(key: str, value: Any, want: type | tuple[type, ...]) -> Any:
    """`value` if it is None or of the type `want`, else TypeError (a bool is not a number here)."""
    if value is None or (isinstance(value, want) and not (isinstance(value, bool) and bool not in _tuple(want))):
        return value
    raise TypeError(f"{key} is {value!r}"[:80] + f", not {' or '.join(t.__name__ for t in _tuple(want))}")


def _tuple(want: type | tuple[type, ...]) -> tuple[type, ...]:
    return want if isinstance(want, tuple) else (want,)


def _unset(value: Any) -> bool:
    """Whether a field that is written only when set is left out (None, False, an empty list or dict)."""
    return value is None or value is False or (isinstance(value, (list, dict)) and not value)
