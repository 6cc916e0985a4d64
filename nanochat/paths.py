"""Where things live: the base directory and the checkpoint folder of a model. Torch-free on purpose: the
supervisor's `--help`, `status` and `logs` need these answers and must start in a blink, not after seconds of
`import torch`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nanochat import safefile
from nanochat.config import ConfigError
from nanochat.registry import PHASES

DEFAULT_DEPTH = 20  # TrainConfig.depth's default; the default model's checkpoints go to base_checkpoints/d20


def get_base_dir() -> Path:
    """Where tokenizer, data and checkpoints live: $NANOCHAT_BASE_DIR, default ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or str(Path.home() / ".cache" / "nanochat")
    path = Path(base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_tag(model_tag: str, depth: int) -> str:
    """The checkpoint folder's name under base_checkpoints/: `model_tag`, default d<depth>. Raises ConfigError for
    a tag that is not a plain folder name: it must name one new folder inside the phase's folder, never the folder
    itself (`.`), its parent, a path (`a/b`, `/abs`), an option-like word (`-x`), nor another run's run dir (a
    run dir is `<tag>.run`)."""
    tag = model_tag or f"d{depth}"
    if not _TAG.fullmatch(tag) or tag.endswith(".run") or len(tag.encode()) > 200:
        raise ConfigError(
            f"--model_tag={model_tag!r} must be a plain name (letters, digits, '_', '.', '+', '-'; not starting"
            " with '.' or '-', not ending in '.run', at most 200 bytes): it names a folder under base_checkpoints/"
            " (or the phase's folder); use --checkpoint_dir for another place"
        )
    return tag


_TAG = re.compile(r"\w[\w.+-]*")  # one path component: no separator, NUL or control character; not . or ..


def phase_dir(phase: str, tag: str = "") -> Path:
    """Where a phase (base, mid, sft, rl) keeps the checkpoints of the model `tag`: <base dir>/<its folder>/<tag>
    (the folder itself for no tag). The one formula: the trainers, the supervisor and the tools all ask here."""
    return get_base_dir() / PHASES[phase].folder / tag


def tokenizer_file(base: Path | None = None) -> Path:
    """The trained tokenizer: <base>/tokenizer/tokenizer.json."""
    return (base if base is not None else get_base_dir()) / "tokenizer" / "tokenizer.json"


def file_fingerprint(path: Path) -> str | None:
    """A short content hash of a small file (the tokenizer's), None if it cannot be read: what a checkpoint
    records to tell later whether it was made with the same one."""
    import xxhash

    try:
        return xxhash.xxh3_64_hexdigest(safefile.read_bytes(path))
    except OSError:
        return None


def only_model(phase: str) -> str:
    """The tag of the one model a phase's folder holds; with none or several, a one-line ConfigError (a guess
    could continue the wrong model)."""
    where = phase_dir(phase)
    found = sorted(p.name for p in where.glob("*") if p.is_dir() and not p.name.endswith(".run"))
    if len(found) != 1:
        raise ConfigError(
            f"no model in {where}: train that phase first, or name the checkpoint dir" if not found
            else f"{where} holds several models ({', '.join(found)}): pick one with --model_tag"
        )  # fmt: skip
    return found[0]


def phase_dirs(phase: str, model_tag: str, checkpoint_dir: str = "", source_dir: str = "") -> tuple[Path, Path | None]:
    """(checkpoint dir, source dir) of a chat phase (mid, sft, rl). The tag defaults to the one model of the phase it
    starts from."""
    source = PHASES[phase].source
    tag = checkpoint_tag(model_tag, DEFAULT_DEPTH) if model_tag else ""
    if not tag and not (checkpoint_dir and source_dir):
        tag = only_model(source)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else phase_dir(phase, tag)
    source_path = Path(source_dir) if source_dir else phase_dir(source, tag)
    if not source_path.is_dir() and not ckpt_dir.is_dir():  # (a started phase resumes without its source)
        raise ConfigError(f"no {source} model at {source_path} to start {phase} from: train that phase first, or"
                          " pass --source_dir")  # fmt: skip
    return ckpt_dir, source_path


def model_dir(phase: str, model_tag: str = "", checkpoint_dir: str = "") -> Path:
    """The checkpoint dir a model is read from (chat, evaluation): `checkpoint_dir`, else <phase's folder>/<tag>,
    the tag defaulting to the phase's one model."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    tag = checkpoint_tag(model_tag, DEFAULT_DEPTH) if model_tag else only_model(phase)
    return phase_dir(phase, tag)
