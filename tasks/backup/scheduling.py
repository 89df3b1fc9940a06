"""Start work per host within bounds: at most N hosts at once, M items per host, host starts
spaced by a stagger so a fleet does not hit storage all at the same second.

Generic over the future type so flows use it with Prefect futures and tests with plain ones.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, TypeVar

F = TypeVar("F", bound=Hashable)
H = TypeVar("H")
I = TypeVar("I")


def default_workers() -> int:
    """Threads per disk for hashing, compressing and uploading (they release the GIL): the CPU
    count, kept between 2 and 8."""
    return max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class Bounds:
    max_hosts: int = 4
    max_per_host: int = 2
    stagger_seconds: float = 0.0


@dataclass
class _Host(Generic[H, I]):
    host: H
    waiting: deque[I]
    running: int = 0


def run_bounded(work: Iterable[tuple[H, list[I]]], bounds: Bounds,
                submit: Callable[[H, I], F], wait_one: Callable[[list[F]], F],
                *, sleep: Callable[[float], object] = time.sleep,
                clock: Callable[[], float] = time.monotonic,
                stopped: Callable[[], bool] = lambda: False) -> list[tuple[H, I, F]]:
    """Submit every (host, item) respecting bounds; returns them with their futures, in
    completion order. wait_one blocks until one of the given futures is done and returns it.

    Once stopped() is true nothing more is submitted: the work already running is waited for
    (it stops on its own) and the items never started are left out of the result.
    """
    queue = deque(_Host(host, deque(items)) for host, items in work)
    active: list[_Host[H, I]] = []
    running: dict[F, tuple[_Host[H, I], I]] = {}
    finished: list[tuple[H, I, F]] = []
    last_start: float | None = None
    while queue or running or any(slot.waiting for slot in active):
        if stopped():
            queue.clear()
            for slot in active:
                slot.waiting.clear()
        for slot in active:
            while slot.waiting and slot.running < bounds.max_per_host:
                item = slot.waiting.popleft()
                running[submit(slot.host, item)] = (slot, item)
                slot.running += 1
        # A host with nothing waiting or running (none left, or none to begin with) frees its slot.
        active = [slot for slot in active if slot.waiting or slot.running]
        if queue and len(active) < bounds.max_hosts:
            if last_start is not None and bounds.stagger_seconds:
                pause = last_start + bounds.stagger_seconds - clock()
                if pause > 0:
                    sleep(pause)
                    continue  # the sleep may have been cut short by a stop: look again
            last_start = clock()
            active.append(queue.popleft())
            continue
        if not running:
            continue
        done = wait_one(list(running))
        slot, item = running.pop(done)
        slot.running -= 1
        finished.append((slot.host, item, done))
    return finished
