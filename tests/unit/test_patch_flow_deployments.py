"""deployments/prefect.yaml's patch deployments: every monthly rule fires on Patch Tuesday + N at the window's start,
in the group's zone, and every deployment passes parameters its flow accepts."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule, RRuleSchedule

from tasks.patching.plan.calendar import patch_tuesday, rrule_for_patch_tuesday_offset

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"
DEPLOYMENTS = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
               if d["entrypoint"].startswith("flows/patch.py:")]


def _flow(entrypoint: str):  # type: ignore[no-untyped-def]
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_parameters_are_the_flows_own(deployment: dict) -> None:  # type: ignore[type-arg]
    flow = _flow(deployment["entrypoint"])
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment["parameters"]) <= accepted
    assert deployment["schedules"], "every patch deployment runs on a schedule"


MONTHLY = [(d["name"], s) for d in DEPLOYMENTS for s in d["schedules"] if "rrule" in s]


@pytest.mark.parametrize(("name", "schedule"), MONTHLY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MONTHLY)])
def test_monthly_rules_fire_on_patch_tuesday_plus_n_for_five_years(name: str, schedule: dict) -> None:  # type: ignore[type-arg]
    rule = RRuleSchedule(rrule=schedule["rrule"], timezone=schedule["timezone"]).to_rrule()
    firings = list(rule)[:60]
    offsets = {(f.date() - patch_tuesday(f.year, f.month)).days for f in firings}
    assert len(offsets) == 1, f"{name}: fires at different offsets from Patch Tuesday: {offsets}"
    [offset] = offsets
    assert len({(f.year, f.month) for f in firings}) == 60, "exactly one run a month"
    first = firings[0]
    assert schedule["timezone"] in str(first.tzinfo), "runs at the window's start in the group's own zone"
    # The rule is the one calendar.py builds for that offset and time of day.
    assert schedule["rrule"] == rrule_for_patch_tuesday_offset(offset, first.timetz().replace(tzinfo=None))


def test_the_daily_assessment_is_read_only_and_daily() -> None:
    [daily] = [d for d in DEPLOYMENTS if d["entrypoint"].endswith(":patch_assess")]
    [schedule] = daily["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"]).cron == "0 6 * * *"
