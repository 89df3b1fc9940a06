"""structlog, configured once: through the standard library so Prefect run logs (and the UI)
show the events, as JSON lines or console output on the CLI, with secrets redacted."""

from __future__ import annotations

import json as jsonlib
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any

import structlog

from configs.secrets import redact

LOGGER_NAME = "patchdrill"
#: tasks.alerts' logger (not imported: flows/logs.py loads before anything that logs)
ALERTS_LOGGER = f"{LOGGER_NAME}.alerts"
_configured = False
_json_lines = False
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


class _QuietAlerts(logging.Filter):
    """Keeps an alert's routine lines (raised, posted) off the console: a failed command already
    ends with its one error line, and those lines are in the run's log. Delivery problems
    (warnings) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(ALERTS_LOGGER)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the event (test capture, redirects)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def json_lines() -> bool:
    """Whether the console speaks JSON lines (--log-json): error lines follow suit."""
    return _json_lines


class JsonLinesHandler(logging.Handler):
    """Any logger's records as JSON lines on stderr, in the shape of patchdrill's own events
    (event, level, logger, timestamp): under --log-json, Prefect builds its console handlers from
    this class instead of its plain-text one (see `json_console_for_prefect`)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        # Prefect's logging config hands its console options (stream, styles) to whatever class
        # it builds; the stream is whatever sys.stderr is when a record arrives.
        super().__init__()
        self.addFilter(RedactingFilter())

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "event": record.getMessage(), "level": record.levelname.lower(), "logger": record.name,
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        if record.exc_info:
            fields["exception"] = redact(logging.Formatter().formatException(record.exc_info))
        return jsonlib.dumps(fields, default=str)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command; the stdlib way
            self.handleError(record)


def json_console_for_prefect() -> None:
    """Make every console line Prefect writes a JSON line too, in this process and in the
    temporary API server it starts.

    Prefect configures logging once, when it is first imported, from its logging.yml, whose
    entries environment variables override (PREFECT_LOGGING_<PATH>_<KEY>): pointing its
    console and debug handlers at JsonLinesHandler covers its own loggers, uvicorn's and the
    root logger, which Python's warnings join through captureWarnings. Must run before Prefect
    is imported; the CLI loads Prefect only when a flow runs.
    """
    handler = f"{__name__}.{JsonLinesHandler.__name__}"
    for name in ("CONSOLE", "DEBUG"):
        os.environ[f"PREFECT_LOGGING_HANDLERS_{name}_CLASS"] = handler
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(isinstance(h, JsonLinesHandler) for h in root.handlers):
        # Warnings and third-party records before Prefect is loaded (or without it) as well.
        root.addHandler(JsonLinesHandler())


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
    global _configured, _run_handler_attached, _json_lines
    logger = logging.getLogger(LOGGER_NAME)
    # The level must be set, or INFO events never reach Prefect's handler.
    logger.setLevel(level)
    if not _run_handler_attached and "prefect" in sys.modules:
        logger.addHandler(_run_log_handler())
        _run_handler_attached = True
    if _configured:
        return
    _json_lines = json
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
    handler.addFilter(_QuietAlerts())
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
