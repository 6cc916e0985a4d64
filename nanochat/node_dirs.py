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

from nanochat import checkpoint, metrics
from nanochat.checkpoint import Checkpoint, CheckpointError, StorageError
from nanochat.common import DistInfo, gather
from nanochat.remote import Remote, first_line

Say = Callable[[str], None]
ENV = "NANOCHAT_CHECKPOINT_DIR_PER_NODE"  # "1": every node has its own checkpoint dir (set by nanochat-run)


def _newest(ckpt_dir: Path, warn: Say, cache: dict | None) -> tuple[int, str | None] | None:
    try:
        point = checkpoint.find_latest_valid(ckpt_dir, lambda msg: None, cache=cache) if ckpt_dir.is_dir() else None
        return (point.step, checkpoint.run_id(ckpt_dir, point)) if point else None
    except Exception as e:  # noqa: BLE001 - this node's copies are unreadable: the others' count
        warn(f"cannot read {ckpt_dir} ({type(e).__name__}: {first_line(e)}); this node's copies are not used")
        return None


def _remote_newest(remote: Remote, lineage: str | None) -> tuple[int, str | None] | None:
    try:
        committed = remote.committed(lineage)
    except Exception:  # noqa: BLE001 - unreachable: rank 0's restore says so
        return None
    return (committed[0][0], committed[0][1].get("run_id")) if committed else None


def _upload(remote: Remote, ckpt_dir: Path, step: int, log: Say) -> None:
    if remote.upload(ckpt_dir, step):
        log(f"uploaded step {step} to {remote.url}: another node's dir lacks it")


def _raise_any(dist_info: DistInfo, error: str | None) -> None:
    """Collective: every rank raises the first error any rank had (so no rank waits in a collective forever)."""
    if failed := next((e for e in gather(dist_info.world_size, error) if e), None):
        raise StorageError(f"{failed}; every node needs the checkpoint rank 0 resumes from: fix it, then resume")


def before_start(ckpt_dir: Path, remote: Remote, dist_info: DistInfo, writer: bool, log: Say, warn: Say,
                 cache: dict | None = None) -> None:  # fmt: skip
    """Collective, with --resume: a checkpoint of the run newer than both rank 0's newest and the remote's goes to
    the remote (sent by the lowest rank that holds it), so that rank 0 restores it from there. `cache`: the one
    the trainer's `find_start` verifies with next (`checkpoint.valid_newest_first`), so no file is read twice."""
    mine = _newest(ckpt_dir, warn, cache) if writer else None
    if dist_info.master:  # the run: rank 0's node's, else the remote's newest (a new machine for rank 0)
        lineage = mine[1] if mine else checkpoint.run_id(ckpt_dir)
        mine = (mine, _remote_newest(remote, lineage))
    have = gather(dist_info.world_size, mine)
    local0, remote0 = have[0]
    lineage = (local0 or remote0 or (None, None))[1]  # None: nothing is known of the run; any node's copies count
    floor = max(local0[0] if local0 else -1, remote0[0] if remote0 else -1)
    ours = [(h[0], rank) for rank, h in enumerate(have[1:], 1) if h and (lineage is None or h[1] == lineage)]
    error = None
    if ours and (best := max(ours, key=lambda c: (c[0], -c[1])))[0] > floor and dist_info.rank == best[1]:
        try:
            _upload(remote, ckpt_dir, best[0], log)
        except Exception as e:  # noqa: BLE001 - told to every rank: resuming from older would lose the steps
            error = f"uploading step {best[0]} for rank 0 failed ({type(e).__name__}: {first_line(e)})"
    _raise_any(dist_info, error)  # and rank 0 looks at the remote only after the upload


def after_start(ckpt_dir: Path, remote: Remote, dist_info: DistInfo, writer: bool, point: Checkpoint | None,
                run_id: str, resume: bool, log: Say, warn: Say) -> None:  # fmt: skip
    """Collective: every node's dir holds the run id and the checkpoint rank 0 resumes from (`point`), or every
    rank raises the same one-line error."""
    lacks, error = False, None
    if writer and not dist_info.master:
        try:
            lacks = _adopt(ckpt_dir, point, run_id, resume, log)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            error = f"preparing {ckpt_dir} failed ({type(e).__name__}: {first_line(e)})"
    asked = gather(dist_info.world_size, (lacks, error))
    errors = [e for _, e in asked if e]
    if dist_info.master and not errors and any(lack for lack, _ in asked):
        try:
            _upload(remote, ckpt_dir, point.step, log)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            error = f"uploading step {point.step} to {remote.url} failed ({type(e).__name__}: {first_line(e)})"
    _raise_any(dist_info, errors[0] if errors else error if dist_info.master else None)
    error = None
    if lacks:
        try:  # the remote's copy as its meta was checked (a copy here that does not match is set aside)
            if (meta := dict(remote.committed(run_id, point.step)).get(point.step)) is None:
                raise CheckpointError(f"{remote.url} holds no valid copy of step {point.step} of this run")
            remote.download(point.step, ckpt_dir, meta, warn)
            log(f"downloaded step {point.step} from {remote.url} into this node's {ckpt_dir}")
        except Exception as e:  # noqa: BLE001 - told to every rank below
            error = f"downloading step {point.step} from {remote.url} failed ({type(e).__name__}: {first_line(e)})"
    _raise_any(dist_info, error)


def _adopt(ckpt_dir: Path, point: Checkpoint | None, run_id: str, resume: bool, log: Say) -> bool:
    """This node's dir joins rank 0's run (any other run's checkpoints, or all on a --resume=False start, are
    archived); True if it lacks a copy of the resume point that loads like rank 0's."""
    checkpoint.make_dir(ckpt_dir)
    runs = {c.meta.run_id for c in checkpoint.scan(ckpt_dir) if c.valid} | {checkpoint.run_id(ckpt_dir)}
    if (not resume or runs - {None, run_id}) and (archived := checkpoint.archive(ckpt_dir)):
        metrics.archive(ckpt_dir, archived)
        log(f"this node's {ckpt_dir} held {'old' if not resume else 'another run'}'s checkpoints: moved to {archived}")
    if checkpoint.run_id(ckpt_dir) != run_id:
        checkpoint.write_text_atomic(ckpt_dir / checkpoint.RUN_ID, run_id + "\n")
    if point is None:
        return False
    here = checkpoint.inspect(ckpt_dir, point.step)
    # the same run's step, and the optimizer state too if rank 0 loads it (a slimmed copy would not do)
    return not (here.valid and here.meta.run_id == run_id and here.weights_only <= point.weights_only)
