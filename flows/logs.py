"""structlog, configured once: through the standard library so Prefect run logs (and the UI)
show the events, as JSON lines or console output on the CLI, with secrets redacted."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from configs.secrets import redact

LOGGER_NAME = "patchdrill"
_configured = False


def _redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact(str(value))
    return event


class RedactingFilter(logging.Filter):
    """Redacts secrets in records that bypass structlog (Prefect's own, libraries')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def configure(json: bool = False, level: int = logging.INFO) -> None:
    """Set up structlog and the 'patchdrill' stdlib logger. Safe to call more than once."""
    global _configured
    # Prefect attaches its run-log handler to loggers named here; the level must be set too,
    # or INFO events never reach the UI.
    extra = os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    if LOGGER_NAME not in extra.split(","):
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(filter(None, [extra, LOGGER_NAME]))
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if _configured:
        return
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processor=renderer, foreign_pre_chain=[structlog.processors.TimeStamper(fmt="iso")]))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso"),
            _redact_event,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True
