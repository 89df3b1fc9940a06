"""How a host's failure reads in its row or record."""

from __future__ import annotations

from configs.secrets import SecretError, redact
from connectors.base import ConnectorError
from tasks.patching.reboot_gate import RebootFailed


def error_text(exc: BaseException) -> str:
    """An error for a row or a record: the message without its type where the type says nothing."""
    if isinstance(exc, ConnectorError):
        return redact(exc.message)
    if isinstance(exc, (ValueError, SecretError, RebootFailed)):
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")
