"""Command-line overrides for a config dataclass: `--key=value`, `--key value`, dashes or underscores.

Values are parsed and type-checked against the field's type; unknown keys and bad values raise ConfigError with
a one-line message that names the key (and the closest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A bad command-line setting; the message is one line meant for the user."""


class HelpRequested(Exception):
    """-h or --help: the message is the help text (print it and exit 0)."""


def convert(key: str, raw: str, typ: type) -> Any:
    """`raw` as a value of type `typ` (bool, int, float; anything else stays a string), else ConfigError."""
    if typ is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{key}: expected True or False, got {raw!r}")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            try:  # accept 1e6 or 2_000 style integers, but not 2.5
                as_float = float(raw)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"--{key}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            return finite_float(raw)
        except ConfigError as e:
            raise ConfigError(f"--{key}: {e}") from None
    return raw


def finite_float(raw: str) -> float:
    """`raw` as a finite float, else ConfigError. float() also reads nan and inf, which pass every range check
    (nan compares false both ways) and then break a run late; no setting of ours means anything with them. The
    trainer's settings and the supervisor's float options are both read here."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {raw!r} (nan and infinity are not allowed)")
    return value


def parse_args(defaults: T, argv: list[str]) -> tuple[T, dict[str, Any]]:
    """Apply argv overrides to a config dataclass; return (new config, {key: value} of what was set)."""
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    hints = typing.get_type_hints(type(defaults))
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":  # torchrun passes the separator through; it means nothing here
            continue
        if arg in ("-h", "--help"):
            raise HelpRequested(settings_help(defaults))
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: settings look like --key=value (e.g. --depth=4)")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            key, raw = body, None
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; valid settings: {', '.join(fields)}"
            raise ConfigError(f"unknown setting --{key}{hint}")
        typ = hints[key]
        if raw is None:
            if i < len(argv) and not argv[i].startswith("--"):
                raw = argv[i]
                i += 1
            elif typ is bool:
                raw = "True"  # a bare --flag switches a boolean on
            else:
                raise ConfigError(f"--{key} needs a value, e.g. --{key}={getattr(defaults, key)!r}")
        overrides[key] = convert(key, raw, typ)
    return dataclasses.replace(defaults, **overrides), overrides


def settings_help(defaults: Any) -> str:
    """Every setting with its default and meaning, grouped as in the dataclass: its source comments are the help
    (a `# group` line starts a group, a trailing comment explains its field), so they cannot drift apart."""
    fields = {f.name for f in dataclasses.fields(defaults)}
    out = [f"settings of {type(defaults).__name__} (--key=value, --key value or --dashed-key; defaults shown):"]
    shown: set[str] = set()
    # a phase's config subclasses the shared one: the shared settings first, then the phase's own
    for cls in reversed([c for c in type(defaults).__mro__ if dataclasses.is_dataclass(c)]):
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("def ") or text.startswith("@"):
                break
            if text.startswith("# "):
                out.append(f"\n{text[2:]}")
            elif (name := text.split(":", 1)[0]) in fields and name not in shown:
                shown.add(name)
                meaning = text.split("  # ", 1)[1] if "  # " in text else ""
                out.append((f"  --{name}={getattr(defaults, name)!r}".ljust(40) + f" {meaning}").rstrip())
    return "\n".join(out)


def describe(cfg: Any) -> str:
    """One `key = value` line per field, for the log."""
    return "\n".join(f"  {f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))
