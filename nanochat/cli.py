"""Tiny helpers that give every command line tool the same error behaviour.

Bad input must end a CLI with one line on stderr that names the problem and the fix, a non-zero exit
code and no traceback; bugs (any other exception) still raise with a full traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class ArgParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (argparse prints the usage block first by default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(err: BaseException) -> str:
    """The exception's message with all whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(err).split()) or type(err).__name__


def run_main(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    expected: tuple[type[BaseException], ...] = (ValueError, OSError),
) -> NoReturn:
    """Run main(argv) and exit: expected errors become `error: <message>` on stderr with exit code 1."""
    try:
        code = main(argv)
    except expected as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
