"""`make server` as a user starts it, shared by the modules that drive it through its API or UI.

    ui_stack   session   RunningStack: a real Prefect server (API, UI, scheduler and the other
                         services) with its own PREFECT_HOME on a free port, the `patchdrill`
                         process work pool, a worker and every deployment of deployments/prefect.yaml.
                         Its files run on one worker (tests/scheduling.py), so it starts once;
                         test_lab_stack.py's Ctrl-C test stops it, after all of them.

Poll intervals are shortened (the worker's query, the runner's and a paused patch run's polls)
so a test does not wait out production's 10 s cycles; the code paths are the same. The stack is
stopped with SIGINT, as Ctrl-C in a terminal would, and anything it left is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hosts.sshd_server import free_port

REPO = Path(__file__).resolve().parents[2]
SERVER_LOGS = REPO / ".lab" / "server"
STARTUP_TIMEOUT_SECONDS = 300
# Quicker than the defaults (worker 10 s, runner 10 s, a paused patch run's input poll 10 s).
FAST_POLLS = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
              "PATCHDRILL_APPROVAL_POLL_SECONDS": "1"}


class RetryBusy(httpx.HTTPTransport):
    """Retries a 503: SQLite answers "database is locked" while the scheduler fills in every
    deployment's runs (DESIGN.md); Prefect's own client retries these too."""

    ATTEMPTS = 10

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(self.ATTEMPTS - 1):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(1)
        return super().handle_request(request)


@dataclass
class RunningStack:
    process: subprocess.Popen[str]
    port: int
    home: Path
    output: Path
    started: datetime  # when `make server` was started, before it deployed anything

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def api(self) -> httpx.Client:
        """A plain HTTP client on the API, as the UI's own calls are made."""
        return httpx.Client(base_url=self.api_url, timeout=30, transport=RetryBusy())

    def logs(self) -> str:
        """The tail of the worker's and the server's logs, for a failure message."""
        return "\n".join(f"--- {name}\n{(SERVER_LOGS / name).read_text(errors='replace')[-3000:]}"
                         for name in ("worker.log", "server.log") if (SERVER_LOGS / name).exists())


def processes_with(marker: str) -> list[int]:
    """Processes whose environment carries marker: everything the stack started inherits it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_stack(home: Path) -> RunningStack:
    port = free_port("127.0.0.1")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **FAST_POLLS)
    output = home / "make-server.out"
    started = datetime.now(timezone.utc)
    with output.open("w") as out:
        process = subprocess.Popen(["make", "--no-print-directory", "server", f"PORT={port}"], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while "Prefect UI:" not in output.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(RunningStack(process, port, home, output, started))
            raise RuntimeError(f"make server did not come up:\n{output.read_text()[-3000:]}")
        time.sleep(1)
    stack = RunningStack(process, port, home, output, started)
    _wait_for_the_schedulers_first_pass(stack)
    return stack


def _wait_for_the_schedulers_first_pass(stack: RunningStack) -> None:
    """Until every scheduled deployment has its upcoming runs: the scheduler writes them in one
    burst after deploying, during which SQLite may answer a page's request with 503 (DESIGN.md)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with stack.api() as api:
        scheduled = {d["id"] for d in api.post("/deployments/filter", json={}).json() if d["schedules"]}
        while time.monotonic() < deadline:
            runs = api.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                                       "limit": 200}).json()
            if scheduled <= {run["deployment_id"] for run in runs}:
                return
            time.sleep(2)


def stop_stack(stack: RunningStack) -> None:
    if stack.process.poll() is None:
        os.killpg(stack.process.pid, signal.SIGINT)
        try:
            stack.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.process.pid, signal.SIGKILL)
            stack.process.wait()
    for pid in processes_with(f"PREFECT_HOME={stack.home}"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    stack = start_stack(tmp_path_factory.mktemp("ui-stack-home"))
    yield stack
    stop_stack(stack)


def deployment(stack: RunningStack, name: str) -> dict[str, Any]:
    with stack.api() as api:
        found = api.post("/deployments/filter", json={"deployments": {"name": {"any_": [name]}}}).json()
    assert len(found) == 1, (name, found)
    return dict(found[0])


def flow_run(stack: RunningStack, run_id: str) -> dict[str, Any]:
    with stack.api() as api:
        response = api.get(f"/flow_runs/{run_id}")
    response.raise_for_status()
    return dict(response.json())


def wait_for_state(stack: RunningStack, run_id: str, *types: str, timeout: float = 240) -> dict[str, Any]:
    """The run once its state is one of types (or a final one), or as it is after timeout seconds."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
    deadline = time.monotonic() + timeout
    while (run := flow_run(stack, run_id))["state"]["type"] not in {*types, *final} and time.monotonic() < deadline:
        time.sleep(0.5)
    return run


# ----------------------------------------------------------------------------- the UI's calls


def start_from_ui(stack: RunningStack, deployment_name: str, **edits: Any) -> str:
    """The Custom run form's submit: the deployment's parameters with the user's edits."""
    shown = deployment(stack, deployment_name)
    with stack.api() as api:
        response = api.post(f"/deployments/{shown['id']}/create_flow_run",
                            json={"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
                                  "parameters": {**shown["parameters"], **edits}, "enforce_parameter_schema": True})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def resume_from_ui(stack: RunningStack, run_id: str, run_input: dict[str, Any]) -> dict[str, Any]:
    """The Resume form's submit; the orchestration result the UI shows."""
    with stack.api() as api:
        response = api.post(f"/flow_runs/{run_id}/resume", json={"run_input": run_input})
    assert response.is_success, response.text
    return dict(response.json())


def paused(stack: RunningStack, run_id: str) -> dict[str, Any]:
    run = wait_for_state(stack, run_id, "PAUSED")
    assert run["state"]["type"] == "PAUSED", f"{run['state']}\n{stack.logs()}"
    return run


def artifact_keys(stack: RunningStack, run_id: str) -> set[str]:
    with stack.api() as api:
        found = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    return {artifact["key"] for artifact in found if artifact["key"]}
