"""Checkpoints: the only package that knows their file names, how they are committed, verified and pruned.

A checkpoint at step N is three files in one directory, plus a marker:

    model_00000N.pt      model weights (torch.save of the state dict)
    optim_00000N.pt      AdamW moments and Muon momentum. The optimizer state is replicated on every rank
                         (see nanochat/optim.py), so rank 0 writes one file; there are no per-rank parts.
    meta_00000N.json     step, configs, metrics, every rank's data-loader position and RNG state, stop reason,
                         and the size and xxh3-64 checksum of the two files above. Written last: it is the
                         commit marker.
    latest_step.txt      the newest committed step, replaced atomically after the meta.

    .run_id              the run's lineage: a random id made at a fresh start and recorded in every meta, so
                         an in-memory snapshot is only ever resumed into the run that wrote it
    .trainer.lock, .nanochat-run.lock   the writer's and the supervisor's locks (nanochat/locks.py)

Every file is written to `.tmp.<name>.<pid>` in the same directory, flushed, fsync'ed and renamed, then the
directory is fsync'ed. So a crash at any instant leaves either a committed checkpoint or debris that is not one:
a temp file (removed at the next start unless its writer is still alive) or files without a meta (an uncommitted
save, overwritten when the run reaches that step again). A checkpoint is valid only if its meta parses, both files
match the sizes and checksums it records (xxh3-64, ~25 GB/s on one core: verifying costs little next to reading)
and both load with `torch.load(weights_only=True)` (a checkpoint can never run code). `find_resume_point` is the
one answer to "the newest usable checkpoint" for the trainer, the saver, the supervisor, `status` and `prune`: it
takes the newest valid one and says why it skipped any newer ones. A damaged checkpoint is never deleted or
overwritten silently (it is renamed to `*.damaged` with a warning before a new save takes its step), and pruning
keeps the newest `keep` *verified* checkpoints.

Where each rule lives (each module imports only those above it in this list, so there is no import circle):

    nanochat/errors.py   CheckpointError, StorageError (below this package: nanochat/locks.py raises them too)
    meta.py              the meta as one typed, versioned record (`Meta`: `parse`, `to_dict`; `SCHEMA_VERSION`)
    names.py             file names (`file_name`, `parse_name`, `record_path`), the `Checkpoint` record of one step
    verify.py            what a meta may vouch for (`vouched_files`), checksums, `inspect`, `scan`
    commit.py            durable writes and the commit (`write`, `mark_latest`, `update_meta`), `set_aside`,
                         `clean_temp`
    storage.py           where checkpoints live, as one interface (`CheckpointStorage`): `LocalDir` here (and each
                         snapshot slot); nanochat/remote.py's `Remote` for copies at a URL
    discovery.py         THE resolver over any storage (`valid_newest_first`: the valid checkpoints, newest first,
                         each skip warned), the latest marker, `find_latest_valid` (the disk alone)
    lineage.py           `run_id`, `start_lineage`, `source_record`, `source_changed`
    loading.py           `load`, `load_model` (torch is imported at the first load, never at import)
    retention.py         THE retention plan over any storage (`plan`), `plan_prune`, `prune`, `slim`, `make_room`,
                         `kept_forever`, `archive`
    snapshots.py         in-memory snapshots: the same files and rules in shared memory (`slots`, `newest`,
                         `holding`, `remove`, `stale`)
    resolve.py           `find_resume_point`: the newest valid checkpoint on disk, or a newer snapshot of the run

Callers use this package's names (`from nanochat import checkpoint; checkpoint.inspect(...)`), and
`nanochat.checkpoint.snapshots` for snapshots. The directory's locks (`DirLock`, `LockError`, `lock_holder`) are
nanochat/locks.py; saving from the trainer (when, where, in the background) is nanochat/saver.py.
"""

from __future__ import annotations

from nanochat.checkpoint import snapshots
from nanochat.checkpoint.commit import (
    clean_temp,
    mark_latest,
    set_aside,
    update_meta,
    write,
    write_record,
    write_text_atomic,
)
from nanochat.checkpoint.discovery import (
    checked_newest_first,
    find_latest_valid,
    read_latest_marker,
    valid_newest_first,
)
from nanochat.checkpoint.lineage import run_id, source_changed, source_record, start_lineage
from nanochat.checkpoint.loading import BYTES_PER_WEIGHT, load, load_model
from nanochat.checkpoint.meta import SCHEMA_VERSION, Meta, Metric
from nanochat.checkpoint.names import KINDS, LATEST, RUN_ID, Checkpoint, file_name, parse_name, record_path
from nanochat.checkpoint.resolve import find_resume_point
from nanochat.checkpoint.retention import archive, kept_forever, make_room, plan, plan_prune, prune, slim
from nanochat.checkpoint.storage import CheckpointStorage, LocalDir
from nanochat.checkpoint.verify import MetaError, check_file, file_digest, inspect, scan, vouched_files
from nanochat.errors import CheckpointError, StorageError
from nanochat.safefile import TMP_PREFIX, fsync_path, make_dir  # this package's names since long

__all__ = [
    "BYTES_PER_WEIGHT",
    "KINDS",
    "LATEST",
    "RUN_ID",
    "SCHEMA_VERSION",
    "TMP_PREFIX",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStorage",
    "LocalDir",
    "Meta",
    "MetaError",
    "Metric",
    "StorageError",
    "archive",
    "check_file",
    "checked_newest_first",
    "clean_temp",
    "file_digest",
    "file_name",
    "find_latest_valid",
    "find_resume_point",
    "fsync_path",
    "inspect",
    "kept_forever",
    "load",
    "load_model",
    "make_dir",
    "make_room",
    "mark_latest",
    "parse_name",
    "plan",
    "plan_prune",
    "prune",
    "read_latest_marker",
    "record_path",
    "run_id",
    "scan",
    "set_aside",
    "slim",
    "snapshots",
    "source_changed",
    "source_record",
    "start_lineage",
    "update_meta",
    "valid_newest_first",
    "vouched_files",
    "write",
    "write_record",
    "write_text_atomic",
]
