"""The rollout planner and state machine: update domains, concurrency, failure budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.policies import Quota
from tasks.patching.plan.rollout import Rollout, RolloutHost, plan


def hosts_in(*domains: int) -> list[RolloutHost]:
    return [RolloutHost(name=f"h{i}", update_domain=d) for i, d in enumerate(domains)]


def test_plan_batches_by_domain_in_order() -> None:
    hosts = hosts_in(1, 0, 1, 0, 1, 2)
    p = plan(hosts, Quota.parse(2), Quota.parse(0))
    assert [(b.update_domain, b.hosts) for b in p.batches] == [
        (0, ["h1", "h3"]), (1, ["h0", "h2"]), (1, ["h4"]), (2, ["h5"]),
    ]
    assert [b.index for b in p.batches] == [1, 2, 3, 4]


def test_percent_concurrency_is_a_share_of_each_domain_at_least_one() -> None:
    p = plan(hosts_in(*[0] * 8, 1), Quota.parse("25%"), Quota.parse("50%"))
    assert p.concurrency == {0: 2, 1: 1}
    assert p.allowed_failures == 4


def test_hosts_outside_their_window_are_skipped_with_the_reason() -> None:
    hosts = [RolloutHost("a", 0), RolloutHost("b", 0, in_window=False, window="closed; opens 2026-06-15T01:00+00:00 UTC")]
    p = plan(hosts, Quota.parse(5), Quota.parse(0))
    assert p.scheduled == ["a"]
    assert p.skipped == {"b": "outside its maintenance window (closed; opens 2026-06-15T01:00+00:00 UTC)"}
    assert "b: outside its maintenance window" in p.as_text()


def test_plan_text_and_json_for_dry_run() -> None:
    hosts = [RolloutHost("web1", 0, window="open until …", expects_reboot=True), RolloutHost("db1", 1)]
    p = plan(hosts, Quota.parse(1), Quota.parse(0))
    text = p.as_text()
    assert "batch 1  update domain 0  web1  (reboot: web1)" in text
    assert "batch 2  update domain 1  db1" in text
    assert "stops after 1 failure(s)" in text
    assert type(p).model_validate_json(p.model_dump_json()) == p


def test_duplicate_host_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="'x' appears twice"):
        plan([RolloutHost("x", 0), RolloutHost("x", 1)], Quota.parse(1), Quota.parse(0))


def test_budget_stops_new_batches_while_in_flight_hosts_finish() -> None:
    rollout = Rollout(plan(hosts_in(0, 0, 1, 1), Quota.parse(2), Quota.parse(0)))
    first = rollout.next_batch()
    assert first is not None and first.hosts == ["h0", "h1"]
    rollout.record("h0", False, "health probe tcp/443 failed")
    assert rollout.budget_exceeded and not rollout.finished
    with pytest.raises(RuntimeError, match="still running \\(h1\\)"):
        rollout.next_batch()
    rollout.record("h1", True)
    assert rollout.finished
    assert rollout.next_batch() is None
    assert rollout.not_started == ["h2", "h3"]
    assert rollout.failed == {"h0": "health probe tcp/443 failed"}
    assert "exceed the budget of 0" in (rollout.stop_reason or "")


def test_a_stop_lets_the_running_batch_finish_and_starts_no_other() -> None:
    rollout = Rollout(plan(hosts_in(0, 1, 2), Quota.parse(1), Quota.parse(5)))
    first = rollout.next_batch()
    assert first is not None and first.hosts == ["h0"]
    rollout.stop("cancelled in Prefect")
    rollout.stop("interrupted by SIGINT")  # the first reason stands
    assert not rollout.finished  # h0 is still in flight
    rollout.record("h0", True)
    assert rollout.finished and rollout.next_batch() is None
    assert rollout.not_started == ["h1", "h2"]
    assert rollout.stop_reason == "cancelled in Prefect: no new batch was started"


def test_recording_a_host_not_in_flight_is_an_error() -> None:
    rollout = Rollout(plan(hosts_in(0), Quota.parse(1), Quota.parse(0)))
    with pytest.raises(ValueError, match="'h0' is not in flight"):
        rollout.record("h0", True)


host_lists = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4), st.booleans()), min_size=0, max_size=30,
).map(lambda rows: [RolloutHost(f"h{i}", d, in_window=w) for i, (d, w) in enumerate(rows)])
quotas = st.one_of(st.integers(min_value=0, max_value=10).map(Quota.parse),
                   st.integers(min_value=1, max_value=100).map(lambda p: Quota.parse(f"{p}%")))


@settings(max_examples=200)
@given(host_lists, quotas, quotas, st.randoms(use_true_random=False), st.floats(min_value=0, max_value=1))
def test_rollout_invariants(hosts: list[RolloutHost], concurrency: Quota, errors: Quota, rng: random.Random,
                            failure_rate: float) -> None:
    """Drive the state machine with random outcomes recorded in random order."""
    rollout = Rollout(plan(hosts, concurrency, errors))
    domain_of = {h.name: h.update_domain for h in hosts}
    domain_size = {d: sum(1 for h in hosts if h.in_window and h.update_domain == d) for d in domain_of.values()}
    started: list[str] = []
    domains_done: set[int] = set()
    last_domain: int | None = None
    while (batch := rollout.next_batch()) is not None:
        in_flight_domains = {domain_of[h] for h in rollout.in_flight}
        assert in_flight_domains == {batch.update_domain}, "two update domains in flight"
        assert 1 <= len(batch.hosts) <= max(1, concurrency.of(domain_size[batch.update_domain]))
        assert batch.update_domain not in domains_done, "an update domain was revisited"
        if last_domain is not None and last_domain != batch.update_domain:
            domains_done.add(last_domain)
        last_domain = batch.update_domain
        started.extend(batch.hosts)
        failures_before = len(rollout.failed)
        assert failures_before <= rollout.plan.allowed_failures, "a batch started over budget"
        for host in rng.sample(batch.hosts, len(batch.hosts)):
            rollout.record(host, rng.random() >= failure_rate)
    assert rollout.finished and not rollout.in_flight
    assert len(started) == len(set(started)), "a host was scheduled twice"
    in_window = {h.name for h in hosts if h.in_window}
    assert set(started) <= in_window, "a host outside its window was scheduled"
    assert set(started) | set(rollout.not_started) == in_window
    if rollout.not_started:
        assert rollout.budget_exceeded
    assert len(rollout.succeeded) + len(rollout.failed) == len(started)
