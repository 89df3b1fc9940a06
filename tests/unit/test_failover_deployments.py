"""deployments/prefect.yaml's failover and failback: manual, and never past the approval pause."""

from __future__ import annotations

from pathlib import Path

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def test_failover_and_failback_are_manual_and_approval_gated() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
                   if d["entrypoint"].startswith("flows/failover.py:")}
    assert {d["entrypoint"] for d in deployments.values()} >= {"flows/failover.py:failover_run",
                                                               "flows/failover.py:failback_run"}
    for name, deployment in deployments.items():
        assert not deployment.get("schedules"), f"{name} must never run on a schedule"
        assert not deployment.get("parameters", {}).get("approved"), f"{name} would skip its approval pause"
