"""Progress of backups and restores, reported to whoever listens (the CLI's progress bars).

Engines run inside Prefect tasks, whose parameters must stay plain data, so a listener is
installed process-wide rather than passed down; with none installed reports cost nothing.
"""

from __future__ import annotations

import threading
from typing import Protocol


class ProgressSink(Protocol):
    def add_total(self, what: str, nbytes: int) -> None:
        """More work of kind `what` ("scanned", "uploaded", "restored", "verified") is known."""

    def advance(self, what: str, nbytes: int) -> None:
        """nbytes of kind `what` are done."""


class _Silent:
    def add_total(self, what: str, nbytes: int) -> None:
        pass

    def advance(self, what: str, nbytes: int) -> None:
        pass


_lock = threading.Lock()
_sink: ProgressSink = _Silent()


def install(sink: ProgressSink | None) -> None:
    global _sink
    with _lock:
        _sink = sink if sink is not None else _Silent()


def current() -> ProgressSink:
    return _sink
