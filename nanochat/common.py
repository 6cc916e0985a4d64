"""Device and process-group setup, small logging helpers, and the base directory (from nanochat/paths.py)."""

from __future__ import annotations

import ctypes
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.paths import get_base_dir  # noqa: F401 - re-exported: its home is torch-free, for the CLI

# The trainer's exit statuses, which the supervisor's policy reads (supervisor/policy.py):
#   0        the step budget is reached (possibly with warnings, recorded in the final meta)
#   2        refused: bad settings, an incompatible checkpoint, the directory in use; a restart cannot fix it
#   65       diverged (EX_DATAERR): more rollbacks than --max_rollbacks (nanochat/guard.py); not restarted
#   74       storage error (EX_IOERR): disk full, EIO, a stale NFS handle; a restart with backoff may succeed
#   128+sig  stopped by SIGINT/SIGTERM after saving a checkpoint
EXIT_REFUSED = 2
EXIT_DIVERGED = 65
EXIT_STORAGE = 74


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (RANK is set by torchrun; a plain python process is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def warn0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        warn_here(msg)


def say_here(msg: str) -> None:
    """print from this rank, whichever it is (one write: threads print too)"""
    print(msg + "\n", end="", flush=True)


def warn_here(msg: str) -> None:
    print(f"WARNING: {msg}\n", end="", file=sys.stderr, flush=True)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly single-process) job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def gather(world_size: int, value) -> list:
    """Collective: every rank's `value`, in rank order (any picklable object). One process: [value], no collective."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def init_distributed(device_type: str, timeout: float = 1800.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (nccl on CUDA, gloo on CPU).

    `timeout` bounds every collective, so it must cover the longest wait one rank can impose on the others: rank 0
    writing a final or signal checkpoint while the rest wait at the save's agreement (see --dist_timeout)."""
    if device_type == "auto":
        device_type = autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type=cuda but no CUDA device is visible; use --device_type=cpu")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        # device_id binds the NCCL communicator eagerly, which makes the first collective fail fast.
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed(barrier: bool = True) -> None:
    """Leave the process group. `barrier=False` on error paths, where a peer may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            # Every rank done with every collective before any tears down: a rank that exits while a peer's gloo
            # threads still talk to it can make that peer abort ("terminate called without an active exception").
            dist.barrier()
        dist.destroy_process_group()


KEEP_BELOW = 128 << 20  # bytes: blocks under this stay in the heap when freed; bigger ones are mmap'd (see below)


def keep_freed_memory(keep_below: int | None = KEEP_BELOW) -> bool:
    """Make glibc malloc keep freed blocks under `keep_below` bytes (never trim the heap), mmap only bigger ones.
    CPU training only.

    By default glibc serves big blocks (>= 128 KiB, its threshold rising to 32 MiB as they are freed) with mmap and
    unmaps them on free, so every CPU training step faults in, and the kernel zeroes, fresh pages for the
    activations and their gradients: scripts/bench_train.py measured 1.3-1.9x more tokens/s with the heap keeping
    them (its glibc-malloc arm is the comparison).

    Why not keep every block (`keep_below=None`: no mmap at all, the setting before this bound)? Its heap only
    grows: on the upstream config (bench_train's upstream arms) peak RSS climbed step after step and differed
    between identical runs (6.2-9.4 GB seen; 7.0 GB against 3.4 GB for default malloc in the run the README quotes).
    Not glibc's per-thread arenas: in a one-off check (malloc_stats() after five steps of the upstream config at
    batch 2, on random ids) the main arena held 2.06 GB with 0.38 GB in use and the one other arena 10 MB, and
    M_ARENA_MAX=1 or 2 left the peak unchanged. It is the one main heap: with trimming off it never shrinks, and the
    512 MiB blocks (the 32768-vocab logits and their gradients), freed between smaller long-lived blocks, leave
    holes the next step's blocks do not exactly refill, so it ratchets up by a few hundred MB at a time, by how
    allocations happen to interleave. Blocks of `keep_below` (128 MiB) and more now go to mmap, out of the heap: the
    upstream config's peak RSS is then 1.04x default malloc's, with as many page faults per step as default malloc
    there (its big blocks are mmap'd again), while every block under 128 MiB, all of a tiny config's (bench_train's
    d2/d4), is still reused without faults.
    Returns False where it does not apply (not glibc, or a glibc that refuses the threshold).
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
    try:
        libc = ctypes.CDLL("libc.so.6")
        if keep_below is None:
            big = libc.mallopt(M_MMAP_MAX, 0) == 1
        else:  # a fixed threshold also stops glibc's dynamic one
            big = libc.mallopt(M_MMAP_THRESHOLD, keep_below) == 1
        return big and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        return False
