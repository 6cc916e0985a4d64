"""`nanochat-run logs`: an attempt's torchrun.log, or one rank's stdout and stderr, printed or followed like
`tail -f`. Where the files are is supervisor/records.py's business (RunDir.attempt_dirs, rank_logs)."""

from __future__ import annotations

import codecs
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nanochat import safefile
from supervisor.records import TORCHRUN_LOG, RunDir, rank_logs

POLL = 0.2  # seconds between looks at a followed file


class NotFound(Exception):
    """The attempt, rank or file asked for does not exist; the message names what does."""


@dataclass
class Source:
    """One log file, read on from where the last read stopped."""

    label: str  # what its header says
    path: Path
    pos: int = 0
    # a read may end inside a UTF-8 character: keep the partial bytes for the next one
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def read(self) -> str:
        try:
            with safefile.open_read(self.path) as f:
                if os.fstat(f.fileno()).st_size < self.pos:  # truncated or replaced: start over
                    self.pos = 0
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return ""
        self.pos += len(data)
        return self.decoder.decode(data)


def interruptible() -> None:
    """Let SIGINT raise KeyboardInterrupt even where it came in ignored or blocked (a script's background job has it
    ignored, and `kill -INT` is how such a script ends one): `logs -f` and `status --watch` end on it with 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def spans(numbers: Iterable[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def pick(run: RunDir, attempt: int | None, rank: int | None) -> tuple[int, list[Source]]:
    """(attempt number, its log files): torchrun.log of the attempt (default the newest), or one rank's two."""
    dirs = run.attempt_dirs()
    if not dirs:
        raise NotFound(f"no attempts in {run.path} yet")
    n = max(dirs) if attempt is None else attempt
    if n not in dirs:
        raise NotFound(f"no attempt {n} in {run.path}; attempts: {spans(dirs)}")
    found = sources(n, dirs[n], rank)
    if not found and rank is None:
        raise NotFound(f"attempt {n} has no {TORCHRUN_LOG} in {dirs[n]}")
    if not found:
        ranks = rank_logs(dirs[n])
        have = f"ranks: {spans(ranks)}" if ranks else "no per-rank logs (its workers never started)"
        raise NotFound(f"no rank {rank} in attempt {n} ({dirs[n]}); {have}")
    return n, found


def sources(n: int, log_dir: Path, rank: int | None) -> list[Source]:
    """The attempt's files that exist now (torchrun creates a rank's files when it starts that worker)."""
    if rank is None:
        path = log_dir / TORCHRUN_LOG
        return [Source(f"attempt {n}: {path}", path)] if path.exists() else []
    files = rank_logs(log_dir).get(rank, {})
    return [Source(f"attempt {n}, rank {rank}, {kind}: {path}", path) for kind, path in files.items()]


class Printer:
    """Writes what the sources hold, with a `==> label <==` header whenever the output switches files."""

    def __init__(self, out: TextIO):
        self.out, self.last = out, None

    def emit(self, source: Source, header: bool = False) -> None:
        text = source.read()
        if (text or header) and source is not self.last:
            self.out.write(f"==> {source.label} <==\n")
            self.last = source
        if text:
            self.out.write(text)
        self.out.flush()


def show(found: list[Source], out: TextIO | None = None) -> None:
    printer = Printer(out or sys.stdout)
    for s in found:
        printer.emit(s, header=True)  # an empty stderr still gets its header: it says "nothing here"


def follow(
    run: RunDir, n: int, found: list[Source], rank: int | None, newest: bool, alive: Callable[[], bool],
    out: TextIO | None = None, poll: float = POLL,
) -> None:  # fmt: skip
    """Print, then keep printing what is appended until `alive()` says the run's supervisor is gone. Following the
    newest attempt (`newest`), move on to each newer attempt's files as they appear."""
    printer = Printer(out or sys.stdout)
    for s in found:
        printer.emit(s, header=True)
    while True:
        running = alive()  # asked before the last read, so nothing written before the end is missed
        if newest and (later := [k for k in run.attempt_dirs() if k > n]):
            for s in found:  # the old attempt's last words first
                printer.emit(s)
            n, found = max(later), []
        if not found:  # a new attempt's files appear when torchrun (or the rank's worker) starts
            found = sources(n, run.attempt_dirs().get(n, run.attempt(n)), rank)
        for s in found:
            printer.emit(s)
        if not running:
            return
        time.sleep(poll)
