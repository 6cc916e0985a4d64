"""Lineage: which run a checkpoint dir belongs to, and which checkpoint a derived phase started from.

`.run_id` is made at a fresh start and recorded in every meta, so an in-memory snapshot is only ever resumed into
the run that wrote it; `source_record` is what a derived phase (mid, SFT, RL) records of its starting checkpoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from nanochat import safefile
from nanochat.checkpoint.commit import write_text_atomic
from nanochat.checkpoint.meta import Meta
from nanochat.checkpoint.names import RUN_ID, Checkpoint, file_name
from nanochat.errors import CheckpointError


def source_record(directory: Path, ckpt: Checkpoint) -> dict:
    """What a derived phase records of the checkpoint it started from: phase, directory, step, model checksum."""
    model = ckpt.meta.files[file_name("model", ckpt.step)]
    return {"phase": ckpt.meta.phase, "dir": str(directory.resolve()), "step": ckpt.step,
            "model_xxh3_64": model.get("xxh3_64")}  # fmt: skip


def source_changed(record: dict) -> str:
    """'' if the checkpoint `record` describes is still there as it was, else what happened to it."""
    if not record:
        return ""
    meta_path = Path(record["dir"]) / file_name("meta", record["step"])
    try:
        files = Meta.parse(json.loads(meta_path.read_text()), meta_path.name).files
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return "is gone or unreadable"
    if files.get(file_name("model", record["step"]), {}).get("xxh3_64") != record.get("model_xxh3_64"):
        return "was replaced by another model"
    return ""


def run_id(directory: Path, disk: Checkpoint | None = None) -> str | None:
    """The run id of this directory's lineage: `.run_id`, else the one the newest valid checkpoint records."""
    try:
        text = safefile.read_text(directory / RUN_ID, limit=4096).strip()
        if text:
            return text
    except safefile.UnsafeFileError as e:  # a planted symlink: its target must never become this run's lineage
        raise CheckpointError(str(e)) from None
    except (OSError, UnicodeDecodeError):
        pass
    return disk.meta.run_id if disk and disk.meta else None


def start_lineage(directory: Path, disk: Checkpoint | None = None) -> str:
    """Make sure `.run_id` exists: keep the directory's lineage, or begin a new one (a fresh start)."""
    rid = run_id(directory, disk) or uuid.uuid4().hex[:16]
    if not (directory / RUN_ID).exists():
        write_text_atomic(directory / RUN_ID, rid + "\n")
    return rid
