"""deployments/prefect.yaml deploys, as an operator would, onto a real Prefect server: every
entry point loads, every parameter is its flow's own, schedules arrive as written."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
pytestmark = pytest.mark.e2e


def _declared() -> list[dict]:  # type: ignore[type-arg]
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_every_parameter_is_its_flows_own() -> None:
    for deployment in _declared():
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]


def _shipped_flows() -> list[object]:
    from prefect import Flow

    found = {}
    for module in sorted((REPO / "flows").glob("*.py")):
        loaded = importlib.import_module(f"flows.{module.stem}")
        found.update({id(v): v for v in vars(loaded).values() if isinstance(v, Flow)})
    return list(found.values())


def test_every_flow_parameter_has_a_description_and_a_concrete_type_in_the_run_form() -> None:
    """The UI builds its run form from this schema: no bare names, no `Property is type "None"`."""
    from prefect.utilities.callables import parameter_schema

    flows = _shipped_flows()
    assert {f.name for f in flows} >= {"patch-run", "patch-assess", "patch-enroll", "backup-run", "verify-run",
                                       "restore-run", "inventory-check"}
    for flow in flows:
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        assert schema["properties"], flow.name
        for name, prop in schema["properties"].items():
            assert prop.get("description", "").strip(), f"{flow.name}.{name} has no description"
            assert prop.get("type") in {"string", "integer", "number", "boolean", "array"}, f"{flow.name}.{name}: {prop}"
            if prop["type"] == "array":
                assert prop["items"].get("type") == "string", f"{flow.name}.{name}: {prop}"


def test_every_flow_names_its_runs() -> None:
    assert [f.name for f in _shipped_flows() if f.flow_run_name is None] == []


def test_prefect_deploy_all_registers_every_deployment(prefect_server: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PATCHDRILL_HOME": str(REPO),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    created = run("work-pool", "create", "patchdrill", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = run("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML))
    assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-4000:]

    async def read() -> dict[str, object]:
        async with get_client() as client:
            return {d.name: d for d in await client.read_deployments()}

    registered = anyio.run(read)
    for declared in _declared():
        deployment = registered[declared["name"]]
        assert deployment.work_pool_name == "patchdrill"
        assert deployment.parameters == declared.get("parameters", {})
        wanted = [(s.get("rrule") or s.get("cron"), s["timezone"]) for s in declared.get("schedules", [])]
        got = [(_rule(s.schedule), s.schedule.timezone) for s in deployment.schedules]
        assert sorted(got) == sorted(wanted), declared["name"]


def _rule(schedule: object) -> str:
    """The cron or RRULE text as declared (Prefect prefixes an RRULE with its DTSTART line)."""
    rrule = getattr(schedule, "rrule", None)
    return rrule.splitlines()[-1] if rrule else getattr(schedule, "cron")
