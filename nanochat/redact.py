"""Credentials in URLs (s3://KEY:SECRET@bucket/..., https://host/x?sig=...) never written anywhere: not in a meta, a
log, the event log, a message, nor torchrun's command line (`ps` shows it to every user of the machine).

`redact` is the one form a URL is shown or recorded in. The real --remote_dir reaches the trainer through the
environment instead (ENV, which only the user and root can read): the supervisor passes the redacted form on the
command line and the real one in ENV, and the trainer's `reveal` maps the one back to the other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from nanochat.config import ConfigError

ENV = "NANOCHAT_REMOTE_DIR"  # the real --remote_dir, when the command line carries its redacted form
MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*")
# query parameters that carry a credential: S3/GCS presigned URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, X-Goog-Signature), Azure SAS (sig), and the usual token, key, password names
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&;#]*(?:token|sig|secret|passw|pwd|key|credential|auth)[^=&;#]*=)[^&;#]*")


def redact(text: str) -> str:
    """`text` with every URL's user info (user:password@) and secret-looking query values replaced by ***."""
    return _URL.sub(_redact_url, text)


def _redact_url(match: re.Match) -> str:
    scheme, rest = match.group(0).split("://", 1)
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, tail = rest[:cut], rest[cut:]
    user, at, after = head.rpartition("@")
    # user info: up to the last @, as urllib reads it; also a password with an unescaped "/" (AWS secret keys have
    # them), which urllib would misread but which is a secret all the same. Not a path's @ (s3://bucket/a@b).
    if at and user and not user.startswith("/") and ("/" not in user or ":" in user):
        head = f"{MASK}@{after}"
    return f"{scheme}://{head}" + _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, tail)


def reveal(shown: str, env: Mapping[str, str] = os.environ) -> str:
    """The real URL behind a --remote_dir setting: ENV's URL when `shown` is its redacted form, else `shown`. A
    redacted `shown` without its real URL is a ConfigError (the secret is not there to use)."""
    real = env.get(ENV, "")
    if real and redact(real) == shown:
        return real
    if MASK in shown and redact(shown.replace(MASK, "x")) == shown:  # the mask sits where redact puts it
        raise ConfigError(
            f"--remote_dir={shown} has its credentials redacted: pass the real URL, or set {ENV} to it"
            " (nanochat-run does)"
        )
    return shown


__all__ = ["ENV", "MASK", "redact", "reveal"]
