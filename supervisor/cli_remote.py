"""`nanochat-run pull`, `push` and `prune --remote-dir`: the remote copies of a run's checkpoints by hand
(nanochat/remote.py does the work). Registered on the app in supervisor/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanochat import checkpoint
from nanochat.config import ConfigError
from nanochat.redact import redact
from nanochat.registry import DEFAULT
from supervisor.launch import UsageProblem
from supervisor.options import PhaseOption, confirm, resolve_dirs


def remote_call(what: str, url: str, call):
    """Run a remote operation; a missing filesystem package is bad usage, the storage failing one line (exit 1)."""
    from nanochat.remote import first_line

    try:
        return call()
    except ConfigError as e:
        raise UsageProblem(str(e).replace("--remote_dir", "the URL")) from None
    except (checkpoint.CheckpointError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - network, credentials, a missing bucket: one line, never a traceback
        raise checkpoint.StorageError(f"{what} {redact(url)} failed ({type(e).__name__}: {first_line(e)})") from None


def pull(
    url: Annotated[str, typer.Argument(help="The remote dir of a run: s3://bucket/prefix, gs://..., file:///...")],
    step: Annotated[int | None, typer.Option(help="The checkpoint's step (default: the newest committed).")] = None,
    to: Annotated[
        Path | None, typer.Option(help="The local dir to put it in (default: ./<the URL's last part>).")
    ] = None,
) -> None:
    """Fetch a remote checkpoint, verified against its meta (sizes and checksums), e.g. to chat with it elsewhere."""
    from nanochat import remote

    target = (to or Path.cwd() / redact(url).rstrip("/").rsplit("/", 1)[-1]).expanduser().resolve()
    ckpt = remote_call("pulling from", url, lambda: remote.pull(url, step, target))
    print(f"pulled step {ckpt.step} ({ckpt.meta.phase}) into {target}, verified")
    print(f"chat with it: python -m scripts.chat_cli --checkpoint_dir {target}")


def push(
    remote_dir: Annotated[str, typer.Option("--remote-dir", help="Where to copy them (an fsspec URL).")],
    checkpoint_dir: Annotated[Path | None, typer.Option(help="A checkpoint dir.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="The run dir of a supervised run.")] = None,
    depth: Annotated[int | None, typer.Option(help="Find the checkpoint dir from the depth.")] = None,
    model_tag: Annotated[str | None, typer.Option(help="Find the checkpoint dir from the model tag.")] = None,
    phase: PhaseOption = DEFAULT.name,
) -> None:
    """Upload a run's valid local checkpoints that the remote lacks (oldest first; nothing remote is deleted)."""
    from nanochat import remote

    ckpt_dir, _ = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    if not any(c.valid for c in checkpoint.scan(ckpt_dir)):
        raise UsageProblem(f"no valid checkpoints in {ckpt_dir}: nothing to push")
    sent = remote_call("pushing to", remote_dir, lambda: remote.push(ckpt_dir, remote_dir))
    shown = redact(remote_dir)
    print(f"pushed {len(sent)} checkpoint(s) to {shown}" if sent else f"{shown} already has them all")


def prune_remote(url, keep, keep_every, checkpoint_dir, run_dir, depth, model_tag, phase, dry_run, yes) -> None:
    """`prune --remote-dir`: the remote's retention by hand. With a local checkpoint dir, only that run's lineage
    is touched (as the uploader does); without one, every checkpoint there counts."""
    from nanochat import remote

    ckpt_dir, _ = resolve_dirs(checkpoint_dir, run_dir, depth, model_tag, phase=phase)
    lineage = checkpoint.run_id(ckpt_dir) if ckpt_dir.is_dir() else None
    r = remote_call("reading", url, lambda: remote.check_remote(url))
    url = r.url  # from here on, for messages only
    doomed = remote_call("reading", url, lambda: r.plan_prune(keep, lineage, keep_every))
    if not doomed:
        print(f"nothing to prune in {url} (keeping the newest {keep})")
        return
    for step, names in doomed.items():
        print(f"{'would delete' if dry_run else 'delete'} step {step}: {', '.join(names)}")
    if dry_run:
        return
    if not yes and not confirm("delete these remote files?"):
        raise typer.Exit(1)
    deleted = remote_call("pruning", url, lambda: r.prune(keep, lineage, keep_every))
    print(f"deleted {len(deleted)} checkpoint(s) from {url}")
