"""Resolve credential references and remember every resolved value so it can be redacted.

A reference is `env:NAME`, `file:PATH` or `prefect-secret:BLOCK`. Whatever a reference
resolves to is added to a process-wide redaction set that the logging pipeline, artifacts and
error messages pass their text through (`redact`).

SAS tokens are redacted by their shape instead: a backup signs one per uploaded block, tens of
thousands a run, and a set that grew with each would make every later `redact` slower.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from pathlib import Path

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"
#: The validation context key under which the loader passes the config file's directory, so
#: credential references can be resolved while validating (relative `file:` paths need it).
REFERENCES_FROM = "references_from"

# A SAS token is a query string (a URL's, or a connection string's SharedAccessSignature=…)
# whose `sig` field signs the others. The whole query is masked, not only `sig`: the other
# fields are harmless alone, but with the signature they make a working credential.
_QUERY_VALUE = r"[^&\s'\"#;<>]*"
_SAS_QUERY = re.compile(rf"(?i)(?:[\w-]+={_QUERY_VALUE}&)*(?<![\w-])sig=[^&\s'\"#;<>]+(?:&[\w-]+={_QUERY_VALUE})*")


class SecretError(Exception):
    """A reference could not be resolved; the message names the reference, never a value."""


_REFERENCE_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    # POSIX's portable variable names; a space or a second word is never part of a name.
    "env": (re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
            "an environment variable name (letters, digits and _, not starting with a digit)"),
    # Any path, but one line of it, with no surrounding spaces a copy-paste could have added.
    "file": (re.compile(r"[^\x00-\x1f\x7f\s](?:[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f\s])?"),
             "a file path on one line, without leading or trailing spaces"),
    # Prefect's own rule for block document names.
    "prefect-secret": (re.compile(r"[a-z0-9-]+"), "a Prefect block name (lowercase letters, digits and -)"),
}


def parse_reference(value: str) -> tuple[str, str]:
    """Split a reference into (scheme, rest), or raise ValueError saying what is wrong with it.

    The message never repeats the value: a literal secret pasted by mistake must not reach an
    error line.
    """
    scheme, colon, rest = value.partition(":")
    rule = _REFERENCE_RULES.get(scheme) if colon else None
    if rule is None:
        raise ValueError(
            "must be a reference, not a literal: write 'env:VARIABLE', 'file:/path/to/secret' "
            "or 'prefect-secret:block-name' and keep the secret itself out of this file"
        )
    pattern, expected = rule
    if not pattern.fullmatch(rest):
        raise ValueError(f"'{scheme}:' must be followed by {expected}")
    return scheme, rest


def check_reference(value: str | None, what: str) -> str | None:
    """A config field that holds a secret must hold a well-formed reference to it, never the secret."""
    if value is None:
        return None
    try:
        parse_reference(value)
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from None
    return value


def remember(value: str) -> str:
    """Register a secret value for redaction and return it unchanged."""
    if value and len(value) >= 3:
        with _lock:
            _secrets.add(value)
    return value


def redact(text: str) -> str:
    """Replace every known secret and every SAS token in text by ***."""
    if not text:
        return text
    if _secrets:
        with _lock:
            known = sorted(_secrets, key=len, reverse=True)
        for secret in known:
            if secret in text:
                text = text.replace(secret, MASK)
    if "sig=" in text.lower():
        text = _SAS_QUERY.sub(MASK, text)
    return text


def remembered_count() -> int:
    """How many values redact() compares text with (SAS tokens are matched by shape, not kept)."""
    with _lock:
        return len(_secrets)


def resolve(reference: str, *, base_dir: Path | None = None) -> str:
    """Turn a credential reference into its value (and register it for redaction)."""
    try:
        scheme, rest = parse_reference(reference)
    except ValueError as exc:
        raise SecretError(f"not a credential reference: the value {exc}") from None
    if scheme == "env":
        value = os.environ.get(rest)
        if value is None:
            raise SecretError(f"environment variable {rest!r} (from {reference!r}) is not set")
    elif scheme == "file":
        path = Path(rest).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"cannot read secret file {str(path)!r} (from {reference!r}): {exc.strerror}") from None
    elif scheme == "prefect-secret":
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(rest).get()
        except Exception as exc:  # noqa: BLE001 - Prefect raises several kinds; the message is what matters
            raise SecretError(f"cannot load Prefect Secret block {rest!r}: {type(exc).__name__}") from None
        value = str(value)
    return remember(value)


def is_loopback(host: str) -> bool:
    """Whether a URL's host is this machine: what is sent there never crosses a network, so a
    credential in it may travel over plain http."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
