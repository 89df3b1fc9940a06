"""Patch runs started and approved the way the Prefect UI does it, on the stack `make server`
starts: a real server with its scheduler, the `patchdrill` process work pool and a worker.

The UI starts a run with `POST /api/deployments/{id}/create_flow_run` (the deployment's
parameters with the form's edits) and answers a paused run's Resume form with
`POST /api/flow_runs/{id}/resume {"run_input": {...}}`; these tests make the same calls over
plain HTTP. Each run patches its own real sshd host with a sandboxed real apt and dpkg
(tests/hosts/aptlab.py): one security update waits there, so the policy's approval pause is
reached and whether anything was installed can be read from the host's dpkg.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tests.hosts.lab_stack import (RunningStack, artifact_keys, flow_run, paused, resume_from_ui, start_from_ui,
                                   wait_for_state)
from tests.hosts.patch_host import DEPLOYMENT, HostMaker, PatchableHost

# The first test also waits for the shared stack to come up (a minute or more on a busy machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


class StartedEarly:
    """A run started before the module's other tests and checked by the last one: its approval
    timeout then elapses while the others run instead of after them."""

    def __init__(self, start: Callable[[], str]) -> None:
        self.run_id = ""
        self._thread = threading.Thread(target=self._start, args=(start,), name="expiring-run")
        self._thread.start()

    def _start(self, start: Callable[[], str]) -> None:
        self.run_id = start()

    def result(self) -> str:
        self._thread.join()
        assert self.run_id, "the run could not be started"
        return self.run_id


@pytest.fixture(scope="module", autouse=True)
def expiring(ui_stack: RunningStack, patchable_host: HostMaker) -> tuple[StartedEarly, PatchableHost]:
    host = patchable_host("ui-expiring")
    return StartedEarly(lambda: start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config), approval_timeout_minutes=0.25)), host


def test_a_run_from_the_ui_pauses_and_resumes_with_input_to_completed(
        ui_stack: RunningStack, patchable_host: HostMaker) -> None:
    host = patchable_host("ui-approved")
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    run = paused(ui_stack, run_id)
    # The Resume form is built from the schema the run saved; approve has no default to submit.
    keyset = run["state"]["state_details"]["run_input_keyset"]
    with ui_stack.api() as api:
        schema = api.get(f"/flow_runs/{run_id}/input/{keyset['schema']}").json()
    assert "approve" in schema["required"], schema
    assert host.demo_web() == "1.0" and host.records() == []  # nothing installed while it waits

    result = resume_from_ui(ui_stack, run_id, {"approve": True, "comment": "change 42"})
    assert result["status"] == "ACCEPT", result
    run = wait_for_state(ui_stack, run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{ui_stack.logs()}"
    assert run["parameters"]["config_path"] == str(host.config)
    assert {"patch-web-compliance", "patch-web-summary"} <= artifact_keys(ui_stack, run_id)
    assert host.demo_web() == "1.1"
    [record] = host.records()
    assert (record.status, record.run_id) == ("succeeded", run_id)


def test_invalid_resume_input_is_rejected_and_the_run_stays_paused(
        ui_stack: RunningStack, patchable_host: HostMaker) -> None:
    host = patchable_host("ui-invalid")
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    paused(ui_stack, run_id)
    for bad in ({"approve": "perhaps"}, {"comment": "approve is missing"}, {"approve": True, "comment": ["x"]}):
        result = resume_from_ui(ui_stack, run_id, bad)
        assert result["status"] == "REJECT", (bad, result)
        assert "approve" in result["details"]["reason"] or "comment" in result["details"]["reason"], result
    # Several of the run's input polls later it is still waiting, and the host untouched.
    time.sleep(3)
    assert flow_run(ui_stack, run_id)["state"]["type"] == "PAUSED"
    assert host.demo_web() == "1.0" and host.records() == []

    # A valid answer still reaches it: the approver declines, the run ends Cancelled.
    assert resume_from_ui(ui_stack, run_id, {"approve": False, "comment": "change freeze"})["status"] == "ACCEPT"
    run = wait_for_state(ui_stack, run_id)
    assert (run["state"]["type"], run["state"]["message"]) == ("CANCELLED", "change freeze"), ui_stack.logs()
    assert host.demo_web() == "1.0"


def test_a_run_left_waiting_past_its_approval_timeout_fails_cleanly(
        ui_stack: RunningStack, expiring: tuple[StartedEarly, PatchableHost]) -> None:
    """Fails before flows/pause.py: Prefect's own pause timeout failed the run on the server with
    "The flow was failed and never resumed." and left the host no record of the run."""
    started, host = expiring
    run_id = started.result()
    run = wait_for_state(ui_stack, run_id, timeout=300)
    assert (run["state"]["type"], run["state"]["message"]) == (
        "FAILED", "no approval within 0.25 min: nothing installed"), f"{run['state']}\n{ui_stack.logs()}"
    assert host.demo_web() == "1.0"
    [record] = host.records()
    assert (record.run_id, record.status, record.reason) == (run_id, "skipped", "no approval within 0.25 min")
    assert "patch-web-summary" in artifact_keys(ui_stack, run_id)
