"""When a host may be patched: its weekly maintenance windows, read in its own time zone.

A window opens on each listed weekday at a local wall-clock time and stays open for
`duration_minutes` of elapsed time, so a window may cross midnight (it belongs to the day it
opens on) and a DST change neither stretches nor shortens it. A start time that a
spring-forward skips opens at the instant that wall time maps to with the pre-change offset
(02:30 on a 02:00→03:00 night opens at 03:30), which is how `zoneinfo` resolves the gap; a
start time that a fall-back repeats opens at its first occurrence. A host with no window is
never open unless the run says to ignore windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo

from configs.models import HostConfig, MaintenanceWindow

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# The longest window is a week; one more day covers a start before the DST shift in the zone.
_LOOKBACK_DAYS = 8


@dataclass(frozen=True)
class WindowSpan:
    """One opening of a window, end exclusive, held in UTC.

    UTC because Python compares and subtracts two datetimes of the same zone by their wall
    clocks, ignoring `fold` and the offset: wrong by an hour on DST days.
    """

    start: datetime
    end: datetime

    def contains(self, at: datetime) -> bool:
        return self.start <= at.astimezone(timezone.utc) < self.end

    def remaining_minutes(self, at: datetime) -> float:
        return max(0.0, (self.end - at.astimezone(timezone.utc)).total_seconds() / 60)

    def local(self, zone: ZoneInfo) -> tuple[datetime, datetime]:
        return self.start.astimezone(zone), self.end.astimezone(zone)


def _require_aware(at: datetime, host: str) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"host {host}: maintenance windows need an aware datetime, got naive {at.isoformat()}")


def _openings(windows: list[MaintenanceWindow], zone: ZoneInfo, first_day: date, last_day: date) -> Iterator[WindowSpan]:
    day = first_day
    while day <= last_day:
        weekday = _DAY_NAMES[day.weekday()]
        for window in windows:
            if weekday in window.days:
                # Arithmetic in UTC: adding a timedelta to a zoned datetime is wall-clock arithmetic.
                start = datetime.combine(day, window.start, tzinfo=zone).astimezone(timezone.utc)
                end = start + timedelta(minutes=window.duration_minutes)
                yield WindowSpan(start, end)
        day += timedelta(days=1)


def _merged(spans: Iterator[WindowSpan]) -> list[WindowSpan]:
    """Overlapping or touching windows count as one opening."""
    merged: list[WindowSpan] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = WindowSpan(last.start, max(last.end, span.end))
        else:
            merged.append(span)
    return merged


def spans_between(host: HostConfig, start: datetime, end: datetime) -> list[WindowSpan]:
    """Every opening of the host's windows that overlaps [start, end)."""
    _require_aware(start, host.name)
    _require_aware(end, host.name)
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    zone = ZoneInfo(host.timezone)
    first = start.astimezone(zone).date() - timedelta(days=_LOOKBACK_DAYS)
    last = end.astimezone(zone).date() + timedelta(days=1)
    return [span for span in _merged(_openings(host.maintenance_windows, zone, first, last))
            if span.end > start and span.start < end]


def open_span(host: HostConfig, at: datetime) -> WindowSpan | None:
    """The opening the host is in at `at`, if any."""
    return next((span for span in spans_between(host, at, at + timedelta(microseconds=1)) if span.contains(at)), None)


def is_open(host: HostConfig, at: datetime, *, ignore_windows: bool = False) -> bool:
    _require_aware(at, host.name)
    return ignore_windows or open_span(host, at) is not None


def remaining_minutes(host: HostConfig, at: datetime) -> float:
    """Minutes until the current opening closes; 0 when the host is not in a window."""
    span = open_span(host, at)
    return span.remaining_minutes(at) if span else 0.0


def next_opening(host: HostConfig, after: datetime) -> datetime | None:
    """The first moment at or after `after` when the host is in a window (None: it never is).

    Returned in UTC when it is a window's start; `after` itself when the host is already open.
    """
    if not host.maintenance_windows:
        _require_aware(after, host.name)
        return None
    current = open_span(host, after)
    if current is not None:
        return after
    upcoming = spans_between(host, after, after + timedelta(days=_LOOKBACK_DAYS))
    return upcoming[0].start if upcoming else None


def describe(host: HostConfig, at: datetime) -> str:
    """One line for a dry-run plan or a skip reason, in the host's own time."""
    zone = ZoneInfo(host.timezone)
    span = open_span(host, at)
    if span is not None:
        closes = span.end.astimezone(zone).isoformat(timespec="minutes")
        return f"open until {closes} {host.timezone} ({span.remaining_minutes(at):.0f} min left)"
    opening = next_opening(host, at)
    if opening is None:
        return "no maintenance window"
    return f"closed; opens {opening.astimezone(zone).isoformat(timespec='minutes')} {host.timezone}"


__all__ = ["WindowSpan", "describe", "is_open", "next_opening", "open_span", "remaining_minutes", "spans_between"]
