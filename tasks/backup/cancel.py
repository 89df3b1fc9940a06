"""Stopping a backup or restore part-way: one process-wide stop token, and the signals that set it.

The engines' worker loops call `check()` between blocks, so a stop takes effect within one
block per worker: no recovery point is written, and every `finally` on the way out still runs
(the repository lock is released, the snapshot removed, a restore's temporary file deleted).

Who sets it: SIGINT (Ctrl-C) and SIGTERM, caught by `stop_on_signals()`. That covers the
`patchdrill` command and a Prefect cancellation alike, because a runner (`serve()`, a process
worker) cancels a flow run by sending its process SIGTERM. Prefect's own SIGTERM handler would
raise in the flow's main thread and leave the task threads uploading until they wrote their
points; this one stops them instead, and the flow reports itself Cancelled. A second signal
exits at once (after the registered `on_hard_exit` callbacks, e.g. ending the temporary Prefect
API server); what that leaves behind is what a killed run leaves, and the next run copes.

Like progress.py, the token is process-wide rather than passed down: the engines run inside
Prefect tasks, whose parameters must stay plain data.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Callable, Iterator

from tasks.backup.errors import BackupError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BackupError):
    """The run was asked to stop (a signal, or a Prefect cancellation) and stopped cleanly."""


_stop = threading.Event()
# Reentrant: the signal handler takes it on the main thread, which may hold it already.
_lock = threading.RLock()
_reason: str | None = None
_signal: int | None = None
_hard_exit: list[Callable[[], None]] = []


def request(reason: str, signum: int | None = None) -> None:
    """Ask every engine loop in this process to stop at its next block."""
    global _reason, _signal
    with _lock:
        if _reason is None:
            _reason, _signal = reason, signum
    _stop.set()


def requested() -> str | None:
    """Why a stop was asked for, or None while the run may go on."""
    return _reason if _stop.is_set() else None


def signal_number() -> int | None:
    """The signal that asked for the stop, if one did."""
    return _signal if _stop.is_set() else None


def exit_code() -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 for
    SIGINT, 143 for SIGTERM); 1 for a stop that no signal asked for."""
    number = signal_number()
    return 128 + number if number is not None else 1


def check() -> None:
    """Raise Interrupted if a stop was asked for."""
    if _stop.is_set():
        raise Interrupted(_reason or "interrupted")


def wait(seconds: float) -> bool:
    """Sleep up to seconds, waking early for a stop; True if a stop was asked for."""
    return _stop.wait(seconds)


def reset() -> None:
    global _reason, _signal
    with _lock:
        _reason, _signal = None, None
        _stop.clear()


@contextlib.contextmanager
def on_hard_exit(callback: Callable[[], None]) -> Iterator[None]:
    """Run callback (quick, best effort) before a second signal ends the process. Like the
    handlers, it stays registered for the process's remaining life once a stop was asked for."""
    _hard_exit.append(callback)
    try:
        yield
    finally:
        if not _stop.is_set():
            _hard_exit.remove(callback)


def _say(message: str) -> None:
    # os.write, not print or logging: a handler runs between two bytecodes of the main thread,
    # which may itself be inside a write to stderr or hold a logging lock.
    with contextlib.suppress(OSError):
        os.write(2, f"\n{message}\n".encode())


def _handle(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _stop.is_set():
        _say(f"{name} again: exiting at once")
        for callback in list(_hard_exit):
            with contextlib.suppress(Exception):
                callback()
        os._exit(128 + signum)
    request(f"interrupted by {name}", signum)
    _say(f"{name}: stopping cleanly at the next block; send it again to exit at once")


def _ours() -> bool:
    return signal.getsignal(signal.SIGINT) is _handle


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM ask for a stop while the block runs; a second one exits at once.

    Only the main thread can own signals; elsewhere this changes nothing. Nested uses share one
    token: the outermost starts it afresh. Once a stop was asked for, the handlers stay for the
    rest of the process's life, which is its way out: a signal during teardown still exits at
    once instead of landing on a default handler mid-cleanup.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = not _ours()
    if outermost:
        reset()
    previous = {number: signal.signal(number, _handle) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        if not _stop.is_set() or not outermost:
            for number, handler in previous.items():
                # None: a handler installed from outside Python, which cannot be put back.
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)
