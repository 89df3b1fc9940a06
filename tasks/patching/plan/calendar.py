"""The hotpatch calendar: Patch Tuesday, baseline and hotpatch months, and what a month allows.

Baseline months (quarterly by default) carry a cumulative update that needs a reboot; the
months between carry hotpatches released on Patch Tuesday that need none. An unplanned baseline
listed in the policy replaces that month's hotpatch. Only hotpatch-eligible hosts (Windows
Server Azure Edition) hotpatch; every other host (Linux, ordinary Windows) takes what the policy
selects every month, unless the policy's `between_baselines` narrows hotpatch months to security
updates or makes them wait for the next baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, time

from configs.policies import Classification, PatchPolicy
from tasks.patching.models import Enrollment, MonthKind, Update

_WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
MAX_OFFSET_DAYS = 14


def patch_tuesday(year: int, month: int) -> date:
    """The second Tuesday of the month, when Microsoft releases its monthly updates."""
    return date(year, month, 8 + (1 - date(year, month, 1).weekday()) % 7)


def month_kind(year: int, month: int, policy: PatchPolicy) -> MonthKind:
    if month in policy.baseline_months or f"{year:04d}-{month:02d}" in policy.unplanned_baselines:
        return "baseline"
    return "hotpatch"


def next_baseline(year: int, month: int, policy: PatchPolicy) -> tuple[int, int]:
    """The first baseline month after (year, month)."""
    for step in range(1, 13 * 2):
        index = year * 12 + month - 1 + step
        candidate = (index // 12, index % 12 + 1)
        if month_kind(*candidate, policy) == "baseline":
            return candidate
    raise ValueError("the policy has no baseline month at all: set baseline_months")


@dataclass(frozen=True)
class CalendarMonth:
    year: int
    month: int
    patch_tuesday: date
    kind: MonthKind
    unplanned: bool

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def year_calendar(year: int, policy: PatchPolicy) -> list[CalendarMonth]:
    """The twelve months of `patchdrill patch calendar --year Y`."""
    return [
        CalendarMonth(
            year=year,
            month=month,
            patch_tuesday=patch_tuesday(year, month),
            kind=month_kind(year, month, policy),
            unplanned=month not in policy.baseline_months and f"{year:04d}-{month:02d}" in policy.unplanned_baselines,
        )
        for month in range(1, 13)
    ]


def rrule_for_patch_tuesday_offset(n_days: int, at: time | None = None) -> str:
    """An RRULE firing on Patch Tuesday + n_days (0-14), optionally at a local time of day.

    Patch Tuesday falls on day 8-14, so Patch Tuesday + N is the one weekday (Tuesday + N) that
    falls on a day 8+N … 14+N; for N <= 14 that range stays inside every month (at most day 28).
    The time zone is not part of the rule: give it to the schedule (Prefect's `timezone`).
    """
    if isinstance(n_days, bool) or not isinstance(n_days, int) or not 0 <= n_days <= MAX_OFFSET_DAYS:
        raise ValueError(f"a Patch Tuesday offset must be a whole number of days from 0 to {MAX_OFFSET_DAYS}, got {n_days!r}")
    if n_days == 0:
        rule = "FREQ=MONTHLY;BYDAY=TU;BYSETPOS=2"
    else:
        weekday = _WEEKDAYS[(1 + n_days) % 7]
        days = ",".join(str(day) for day in range(8 + n_days, 15 + n_days))
        rule = f"FREQ=MONTHLY;BYDAY={weekday};BYMONTHDAY={days}"
    if at is not None:
        rule += f";BYHOUR={at.hour};BYMINUTE={at.minute};BYSECOND={at.second}"
    return rule


@dataclass(frozen=True)
class CalendarVerdict:
    allowed: bool
    reason: str
    reboot_allowed: bool


def hotpatches(enrollment: Enrollment, policy: PatchPolicy) -> bool:
    return policy.hotpatch and enrollment.hotpatch_eligible


def reboot_allowed(enrollment: Enrollment, kind: MonthKind, policy: PatchPolicy) -> bool:
    """A hotpatching host never reboots in a hotpatch month: that is the point of hotpatch."""
    return not (kind == "hotpatch" and hotpatches(enrollment, policy))


def updates_allowed(
    update: Update,
    enrollment: Enrollment,
    kind: MonthKind,
    policy: PatchPolicy | None = None,
    *,
    waits_for: str = "the next baseline month",
) -> CalendarVerdict:
    """Whether the calendar lets this update install on this host this month.

    Only the calendar is judged here; classification, include/exclude and patch age are the
    policy filter's business (tasks.patching.plan.selection).
    """
    policy = policy or PatchPolicy()
    rebootable = reboot_allowed(enrollment, kind, policy)
    if kind == "baseline":
        return CalendarVerdict(True, "baseline month", rebootable)
    if hotpatches(enrollment, policy):
        if update.hotpatchable and update.classification is Classification.SECURITY:
            return CalendarVerdict(True, "hotpatch month: hotpatchable security update, no reboot", rebootable)
        return CalendarVerdict(False, f"hotpatch month: waits for {waits_for}", rebootable)
    if policy.between_baselines == "all":
        return CalendarVerdict(True, "monthly update: this host does not hotpatch", rebootable)
    if policy.between_baselines == "security" and update.is_security:
        return CalendarVerdict(True, "hotpatch month: policy installs security updates between baselines", rebootable)
    return CalendarVerdict(False, f"hotpatch month: waits for {waits_for}", rebootable)


__all__ = [
    "CalendarMonth", "CalendarVerdict", "MAX_OFFSET_DAYS", "hotpatches", "month_kind", "next_baseline",
    "patch_tuesday", "reboot_allowed", "rrule_for_patch_tuesday_offset", "updates_allowed", "year_calendar",
]
