"""Maintenance windows in the host's own time zone: midnight crossings, DST days, next opening."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.models import HostConfig, MaintenanceWindow
from tasks.patching.plan.windows import describe, is_open, next_opening, remaining_minutes

NEW_YORK = ZoneInfo("America/New_York")
PARIS = ZoneInfo("Europe/Paris")
UTC = timezone.utc


def host(zone: str, *windows: MaintenanceWindow) -> HostConfig:
    return HostConfig(name="db1", transport="local", timezone=zone, maintenance_windows=list(windows))


def window(days: list[str], start: time, minutes: int) -> MaintenanceWindow:
    return MaintenanceWindow(days=days, start=start, duration_minutes=minutes)  # type: ignore[arg-type]


def test_window_crossing_midnight_belongs_to_the_day_it_opens() -> None:
    h = host("Europe/Paris", window(["sat"], time(22, 0), 240))
    assert not is_open(h, datetime(2026, 6, 13, 21, 59, tzinfo=PARIS))
    assert is_open(h, datetime(2026, 6, 13, 22, 0, tzinfo=PARIS))
    assert is_open(h, datetime(2026, 6, 14, 1, 30, tzinfo=PARIS))  # Sunday, still Saturday's window
    assert not is_open(h, datetime(2026, 6, 14, 2, 0, tzinfo=PARIS))
    assert not is_open(h, datetime(2026, 6, 14, 22, 30, tzinfo=PARIS))  # Sunday is not listed
    assert remaining_minutes(h, datetime(2026, 6, 14, 1, 0, tzinfo=PARIS)) == 60


def test_the_window_is_read_in_the_host_zone_whatever_zone_the_caller_uses() -> None:
    h = host("America/New_York", window(["mon"], time(9, 0), 60))
    assert is_open(h, datetime(2026, 6, 15, 13, 30, tzinfo=UTC))  # 09:30 EDT
    assert not is_open(h, datetime(2026, 6, 15, 9, 30, tzinfo=UTC))


def test_spring_forward_keeps_elapsed_duration() -> None:
    # 2026-03-08: New York clocks jump from 02:00 EST to 03:00 EDT.
    h = host("America/New_York", window(["sun"], time(1, 0), 180))
    opened = datetime(2026, 3, 8, 1, 0, tzinfo=NEW_YORK)
    assert is_open(h, opened)
    assert is_open(h, datetime(2026, 3, 8, 4, 59, tzinfo=NEW_YORK))
    assert not is_open(h, datetime(2026, 3, 8, 5, 0, tzinfo=NEW_YORK))  # 3 h elapsed, 4 h on the wall
    assert remaining_minutes(h, opened) == 180


def test_spring_forward_start_in_the_skipped_hour() -> None:
    h = host("America/New_York", window(["sun"], time(2, 30), 60))
    assert not is_open(h, datetime(2026, 3, 8, 3, 15, tzinfo=NEW_YORK))
    assert is_open(h, datetime(2026, 3, 8, 3, 30, tzinfo=NEW_YORK))
    assert next_opening(h, datetime(2026, 3, 8, 0, 0, tzinfo=NEW_YORK)) == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)


def test_fall_back_opens_once_at_the_first_occurrence() -> None:
    # 2026-11-01: New York clocks fall back from 02:00 EDT to 01:00 EST; 01:30 happens twice.
    h = host("America/New_York", window(["sun"], time(1, 30), 60))
    first = datetime(2026, 11, 1, 1, 45, tzinfo=NEW_YORK, fold=0)
    second = datetime(2026, 11, 1, 1, 45, tzinfo=NEW_YORK, fold=1)
    assert is_open(h, first)
    assert not is_open(h, second)
    assert remaining_minutes(h, first) == 45


def test_host_without_window_is_never_open_unless_overridden() -> None:
    h = host("UTC")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert not is_open(h, at)
    assert is_open(h, at, ignore_windows=True)
    assert next_opening(h, at) is None
    assert describe(h, at) == "no maintenance window"


def test_overlapping_windows_merge() -> None:
    h = host("UTC", window(["mon"], time(1, 0), 120), window(["mon"], time(2, 0), 120))
    assert remaining_minutes(h, datetime(2026, 6, 15, 1, 30, tzinfo=UTC)) == 150


def test_naive_datetime_is_rejected_naming_the_host() -> None:
    with pytest.raises(ValueError, match="host db1: .*naive"):
        is_open(host("UTC", window(["mon"], time(1, 0), 60)), datetime(2026, 1, 1))


def test_describe_closed_and_open() -> None:
    h = host("UTC", window(["mon"], time(1, 0), 60))
    assert describe(h, datetime(2026, 6, 15, 1, 15, tzinfo=UTC)).startswith("open until 2026-06-15T02:00+00:00 UTC (45 min left)")
    assert describe(h, datetime(2026, 6, 14, tzinfo=UTC)) == "closed; opens 2026-06-15T01:00+00:00 UTC"


quarter_hours = st.integers(min_value=0, max_value=95).map(lambda q: time(q // 4, q % 4 * 15))
windows = st.builds(
    window,
    st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1, max_size=7, unique=True),
    quarter_hours,
    st.integers(min_value=1, max_value=48).map(lambda n: n * 15),
)
# Instants on a quarter-hour grid around both DST changes of 2026 and in ordinary weeks.
instants = st.integers(min_value=0, max_value=365 * 96).map(
    lambda q: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=15 * q)
)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["America/New_York", "Europe/Paris", "Asia/Kolkata", "Australia/Lord_Howe"]),
       st.lists(windows, min_size=1, max_size=3), instants)
def test_next_opening_is_the_first_open_quarter_hour(zone: str, ws: list[MaintenanceWindow], at: datetime) -> None:
    h = host(zone, *ws)
    opening = next_opening(h, at)
    assert opening is not None
    assert is_open(h, opening)
    if is_open(h, at):
        assert opening == at
        # Openings on consecutive days chain into one stretch (Fri 12:00-24:00 then Sat
        # 00:00-12:00): the bound is a week's open minutes, not one of each window.
        assert 0 < remaining_minutes(h, at) <= sum(w.duration_minutes * len(w.days) for w in ws)
    else:
        assert opening > at
        assert remaining_minutes(h, at) == 0
        probe = at
        while probe + timedelta(minutes=15) <= opening:
            assert not is_open(h, probe)
            probe += timedelta(minutes=15)
