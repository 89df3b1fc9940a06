"""The safety net's pure parts: outages from probe observations, clock readings, notice answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from configs.patch_safety import ClockCheck
from tasks.patching.safety.clock import ClockUnreadable, after_what, judge, parse_linux_sync, parse_windows_sync
from tasks.patching.safety.records import TimeSync
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


# --------------------------------------------------------------------------- the clock


def test_chrony_running_and_synchronised_is_read_from_its_tools() -> None:
    sync = parse_linux_sync("unit.chrony=active\nunit.systemd-timesyncd=inactive\nchrony.leap=Normal\n"
                            "timedatectl.synchronized=yes\n")
    assert (sync.service, sync.active, sync.synchronized) == ("chrony", True, True)


def test_timesyncd_without_chrony_is_judged_by_timedatectl() -> None:
    sync = parse_linux_sync("unit.chrony=inactive\nunit.systemd-timesyncd=active\ntimedatectl.synchronized=no\n")
    assert (sync.service, sync.active, sync.synchronized) == ("systemd-timesyncd", True, False)


def test_a_host_with_no_time_service_says_none_and_unknown() -> None:
    sync = parse_linux_sync("timedatectl.synchronized=\n")
    assert (sync.service, sync.active, sync.synchronized) == ("none", False, None)


def test_w32time_following_a_server_is_synchronised_and_the_cmos_clock_is_not() -> None:
    good = parse_windows_sync('{"service":"w32time","status":"Running","source":"time.windows.com,0x9",'
                              '"last_sync":"12/2/2026 3:04:05 AM"}')
    free = parse_windows_sync('{"service":"w32time","status":"Running","source":"Local CMOS Clock",'
                              '"last_sync":"unspecified"}')
    stopped = parse_windows_sync('{"service":"w32time","status":"Stopped","source":"","last_sync":""}')
    assert (good.active, good.synchronized) == (True, True)
    assert (free.active, free.synchronized) == (True, False)
    assert (stopped.active, stopped.synchronized) == (False, None)
    with pytest.raises(ClockUnreadable, match="not JSON"):
        parse_windows_sync("Get-Service : access denied")


def test_only_a_skew_beyond_the_limit_by_more_than_its_uncertainty_fails() -> None:
    check = ClockCheck(max_skew_seconds=2)
    synced = TimeSync(service="chrony", active=True, synchronized=True)
    assert judge(2.4, 0.5, synced, check) == ""  # could be 1.9 s: not known to be beyond
    assert judge(-2.6, 0.5, synced, check) == ("clock 2.600 s behind the controller's (±0.500 s), "
                                               "beyond the limit of 2 s")
    unsynced = TimeSync(service="none")
    assert judge(0.0, 0.0, unsynced, check) == ""
    assert judge(0.0, 0.0, unsynced, ClockCheck(require_sync=True)) == "time sync required: no time-sync service runs"


def test_the_check_says_what_it_followed() -> None:
    quiet = _measure(_probes("+++"))
    paused = _measure(_probes("+-+"))
    assert [after_what(True, quiet), after_what(False, paused), after_what(False, quiet), after_what(False, None)] == \
        ["reboot", "outage", "install", "install"]
