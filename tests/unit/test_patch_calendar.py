"""The hotpatch calendar: Patch Tuesday, month kinds, RRULEs and what a month lets install."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import pytest
from dateutil.rrule import rrulestr
from hypothesis import given
from hypothesis import strategies as st

from configs.policies import Classification, PatchPolicy
from tasks.patching.plan.calendar import (
    month_kind,
    next_baseline,
    patch_tuesday,
    reboot_allowed,
    rrule_for_patch_tuesday_offset,
    updates_allowed,
    year_calendar,
)
from tasks.patching.models import Enrollment, Update

years = st.integers(min_value=1900, max_value=2400)
months = st.integers(min_value=1, max_value=12)


def enrollment(*, hotpatch_eligible: bool, os_family: str = "windows") -> Enrollment:
    return Enrollment(
        host="h1", os_family=os_family, os_name="Windows Server 2022 Datacenter: Azure Edition",
        package_manager="windows-update" if os_family == "windows" else "apt",
        hotpatch_eligible=hotpatch_eligible,
        reboot_detection="windows-registry" if os_family == "windows" else "reboot-required-file",
        boot_id="b1", enrolled_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )


def update(classification: Classification, *, hotpatchable: bool) -> Update:
    return Update(id="KB5000001", classification=classification, hotpatchable=hotpatchable)


@given(years, months)
def test_patch_tuesday_is_the_second_tuesday(year: int, month: int) -> None:
    day = patch_tuesday(year, month)
    assert day.weekday() == 1
    assert 8 <= day.day <= 14
    assert (day - timedelta(days=7)).month == month  # exactly one Tuesday before it this month
    assert (day - timedelta(days=14)).month != month


def test_known_patch_tuesdays() -> None:
    assert patch_tuesday(2024, 1) == date(2024, 1, 9)
    assert patch_tuesday(2025, 10) == date(2025, 10, 14)
    assert patch_tuesday(2026, 9) == date(2026, 9, 8)


@given(years, months, st.lists(months, min_size=1, max_size=12), st.lists(st.tuples(years, months), max_size=6))
def test_unplanned_baselines_replace_hotpatch_months(year: int, month: int, baseline: list[int], unplanned: list[tuple[int, int]]) -> None:
    policy = PatchPolicy(baseline_months=baseline, unplanned_baselines=[f"{y:04d}-{m:02d}" for y, m in unplanned])
    kind = month_kind(year, month, policy)
    if month in baseline or (year, month) in unplanned:
        assert kind == "baseline"
    else:
        assert kind == "hotpatch"
    by, bm = next_baseline(year, month, policy)
    assert (by, bm) > (year, month)
    assert month_kind(by, bm, policy) == "baseline"


def test_year_calendar_default_policy() -> None:
    policy = PatchPolicy(unplanned_baselines=["2026-05"])
    calendar = year_calendar(2026, policy)
    assert [m.kind for m in calendar] == [
        "baseline", "hotpatch", "hotpatch", "baseline", "baseline", "hotpatch",
        "baseline", "hotpatch", "hotpatch", "baseline", "hotpatch", "hotpatch",
    ]
    assert [m.label for m in calendar if m.unplanned] == ["2026-05"]
    assert calendar[0].patch_tuesday == date(2026, 1, 13)


@pytest.mark.parametrize("n_days", range(0, 15))
def test_rrule_follows_patch_tuesday_for_a_century(n_days: int) -> None:
    rule = rrulestr(rrule_for_patch_tuesday_offset(n_days), dtstart=datetime(2000, 1, 1))
    fired = [moment.date() for moment in rule.between(datetime(2000, 1, 1), datetime(2100, 1, 1), inc=True)]
    expected = [patch_tuesday(y, m) + timedelta(days=n_days) for y in range(2000, 2100) for m in range(1, 13)]
    assert fired == expected


def test_rrule_examples_from_the_design() -> None:
    assert rrule_for_patch_tuesday_offset(0) == "FREQ=MONTHLY;BYDAY=TU;BYSETPOS=2"
    assert rrule_for_patch_tuesday_offset(3) == "FREQ=MONTHLY;BYDAY=FR;BYMONTHDAY=11,12,13,14,15,16,17"


def test_rrule_time_of_day() -> None:
    rule = rrulestr(rrule_for_patch_tuesday_offset(2, time(22, 30)), dtstart=datetime(2026, 1, 1))
    assert rule.after(datetime(2026, 1, 1)) == datetime(2026, 1, 15, 22, 30)


@pytest.mark.parametrize("bad", [-1, 15, 2.5, True, "3"])
def test_rrule_rejects_offsets_outside_a_month(bad: object) -> None:
    with pytest.raises(ValueError, match="Patch Tuesday offset"):
        rrule_for_patch_tuesday_offset(bad)  # type: ignore[arg-type]


@given(st.sampled_from(list(Classification)), st.booleans(), st.booleans(), st.sampled_from(["baseline", "hotpatch"]),
       st.sampled_from(["wait", "security", "all"]))
def test_calendar_selection_rule(classification: Classification, hotpatchable: bool, eligible: bool, kind: str, between: str) -> None:
    policy = PatchPolicy(between_baselines=between)
    host = enrollment(hotpatch_eligible=eligible)
    verdict = updates_allowed(update(classification, hotpatchable=hotpatchable), host, kind, policy)  # type: ignore[arg-type]
    if kind == "baseline":
        assert verdict.allowed and verdict.reboot_allowed
    elif eligible:
        assert verdict.allowed == (hotpatchable and classification is Classification.SECURITY)
        assert not verdict.reboot_allowed
    else:
        security = classification in (Classification.SECURITY, Classification.CRITICAL)
        assert verdict.allowed == (between == "all" or (between == "security" and security))
        assert verdict.reboot_allowed
    if not verdict.allowed:
        assert "waits for" in verdict.reason


def test_hotpatch_disabled_in_policy_makes_eligible_hosts_patch_monthly() -> None:
    host = enrollment(hotpatch_eligible=True)
    policy = PatchPolicy(hotpatch=False)
    verdict = updates_allowed(update(Classification.SECURITY, hotpatchable=True), host, "hotpatch", policy)
    assert verdict.allowed
    assert reboot_allowed(host, "hotpatch", policy)


@pytest.mark.parametrize("os_family", ["linux", "windows"])
@pytest.mark.parametrize("classification", [Classification.SECURITY, Classification.CRITICAL, Classification.UPDATES])
def test_hosts_that_do_not_hotpatch_take_their_updates_every_month_by_default(
        os_family: str, classification: Classification) -> None:
    host = enrollment(hotpatch_eligible=False, os_family=os_family)
    verdict = updates_allowed(update(classification, hotpatchable=False), host, "hotpatch")
    assert verdict.allowed and verdict.reboot_allowed, verdict.reason


def test_waiting_for_the_baseline_is_a_choice_of_the_policy() -> None:
    host = enrollment(hotpatch_eligible=False, os_family="linux")
    verdict = updates_allowed(update(Classification.SECURITY, hotpatchable=False), host, "hotpatch",
                              PatchPolicy(between_baselines="wait"))
    assert not verdict.allowed and "waits for" in verdict.reason
