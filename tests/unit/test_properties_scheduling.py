"""Property tests of the bounded scheduler (`run_bounded`): whatever order work finishes in,
never more hosts or items per host at once than the bounds, every item run exactly once,
hosts started in order and at least the stagger apart, and nothing started after a stop.

The futures are plain tokens and the clock is a counter that only `sleep` and finishing work
move: the order of completions is what hypothesis varies, not wall-clock timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.backup.scheduling import Bounds, run_bounded

QUICK = settings(max_examples=80, deadline=None)
#: Loop turns after which the scheduler counts as spinning (a few per submit suffice).
SPIN_LIMIT = 10_000


class Spinning(Exception):
    pass


@dataclass
class FakeRun:
    """Records what run_bounded does and checks the bounds at every submit."""

    bounds: Bounds
    #: Picks which running item finishes next and how long it took; None: the oldest, at once.
    draw: st.DrawFn | None = None
    stop_after: int | None = None
    now: float = 0.0
    running: dict[int, tuple[str, int]] = field(default_factory=dict)
    submitted: list[tuple[str, int]] = field(default_factory=list)
    first_start: dict[str, float] = field(default_factory=dict)
    stop_seen: bool = False
    turns: int = 0

    def submit(self, host: str, item: int) -> int:
        assert not self.stop_seen, f"{host}/{item} started after the stop"
        token = len(self.submitted)
        self.submitted.append((host, item))
        self.running[token] = (host, item)
        self.first_start.setdefault(host, self.now)
        per_host = sum(1 for h, _ in self.running.values() if h == host)
        hosts = {h for h, _ in self.running.values()}
        assert per_host <= self.bounds.max_per_host, f"{per_host} items of {host} at once"
        assert len(hosts) <= self.bounds.max_hosts, f"{len(hosts)} hosts at once"
        return token

    def wait_one(self, futures: list[int]) -> int:
        assert futures and set(futures) <= set(self.running)
        if self.draw is None:
            done = min(futures)
        else:
            done = self.draw(st.sampled_from(sorted(futures)))
            self.now += self.draw(st.sampled_from((0.0, 0.5, 7.0)))
        del self.running[done]
        return done

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def stopped(self) -> bool:
        self.turns += 1
        if self.turns > SPIN_LIMIT:
            raise Spinning(f"no progress after {SPIN_LIMIT} turns")
        self.stop_seen = self.stop_seen or (self.stop_after is not None and len(self.submitted) >= self.stop_after)
        return self.stop_seen


bounds = st.builds(Bounds, max_hosts=st.integers(1, 4), max_per_host=st.integers(1, 3),
                   stagger_seconds=st.sampled_from((0.0, 0.0, 1.0, 30.0)))
#: Hosts in order, each with at least one item (the backup flow leaves out hosts with no disks).
works = st.integers(1, 6).flatmap(lambda n: st.lists(st.integers(1, 4), min_size=n, max_size=n)).map(
    lambda counts: [(f"h{i}", list(range(count))) for i, count in enumerate(counts)])


def _run(work: list[tuple[str, list[int]]], fake: FakeRun) -> list[tuple[str, int, int]]:
    return run_bounded(work, fake.bounds, fake.submit, fake.wait_one, sleep=fake.sleep, clock=fake.clock,
                       stopped=fake.stopped)


@QUICK
@given(works, bounds, st.data())
def test_every_item_runs_once_within_the_bounds_and_the_stagger(
        work: list[tuple[str, list[int]]], limits: Bounds, data: st.DataObject) -> None:
    fake = FakeRun(limits, data.draw)
    finished = _run(work, fake)

    expected = sorted((host, item) for host, items in work for item in items)
    assert sorted(fake.submitted) == expected and len(set(fake.submitted)) == len(expected)
    assert sorted((host, item) for host, item, _ in finished) == expected
    assert sorted(token for _, _, token in finished) == list(range(len(expected))) and not fake.running
    # Hosts start in the order given (dicts keep insertion order), each at least the stagger after the last.
    assert list(fake.first_start) == [host for host, _ in work]
    starts = list(fake.first_start.values())
    assert all(later - earlier >= limits.stagger_seconds for earlier, later in zip(starts, starts[1:]))


@QUICK
@given(works, bounds, st.integers(0, 8), st.data())
def test_nothing_starts_after_a_stop_and_what_started_is_waited_for(
        work: list[tuple[str, list[int]]], limits: Bounds, stop_after: int, data: st.DataObject) -> None:
    fake = FakeRun(limits, data.draw, stop_after=stop_after)
    finished = _run(work, fake)

    total = sum(len(items) for _, items in work)
    # FakeRun.submit fails the run if anything starts once stopped() said so.
    assert len(fake.submitted) == total or fake.stop_seen
    assert len(fake.submitted) >= min(stop_after, total)
    # Whatever started is in the result and done; nothing else is.
    assert sorted((host, item) for host, item, _ in finished) == sorted(fake.submitted) and not fake.running


def test_a_host_without_items_does_not_hold_a_host_slot() -> None:
    fake = FakeRun(Bounds(max_hosts=1))
    finished = _run([("empty", []), ("h1", [0])], fake)  # type: ignore[list-item]
    assert [(host, item) for host, item, _ in finished] == [("h1", 0)]
