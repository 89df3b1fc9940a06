"""The drill deployments: a manual one whose run form offers the plans as choices, and one
quarterly deployment per plan of the deployed config, on the plan's own schedule."""

from __future__ import annotations

from pathlib import Path

import yaml

from configs.loader import load_config

REPO = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:  # type: ignore[type-arg]
    return {d["name"]: d for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]}


def test_every_scheduled_plan_has_its_quarterly_deployment_on_its_own_schedule() -> None:
    declared = _deployments()
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["definitions"]["config"]
    plans = load_config(REPO / config).config.recovery_plans
    assert plans, "the deployed config has no recovery plan to drill"
    for name, plan in plans.items():
        if plan.schedule is None:
            continue
        deployment = declared[f"drill-{name}-quarterly"]
        assert deployment["entrypoint"] == "flows/drill.py:drill_run"
        assert deployment["parameters"]["plan"] == name
        assert deployment["schedules"] == [{"cron": plan.schedule.cron, "timezone": plan.schedule.timezone}]


def test_the_manual_drill_form_offers_the_plans_as_choices() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.drill import drill_run

    schema = parameter_schema(drill_run.fn).model_dump_for_openapi()
    plans = sorted(load_config(REPO / "configs" / "lab.yaml").config.recovery_plans)
    assert schema["properties"]["plan"]["enum"] == plans
    assert _deployments()["drill"]["parameters"]["plan"] in plans
