"""Patch policy validation, quotas and the policy filter (include/exclude, classification, age)."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from configs.policies import Classification, PatchPolicy, Quota
from tasks.patching.models import ComplianceState, Enrollment, HostPatchRecord, Update, UpdateOutcome
from tasks.patching.plan.selection import decide, matches

LINUX = Enrollment(
    host="web1", os_family="linux", os_name="Debian GNU/Linux 12 (bookworm)", package_manager="apt",
    reboot_detection="reboot-required-file", boot_id="b", enrolled_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
)


@given(st.integers(min_value=0, max_value=10_000))
def test_quota_counts_round_trip(count: int) -> None:
    assert Quota.parse(count).of(5) == count
    assert Quota.parse(str(count)) == Quota(count=count)


@given(st.integers(min_value=1, max_value=100), st.integers(min_value=0, max_value=5000))
def test_quota_percent_rounds_down_within_population(percent: int, population: int) -> None:
    resolved = Quota.parse(f"{percent}%").of(population)
    assert resolved <= population
    assert resolved * 100 <= population * percent < (resolved + 1) * 100


def test_quota_floor_and_minimum() -> None:
    assert Quota.parse("25%").of(10) == 2
    assert Quota.parse("25%").of(3, at_least=1) == 1
    assert Quota.parse("100%").of(7) == 7
    assert str(Quota.parse(" 12.5 % ")) == "12.5%"


@pytest.mark.parametrize("bad", ["0%", "150%", "-3", -1, "ten", "25 percent", True, 2.5, None])
def test_bad_quotas_name_the_field(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        PatchPolicy(max_concurrency=bad)
    assert info.value.errors()[0]["loc"] == ("max_concurrency",)
    assert "count" in str(info.value) or "percentage" in str(info.value)


def test_policy_round_trips_through_json() -> None:
    policy = PatchPolicy(
        max_concurrency="25%", max_errors=2, include=["KB5034441", "openssl*"],
        health_probes=[{"kind": "tcp", "port": 443}, {"kind": "http", "url": "http://{address}/health"}],
        unplanned_baselines=["2026-05"],
    )
    dumped = policy.model_dump(mode="json")
    assert dumped["max_concurrency"] == "25%" and dumped["max_errors"] == 2
    assert PatchPolicy.model_validate(dumped) == policy


@pytest.mark.parametrize(("field", "value", "message"), [
    ("baseline_months", [0, 4], "baseline months must be 1-12"),
    ("unplanned_baselines", ["2026-13"], "'2026-13' is not a month"),
    ("unplanned_baselines", ["May 2026"], "'May 2026' is not a month"),
    ("reboot", "Sometimes", "IfRequired"),
    ("health_probes", [{"kind": "ping"}], "kind"),
])
def test_policy_rejects_bad_fields(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        PatchPolicy(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field
    assert message in str(info.value)


def test_record_counts_states() -> None:
    record = HostPatchRecord(
        run_id="r1", host="web1", started_at=datetime(2026, 1, 1, tzinfo=timezone.utc), month_kind="baseline",
        status="succeeded", updates=[
            UpdateOutcome(update_id="a", state=ComplianceState.INSTALLED),
            UpdateOutcome(update_id="b", state=ComplianceState.INSTALLED),
            UpdateOutcome(update_id="c", state=ComplianceState.EXCLUDED, reason="excluded by 'c'"),
        ],
    )
    assert record.count(ComplianceState.INSTALLED) == 2
    assert record.count(ComplianceState.FAILED) == 0
    with pytest.raises(ValidationError, match="timezone"):
        HostPatchRecord(run_id="r", host="h", started_at=datetime(2026, 1, 1), month_kind="baseline", status="failed")


def pkg(name: str, classification: Classification = Classification.SECURITY, released: date | None = None) -> Update:
    return Update(id=name, packages=[name], classification=classification, release_date=released)


def test_matches_kb_numbers_and_masks() -> None:
    kb = Update(id="KB5034441", classification=Classification.SECURITY)
    assert matches("5034441", kb) and matches("kb5034441", kb) and not matches("KB5034442", kb)
    assert matches("openssl*", pkg("openssl-libs")) and not matches("openssl*", pkg("libssl3"))


def test_exclude_wins_over_include_and_include_overrides_classification() -> None:
    policy = PatchPolicy(include=["demo-*"], exclude=["demo-db"])
    today = date(2026, 1, 20)
    excluded = decide(pkg("demo-db"), policy, LINUX, "baseline", today)
    assert not excluded.install and excluded.state is ComplianceState.EXCLUDED and "demo-db" in excluded.reason
    other = decide(pkg("demo-web", Classification.OTHER), policy, LINUX, "baseline", today)
    assert other.install and "included by 'demo-*'" in other.reason
    unselected = decide(pkg("curl", Classification.OTHER), policy, LINUX, "baseline", today)
    assert not unselected.install and unselected.state is ComplianceState.EXCLUDED


def test_approve_after_days_holds_new_and_undated_updates() -> None:
    policy = PatchPolicy(approve_after_days=7)
    today = date(2026, 1, 20)
    assert decide(pkg("a", released=date(2026, 1, 13)), policy, LINUX, "baseline", today).install
    young = decide(pkg("a", released=date(2026, 1, 14)), policy, LINUX, "baseline", today)
    assert not young.install and young.state is ComplianceState.MISSING and "2026-01-21" in young.reason
    undated = decide(pkg("a"), policy, LINUX, "baseline", today)
    assert not undated.install and "release date unknown" in undated.reason


def test_calendar_applies_after_the_policy_filter() -> None:
    held = decide(pkg("a"), PatchPolicy(between_baselines="wait"), LINUX, "hotpatch", date(2026, 2, 20),
                  waits_for="2026-04")
    assert not held.install and held.state is ComplianceState.MISSING and "waits for 2026-04" in held.reason
