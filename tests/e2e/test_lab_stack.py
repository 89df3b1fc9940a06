"""`make server PORT=…` as a user starts it: a real Prefect server with its scheduler, the UI,
the `patchdrill` work pool, a worker and every deployment of deployments/prefect.yaml.

The session's stack (tests/hosts/lab_stack.py) serves this module and the UI files, which run
on the same worker (it takes about a minute to come up). The Ctrl-C test stops it with SIGINT, as
Ctrl-C in a terminal would, and checks nothing it started is left running: tests/scheduling.py
runs it after every other test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from datetime import date, datetime, timedelta, time as clock, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import pytest
import yaml

from tests.hosts.lab_stack import RunningStack, processes_with

REPO = Path(__file__).resolve().parents[2]
SERVER_LOGS = REPO / ".lab" / "server"
pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(ui_stack: RunningStack) -> RunningStack:
    return ui_stack


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _client(stack: RunningStack) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Bound:
        async def __aenter__(self) -> Any:
            self._settings = temporary_settings(updates={PREFECT_API_URL: stack.api_url})
            self._settings.__enter__()
            self._client = get_client()
            return await self._client.__aenter__()

        async def __aexit__(self, *exc: object) -> None:
            await self._client.__aexit__(*exc)
            self._settings.__exit__(*exc)

    return Bound()


# ----------------------------------------------------------------------------- schedules


def patch_tuesday(year: int, month: int) -> date:
    """DESIGN.md's formula: the second Tuesday is day 8 + (1 - weekday of the 1st) % 7."""
    return date(year, month, 8 + (1 - date(year, month, 1).weekday()) % 7)


def _occurrences(after: datetime, zone: str, times: list[clock], on_day: Any, count: int) -> list[datetime]:
    """The first `count` local times on days for which on_day holds, after `after`, in UTC."""
    tz, found, day = ZoneInfo(zone), [], after.astimezone(ZoneInfo(zone)).date() - timedelta(days=1)
    while len(found) < count:
        for at in sorted(times):
            moment = datetime.combine(day, at, tzinfo=tz)
            if on_day(day) and moment > after:
                found.append(moment.astimezone(timezone.utc))
        day += timedelta(days=1)
    return found[:count]


def _patch_tuesday_plus(n: int) -> Any:
    return lambda day: day - timedelta(days=n) == patch_tuesday(day.year, day.month)


EVERY_HOUR = [clock(h) for h in range(24)]
# What each scheduled deployment promises in its description, stated independently of its RRULE.
EXPECTED: dict[str, tuple[str, list[clock], Any]] = {
    "inventory-check": ("UTC", EVERY_HOUR, lambda day: True),
    "patch-web-monthly": ("Europe/Paris", [clock(2)], _patch_tuesday_plus(4)),
    "patch-db-monthly": ("America/New_York", [clock(1), clock(23, 30)], _patch_tuesday_plus(5)),
    "patch-app-monthly": ("Asia/Tokyo", [clock(3)], _patch_tuesday_plus(8)),
    "patch-assess-daily": ("UTC", [clock(6)], lambda day: True),
    "nightly-backup": ("UTC", [clock(1)], lambda day: True),
    "freshness-check": ("UTC", [clock(h, 30) for h in range(24)], lambda day: True),
    "weekly-verify": ("UTC", [clock(9)], lambda day: day.weekday() == 6),
    "drill-lab-web-quarterly": ("UTC", [clock(3)], lambda day: day.day == 1 and day.month in (1, 4, 7, 10)),
}


def test_the_formula_matches_known_patch_tuesdays() -> None:
    assert [patch_tuesday(2026, m) for m in (1, 2, 12)] == [date(2026, 1, 13), date(2026, 2, 10), date(2026, 12, 8)]


def test_scheduler_creates_every_deployments_runs_at_the_expected_times(stack: RunningStack) -> None:
    """Fails with SQLAlchemy 2.1.x: Prefect 3.8's scheduler then raises in schedule_deployments
    every cycle and no deployment ever gets an upcoming run."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    declared = {d["name"]: d for d in yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]}
    assert {name for name, d in declared.items() if d.get("schedules")} == set(EXPECTED)

    async def upcoming() -> dict[str, list[datetime]]:
        async with _client(stack) as client:
            found = {}
            for deployment in await client.read_deployments():
                runs = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200)
                found[deployment.name] = [r.expected_start_time for r in runs if r.auto_scheduled]
            return found

    deadline = time.monotonic() + 120
    while not all((runs := anyio.run(upcoming)).get(name) for name in EXPECTED) and time.monotonic() < deadline:
        time.sleep(2)
    for name, (zone, times, on_day) in EXPECTED.items():
        got = runs.get(name, [])
        # The scheduler looks 100 days ahead: three runs of the others, one of a quarterly drill.
        needed = 1 if name.endswith("-quarterly") else 3
        assert len(got) >= needed, f"{name}: the scheduler created {len(got)} run(s)"
        # The first expected occurrence may have passed between deploying and the scheduler's cycle.
        expected = _occurrences(stack.started, zone, times, on_day, len(got) + 1)
        assert got in (expected[:-1], expected[1:]), name
    log = (SERVER_LOGS / "server.log").read_text()
    assert "Traceback" not in log and "InvalidRequestError" not in log, log[-3000:]


# ----------------------------------------------------------------------------- the UI's port


def test_the_ui_calls_the_api_on_the_chosen_port(stack: RunningStack) -> None:
    assert f"http://127.0.0.1:{stack.port}" in stack.output.read_text()
    settings = httpx.get(f"http://127.0.0.1:{stack.port}/ui-settings", timeout=10).json()
    assert settings["api_url"] == stack.api_url
    assert httpx.get(f"http://127.0.0.1:{stack.port}/", timeout=10).status_code == 200  # the UI itself


def test_the_work_pool_and_every_deployment_are_registered(stack: RunningStack) -> None:
    declared = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]

    async def read() -> tuple[Any, dict[str, Any]]:
        async with _client(stack) as client:
            return await client.read_work_pool("patchdrill"), {d.name: d for d in await client.read_deployments()}

    pool, deployments = anyio.run(read)
    assert pool.type == "process"
    assert set(deployments) == {d["name"] for d in declared}
    for d in declared:
        assert deployments[d["name"]].tags == d["tags"], d["name"]


# ----------------------------------------------------------------------------- runs from the UI


async def _start_from_ui(client: Any, deployment_name: str) -> Any:
    """What the UI's Run button does: POST /deployments/{id}/create_flow_run, no parameters given."""
    deployment = next(d for d in await client.read_deployments() if d.name == deployment_name)
    return await client.create_flow_run_from_deployment(deployment.id)


async def _final(client: Any, run: Any) -> Any:
    """The run once the worker has taken it to a final state (or as it is after five minutes)."""
    deadline = time.monotonic() + 300
    while not (run := await client.read_flow_run(run.id)).state.is_final() and time.monotonic() < deadline:
        await anyio.sleep(1)
    return run


async def _run_from_ui(client: Any, deployment_name: str) -> Any:
    return await _final(client, await _start_from_ui(client, deployment_name))


def test_every_deployment_runs_with_its_defaults_on_the_lab(stack: RunningStack) -> None:
    """Each shipped deployment, started with its defaults as from the UI, ends Completed, with a
    readable run name and its artifacts keyed per group or plan."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    # Failover, failback and their cancel change production: they need a plan chosen in the form and
    # pause for approval, so they have no defaults to run with (tests/e2e/test_failover_files.py runs
    # and approves them on a real server); registering them is checked above.
    names = [d["name"] for d in yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]
             if not d["entrypoint"].startswith("flows/failover.py:")]
    # The backup comes first: verify, restore and the drills read the recovery point it writes.
    later = [n for n in names if n != "nightly-backup"]

    async def run_all() -> dict[str, tuple[Any, dict[str, Any]]]:
        async with _client(stack) as client:
            runs = {"nightly-backup": await _run_from_ui(client, "nightly-backup")}
            # Started one after another, as a person clicks, and then run side by side by the
            # worker: a burst of creations at once can meet the server's database busy (503).
            started = {name: await _start_from_ui(client, name) for name in later}
            async with anyio.create_task_group() as group:
                async def one(name: str) -> None:
                    runs[name] = await _final(client, started[name])
                for name in later:
                    group.start_soon(one, name)
            artifacts = {}
            for name, run in runs.items():
                found = await client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
                artifacts[name] = {a.key: a for a in found if a.key}
            return {name: (run, artifacts[name]) for name, run in runs.items()}

    results = anyio.run(run_all)
    worker_log = (SERVER_LOGS / "worker.log").read_text()
    for name in names:
        run, _ = results[name]
        assert run.state.is_completed(), f"{name}: {run.state.type} {run.state.message}\n{worker_log[-3000:]}"
    kinds = {"patch-web-monthly": ("patch-run web monthly-web ", "patch-web-summary"),
             "patch-db-monthly": ("patch-run db ", "patch-db-summary"),
             "patch-app-monthly": ("patch-run app ", "patch-app-summary"),
             "patch-assess-daily": ("patch-assess all ", "patch-all-assessment"),
             "nightly-backup": ("backup all nightly ", "backup-all-nightly"),
             "weekly-verify": ("verify all ", "verify-all"),
             "freshness-check": ("freshness all nightly ", "freshness-all-nightly"),
             "inventory-check": ("inventory all ", "inventory-all"),
             "restore": ("restore lab-local sample ", "restore-lab-local-sample"),
             # Both drills of plan lab-web: one waits on the plan's slot while the other runs.
             "drill": ("drill lab-web ", "drill-lab-web-test-failover-summary"),
             "drill-lab-web-quarterly": ("drill lab-web ", "drill-lab-web-test-failover-summary")}
    assert set(kinds) == set(names)
    for name, (run_prefix, key) in kinds.items():
        run, artifacts = results[name]
        assert run.name.startswith(run_prefix), (name, run.name)
        assert key in artifacts, (name, sorted(artifacts))
        assert artifacts[key].description.startswith(f"{run.name}") or run.name in artifacts[key].description
        assert str(run.id) not in (artifacts[key].description or ""), "titled by run name, not its id"
    backup_rows = json.loads(results["nightly-backup"][1]["backup-all-nightly"].data)
    assert {row["disk"] for row in backup_rows} == {"sample", "image", "notes"}
    sizes = [row[column] for row in backup_rows for column in ("scanned", "changed", "uploaded", "stored")]
    assert all(re.fullmatch(r"\d+(\.\d)? (Bytes|KiB|MiB|GiB)", size) for size in sizes), backup_rows
    # The lab's 32 MiB disk image, one MiB in four written as zeros: those are holes, not scanned.
    assert "24.0 MiB" in {row["scanned"] for row in backup_rows}


def test_a_busy_port_is_one_clear_line_and_starts_nothing(tmp_path: Path) -> None:
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "cli.lab_server", "--port", str(port), "--log-dir",
                               str(tmp_path / "logs")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"make server: port {port} is in use on 127.0.0.1: stop what listens there "
                                   "or choose another with PORT=...")
    assert "Traceback" not in done.stdout + done.stderr
    assert processes_with(f"PREFECT_HOME={tmp_path}") == []


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_everything_it_started(stack: RunningStack) -> None:
    """After every other test of the stack (tests/scheduling.py): SIGINT to make's process
    group, as a terminal's Ctrl-C sends it."""
    assert processes_with(f"PREFECT_HOME={stack.home}")  # server and worker are up
    os.killpg(stack.process.pid, signal.SIGINT)
    # make re-raises the interrupt once its recipe has exited (or exits 2).
    assert stack.process.wait(timeout=90) in (0, 2, -signal.SIGINT)
    deadline = time.monotonic() + 30
    while (left := processes_with(f"PREFECT_HOME={stack.home}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the port any more
        socket.create_connection(("127.0.0.1", stack.port), timeout=5).close()
