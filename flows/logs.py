"""structlog, configured once: through the standard library so Prefect run logs (and the UI)
show the events, as JSON lines or console output on the CLI, with secrets redacted."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from configs.secrets import redact

LOGGER_NAME = "patchdrill"
_configured = False
_run_handler_attached = False


def _redact_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, BaseException):
            event[key] = redact(str(value))
    return event


class RedactingFilter(logging.Filter):
    """Redacts secrets in stdlib records of the 'patchdrill' logger tree; set on each of our
    handlers (a logger's own filters do not see its children's records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args or isinstance(record.msg, str):
            record.msg = redact(record.getMessage())
            record.args = None
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the event (test capture, redirects)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _run_log_handler() -> logging.Handler:
    """A handler that ships events to the Prefect run's logs (so the UI shows them) when inside
    a run. Built on first use so commands that run no flow never import Prefect.

    Prefect's PREFECT_LOGGING_EXTRA_LOGGERS does the same, but only if set before Prefect
    configures logging, which a library cannot promise; outside a run (plain CLI use) the
    event stays on the console instead of raising a missing-context warning.
    """
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
                super().emit(record)

    handler = RunLogHandler()
    handler.addFilter(RedactingFilter())
    return handler


def configure(json: bool = False, level: int = logging.INFO) -> None:
    """Set up structlog and the 'patchdrill' stdlib logger. Safe to call more than once; every
    flow calls it, which attaches the Prefect run-log handler once Prefect is loaded.

    structlog renders each event to one string before the standard library sees it, so every
    handler (the console here, Prefect's run-log handler in a flow) gets the same plain text.
    """
    global _configured, _run_handler_attached
    logger = logging.getLogger(LOGGER_NAME)
    # The level must be set, or INFO events never reach Prefect's handler.
    logger.setLevel(level)
    if not _run_handler_attached and "prefect" in sys.modules:
        logger.addHandler(_run_log_handler())
        _run_handler_attached = True
    if _configured:
        return
    # Our own handlers render every event once; Prefect's console handler on the root logger
    # would print each a second time.
    logger.propagate = False
    renderer: Any = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True
