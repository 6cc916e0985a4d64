"""Where things live: the base directory and the checkpoint folder of a model. Torch-free on purpose: the
supervisor's `--help`, `status` and `logs` need these answers and must start in a blink, not after seconds of
`import torch`."""

from __future__ import annotations

import os
from pathlib import Path

from nanochat.config import ConfigError

DEFAULT_DEPTH = 20  # TrainConfig.depth's default; the default model's checkpoints go to base_checkpoints/d20


def get_base_dir() -> Path:
    """Where tokenizer, data and checkpoints live: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or str(Path.home() / ".cache" / "nanochat")
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_tag(model_tag: str, depth: int) -> str:
    """The checkpoint folder's name under base_checkpoints/: `model_tag`, default d<depth>. Raises ConfigError for
    a tag that is not a plain folder name (it must never reach outside base_checkpoints/)."""
    if "/" in model_tag or "\\" in model_tag or ".." in model_tag:
        raise ConfigError(
            f"--model_tag={model_tag!r} must be a plain name (no '/', '\\' or '..'): it names a folder"
            " under base_checkpoints/; use --checkpoint_dir for another place"
        )
    return model_tag or f"d{depth}"
