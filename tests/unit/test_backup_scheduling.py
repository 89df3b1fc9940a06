"""run_bounded with real threads: bounds on hosts and per-host items, and staggered host starts."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from tasks.backup.scheduling import Bounds, run_bounded


def _first_done(futures: list[Future[None]]) -> Future[None]:
    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return next(iter(done))


def test_bounds_are_never_exceeded_and_everything_runs() -> None:
    lock = threading.Lock()
    running: dict[str, int] = {}
    peaks = {"hosts": 0, "per_host": 0}
    release = threading.Semaphore(0)

    def job(host: str) -> None:
        with lock:
            running[host] = running.get(host, 0) + 1
            peaks["hosts"] = max(peaks["hosts"], sum(1 for n in running.values() if n))
            peaks["per_host"] = max(peaks["per_host"], running[host])
        release.acquire(timeout=0.01)  # hold briefly so overlaps are possible
        with lock:
            running[host] -= 1

    work = [(f"h{i}", [f"d{j}" for j in range(3)]) for i in range(5)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        finished = run_bounded(work, Bounds(max_hosts=2, max_per_host=2), lambda h, d: pool.submit(job, h), _first_done)
    assert sorted((h, d) for h, d, _ in finished) == sorted((h, d) for h, ds in work for d in ds)
    assert all(f.exception() is None for _, _, f in finished)
    assert peaks["hosts"] <= 2 and peaks["per_host"] <= 2


def test_host_starts_are_staggered() -> None:
    now = [100.0]
    sleeps: list[float] = []
    starts: dict[str, float] = {}

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    def submit(host: str, item: str) -> Future[None]:
        starts.setdefault(host, now[0])
        done: Future[None] = Future()
        done.set_result(None)
        return done

    run_bounded([("a", ["x"]), ("b", ["x"]), ("c", ["x", "y"])], Bounds(max_hosts=3, stagger_seconds=30),
                submit, lambda fs: fs[0], sleep=sleep, clock=lambda: now[0])
    assert starts == {"a": 100.0, "b": 130.0, "c": 160.0}
    assert sleeps == [30.0, 30.0]


def test_a_single_host_runs_all_its_items() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        finished = run_bounded([("only", ["a", "b", "c"])], Bounds(max_hosts=1, max_per_host=2),
                               lambda h, d: pool.submit(lambda: d), _first_done)
    assert sorted(f.result() for _, _, f in finished) == ["a", "b", "c"]
