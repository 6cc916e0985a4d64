"""Loading a verified checkpoint's tensors, never unpickling code (torch is imported at the first load).

A compressed file (nanochat/compress.py) may not declare more raw bytes than the model it is loaded for needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nanochat.checkpoint.names import KINDS, Checkpoint, file_name
from nanochat.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    import torch


def load(
    directory: Path, ckpt: Checkpoint, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
) -> tuple[dict, dict | None]:
    """(model state, optimizer state) of a verified checkpoint, never unpickling code; the optimizer state is None
    for a weights-only checkpoint. `model`, the module the weights are for, bounds what a compressed file may
    declare (see `_limits`)."""
    if ckpt.weights_only:
        return _load(directory, ckpt, device, ("model",), model)[0], None
    states = _load(directory, ckpt, device, KINDS, model)
    return states[0], states[1]


def load_model(
    directory: Path, ckpt: Checkpoint, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
) -> dict:
    """The weights alone (a derived phase starts from them with an optimizer of its own); `model` as for `load`."""
    return _load(directory, ckpt, device, ("model",), model)[0]


# The most raw bytes a payload file may hold per weight of the model: 8 (any dtype up to 64 bits: a checkpoint
# saved in fp32 loads into bf16 weights), and for the optimizer four such states per weight (AdamW's two moments,
# Muon's momentum, with room to spare).
BYTES_PER_WEIGHT = {"model": 8, "optim": 32}


def _limits(model: torch.nn.Module | None) -> dict[str, int | None]:
    """The most raw bytes each payload file may declare for `model` (None: unknown, only the file's own size
    bounds it): a compressed file cannot make a resume allocate more than the run's model and optimizer need."""
    if model is None:
        return {kind: None for kind in KINDS}
    weights = sum(t.numel() for t in model.state_dict().values())
    return {kind: per * weights + (1 << 20) for kind, per in BYTES_PER_WEIGHT.items()}


def _load(directory: Path, ckpt: Checkpoint, device, kinds, model=None) -> list[dict]:
    import torch

    from nanochat import compress

    states, limits = [], _limits(model)
    on_cpu = torch.device(device).type == "cpu"
    for kind in kinds:
        # Memory-mapped, except the optimizer state on CPU: the optimizer keeps those very tensors, and a mapping
        # would pin the file (disk or shared memory, even once pruned) for the rest of the run.
        mmap = not (on_cpu and kind == "optim")
        path = directory / file_name(kind, ckpt.step)
        try:  # plain torch.load(weights_only=True) if uncompressed
            state = compress.load(path, threads=0, mmap=mmap, max_raw=limits[kind])
        except compress.CompressedFileError as e:
            raise CheckpointError(f"{path} cannot be read ({e}); resume falls back to an older checkpoint") from e
        except OSError as e:
            raise StorageError(f"reading {path} failed ({e.strerror or e}); check the storage, then resume") from e
        if torch.device(device).type != "cpu":
            state = _to_device(state, device)
        states.append(state)
    return states


def _to_device(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
