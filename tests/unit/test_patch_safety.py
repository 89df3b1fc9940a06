"""The safety net's pure parts: outages from probe observations, clock readings, notice answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tasks.patching.safety.unavailability import Observation, measure

EPOCH = datetime(2026, 12, 2, tzinfo=timezone.utc)


def _measure(observations: list[Observation], interval: float = 1.0):
    return measure(observations, interval=interval, probe="ssh connect", update_domain=2,
                   wall_at=lambda mono: EPOCH + timedelta(seconds=mono))


def _probes(states: str, interval: float = 1.0, took: float = 0.1) -> list[Observation]:
    """One probe per interval; '+' passed, '-' failed."""
    return [Observation(i * interval, i * interval + took, mark == "+", "" if mark == "+" else "refused")
            for i, mark in enumerate(states)]


def test_a_host_that_never_failed_was_unavailable_zero_seconds_to_within_the_interval() -> None:
    measured = _measure(_probes("+++++"))
    assert (measured.seconds, measured.outages, measured.resolution_seconds, measured.probes) == (0.0, [], 1.0, 5)
    assert measured.text() == "0.0 s ±1 s (ssh connect)"


def test_an_outage_runs_from_the_first_failure_seen_to_the_start_of_the_first_pass() -> None:
    measured = _measure(_probes("++---++-+"))
    first, second = measured.outages
    # Failure seen at 2.1 (end of the probe at 2.0); the probe started at 5.0 passed.
    assert first.started_at == EPOCH + timedelta(seconds=2.1) and first.seconds == 5.0 - 2.1 and first.recovered
    assert second.seconds == 8.0 - 7.1 and measured.seconds == first.seconds + second.seconds
    assert measured.update_domain == 2 and measured.resolution_seconds == 1.0


def test_a_host_still_failing_when_probing_ended_is_reported_down() -> None:
    measured = _measure(_probes("+--"))
    [outage] = measured.outages
    assert not outage.recovered and outage.seconds == 2.1 - 1.1 and outage.detail == "refused"
    assert "still down when probing ended" in measured.text()


def test_a_probe_that_outlasted_the_interval_widens_the_stated_resolution() -> None:
    observations = [Observation(0.0, 0.1, True), Observation(1.0, 4.0, False, "timed out"),
                    Observation(4.0, 4.1, False, "refused"), Observation(6.5, 6.6, True)]
    measured = _measure(observations)
    # Edges: 4.0 - 0.1 before the outage, 6.5 - 4.1 after it.
    assert measured.resolution_seconds == 3.9 and measured.seconds == 6.5 - 4.0
