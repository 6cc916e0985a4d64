"""A checkpoint dir per node, for nodes that share no disk.

Optimizer state is replicated (nanochat/optim.py), so every node's local rank 0 holds the whole checkpoint: in
this mode each of them writes every checkpoint into its own node's dir, at the same step, with the usual commit
rule (nanochat/saver.py). Losing a node then loses no checkpoint, and whichever node torchrun's rendezvous makes
global rank 0 next time resumes from its own files. Global rank 0 alone copies them to --remote_dir, which this
mode requires: a node on a new machine starts with an empty dir and is filled from there.

At start the dirs are brought in step, before any rank loads a checkpoint (collective; every rank calls both):

- `before_start`: each node reports its newest valid checkpoint. If some node holds a newer one of the run than
  global rank 0's node does (rank 0 landed on a new machine, and the remote lags), that node uploads it, so
  rank 0's usual restore from the remote finds it. No step of work is lost to a node swap.
- `after_start`: rank 0 has chosen the resume point. A node whose dir lacks it downloads it (verified); if the
  remote lacks it too, rank 0 uploads it first. A node whose dir holds another run's checkpoints (or any, on a
  --resume=False start) has them archived, nothing deleted.

The supervisor decides the mode (it checks at start whether the nodes see one dir: supervisor/nodes.py) and tells
every trainer by the environment variable below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from nanochat import checkpoint, metrics
from nanochat.checkpoint import Checkpoint, CheckpointError, StorageError
from nanochat.common import DistInfo
from nanochat.remote import Remote, first_line

Say = Callable[[str], None]
ENV = "NANOCHAT_CHECKPOINT_DIR_PER_NODE"  # "1": every node has its own checkpoint dir (set by nanochat-run)


def _gather(dist_info: DistInfo, value) -> list:
    if not dist_info.is_distributed:
        return [value]
    out = [None] * dist_info.world_size
    dist.all_gather_object(out, value)
    return out


def _newest(ckpt_dir: Path) -> tuple[int, str | None] | None:
    point = checkpoint.find_latest_valid(ckpt_dir, warn=lambda msg: None) if ckpt_dir.is_dir() else None
    return (point.step, checkpoint.run_id(ckpt_dir, point)) if point else None


def _upload(remote: Remote, ckpt_dir: Path, step: int, log: Say) -> None:
    if remote.upload(ckpt_dir, step):
        log(f"uploaded step {step} to {remote.url}: another node's dir lacks it")


def before_start(ckpt_dir: Path, remote: Remote, dist_info: DistInfo, writer: bool, log: Say, warn: Say) -> None:
    """Collective, with --resume: a newer checkpoint of the run than rank 0's node has goes to the remote (by the
    lowest rank that holds it), so that rank 0 restores it from there."""
    have = _gather(dist_info, _newest(ckpt_dir) if writer else None)
    lineage = have[0][1] if have[0] else None  # rank 0's node's run; none on a new machine: the others'
    ours = [(h[0], rank) for rank, h in enumerate(have) if h and (lineage is None or h[1] == lineage)]
    if ours:
        step, holder = max(ours, key=lambda c: (c[0], -c[1]))
        if dist_info.rank == holder and step > (have[0][0] if have[0] else -1):
            try:
                _upload(remote, ckpt_dir, step, log)
            except Exception as e:  # noqa: BLE001 - rank 0 resumes from an older step then: lose steps, not the run
                warn(f"could not upload step {step} for rank 0's node ({type(e).__name__}: {first_line(e)})")
    _gather(dist_info, None)  # rank 0 looks at the remote after the upload


def after_start(ckpt_dir: Path, remote: Remote, dist_info: DistInfo, writer: bool, point: Checkpoint | None,
                run_id: str, resume: bool, log: Say, warn: Say) -> None:  # fmt: skip
    """Collective: every node's dir holds the run id and the checkpoint rank 0 resumes from (`point`), or every
    rank raises the same one-line error."""
    lacks, error = False, None
    if writer and not dist_info.master:
        try:
            lacks = _adopt(ckpt_dir, point, run_id, resume, log)
        except (OSError, CheckpointError) as e:
            error = f"preparing {ckpt_dir} failed ({getattr(e, 'strerror', None) or e})"
    asked = _gather(dist_info, (lacks, error))
    error = error if dist_info.master else None  # each error is told once, by the rank that had it
    if dist_info.master and not any(e for _, e in asked) and any(lack for lack, _ in asked):
        try:
            _upload(remote, ckpt_dir, point.step, log)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            error = f"uploading step {point.step} to {remote.url} failed ({type(e).__name__}: {first_line(e)})"
    errors = [e for _, e in asked if e] + [e for e in _gather(dist_info, error) if e]
    if not errors and lacks:
        try:
            checkpoint.set_aside(ckpt_dir, point.step, warn)  # a damaged copy of that step: kept as evidence
            remote.download(point.step, ckpt_dir)
            log(f"downloaded step {point.step} from {remote.url} into this node's {ckpt_dir}")
        except Exception as e:  # noqa: BLE001 - told to every rank below
            error = f"downloading step {point.step} from {remote.url} failed ({type(e).__name__}: {first_line(e)})"
    errors += [e for e in _gather(dist_info, error if lacks and not errors else None) if e]
    if errors:
        raise StorageError(f"{errors[0]}; every node needs the checkpoint rank 0 resumes from: fix it, then resume")


def _adopt(ckpt_dir: Path, point: Checkpoint | None, run_id: str, resume: bool, log: Say) -> bool:
    """This node's dir joins rank 0's run; True if it lacks the resume point."""
    checkpoint.make_dir(ckpt_dir)
    other = checkpoint.run_id(ckpt_dir)
    if (not resume or other not in (None, run_id)) and (archived := checkpoint.archive(ckpt_dir)):
        metrics.archive(ckpt_dir, archived)
        log(f"this node's {ckpt_dir} held {'old' if not resume else 'another run'}'s checkpoints: moved to {archived}")
    if checkpoint.run_id(ckpt_dir) != run_id:
        checkpoint.write_text_atomic(ckpt_dir / checkpoint.RUN_ID, run_id + "\n")
    if point is None:
        return False
    here = checkpoint.inspect(ckpt_dir, point.step)
    return not (here.valid and (here.meta or {}).get("run_id") == (point.meta or {}).get("run_id"))
