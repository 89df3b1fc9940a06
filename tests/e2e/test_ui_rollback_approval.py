"""A rollback a person approves (`recovery_point.rollback: ask`), answered the way the Prefect UI
answers it, on the stack `make server` starts (tests/hosts/lab_stack.py): the run is started
from the deployment's form and its Resume form is submitted with `POST /api/flow_runs/{id}/resume`.

Each run patches its own real sshd host with a sandboxed real apt and dpkg
(tests/hosts/patch_host.py): demo-web 1.0 with the security update 1.1 waiting. The host's one
protected disk is its whole apt root, backed up over SSH by the real backup pipeline right before
the install; the policy's health probe wants demo-web 1.0, so the update itself fails it and a
rollback that restores the pre-patch point makes it pass again. Nothing here is simulated.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from tests.hosts.lab_stack import RunningStack, flow_run, paused, resume_from_ui, start_from_ui, wait_for_state
from tests.hosts.patch_host import DEPLOYMENT, POLICY, HostMaker, PatchableHost

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

STILL_ON_1_0 = {"kind": "command", "command": "dpkg-query -W -f='${Version}' demo-web | grep -qx 1.0",
                "timeout_seconds": 60}


def asking_host(make: HostMaker, name: str, approval_minutes: float = 10) -> PatchableHost:
    """A patchable host whose policy takes a point before the install and asks before a rollback."""
    host = make(name)
    config = yaml.safe_load(host.config.read_text())
    config["hosts"][0]["disks"] = [{"name": "root", "path": str(host.lab.root), "kind": "directory"}]
    config["patch_policies"][POLICY].update({
        "approval_required": False, "health_probes": [STILL_ON_1_0],
        "recovery_point": {"take_before_install": True, "rollback": "ask",
                           "rollback_approval_minutes": approval_minutes}})
    host.config.write_text(yaml.safe_dump(config))
    return host


def paused_for_rollback(stack: RunningStack, run_id: str, host: PatchableHost) -> dict[str, Any]:
    """The run once it waits on the rollback's Resume form, the host patched and unhealthy."""
    run = paused(stack, run_id)
    assert run["state"]["state_details"]["pause_key"] == "rollback-batch-1", run["state"]
    keyset = run["state"]["state_details"]["run_input_keyset"]
    with stack.api() as api:
        schema = api.get(f"/flow_runs/{run_id}/input/{keyset['schema']}").json()
        question = api.get(f"/flow_runs/{run_id}/input/{keyset['description']}").json()
    assert "roll_back" in schema["required"], schema
    assert host.sshd.name in question and "points/" in question, question
    assert host.demo_web() == "1.1"
    # The history already says the host waits for the answer, should the run die now.
    [waiting] = host.records()
    assert waiting.recovery is not None and waiting.recovery.rollback is not None
    assert waiting.recovery.rollback.status == "awaiting-approval"
    return run


def test_an_approved_rollback_restores_the_pre_patch_point(ui_stack: RunningStack, patchable_host: HostMaker) -> None:
    host = asking_host(patchable_host, "rb-approved")
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    paused_for_rollback(ui_stack, run_id, host)

    assert resume_from_ui(ui_stack, run_id, {"roll_back": True, "comment": "INC-7"})["status"] == "ACCEPT"
    run = wait_for_state(ui_stack, run_id)

    # Rolled back and healthy again, and still a failed patch: the run ends Failed and says why.
    assert run["state"]["type"] == "FAILED", f"{run['state']}\n{ui_stack.logs()}"
    assert host.demo_web() == "1.0"
    [record] = host.records()
    assert record.status == "failed" and record.recovery is not None and record.recovery.rollback is not None
    rollback = record.recovery.rollback
    assert rollback.status == "restored" and rollback.probes_after == "passed", rollback
    assert [d.point for d in rollback.disks] == [p.point for p in record.recovery.points]
    assert "rolled back to the pre-patch point (root;" in record.reason and "waiting for approval" not in record.reason


def test_invalid_input_is_rejected_and_a_declined_rollback_leaves_the_host(
        ui_stack: RunningStack, patchable_host: HostMaker) -> None:
    host = asking_host(patchable_host, "rb-declined")
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    paused_for_rollback(ui_stack, run_id, host)
    for bad in ({"roll_back": "maybe"}, {"comment": "roll_back is missing"}):
        result = resume_from_ui(ui_stack, run_id, bad)
        assert result["status"] == "REJECT" and "roll_back" in result["details"]["reason"], (bad, result)
    time.sleep(3)  # several of the run's input polls
    assert flow_run(ui_stack, run_id)["state"]["type"] == "PAUSED" and host.demo_web() == "1.1"

    assert resume_from_ui(ui_stack, run_id, {"roll_back": False, "comment": "vendor hotfix coming"})["status"] == "ACCEPT"
    run = wait_for_state(ui_stack, run_id)

    assert run["state"]["type"] == "FAILED", f"{run['state']}\n{ui_stack.logs()}"
    said = "rollback not started: declined in the approval: vendor hotfix coming"
    assert f"rb-declined: {said}" in run["state"]["message"]
    assert host.demo_web() == "1.1"
    [record] = host.records()
    assert record.recovery is not None and record.recovery.rollback is not None
    assert record.recovery.rollback.status == "declined" and said in record.reason


def test_an_unanswered_rollback_is_not_started_and_the_run_says_so(
        ui_stack: RunningStack, patchable_host: HostMaker) -> None:
    host = asking_host(patchable_host, "rb-unanswered", approval_minutes=0.25)
    run_id = start_from_ui(ui_stack, DEPLOYMENT, config_path=str(host.config))
    paused_for_rollback(ui_stack, run_id, host)

    run = wait_for_state(ui_stack, run_id, timeout=300)

    said = ("rollback not started: nobody approved it within 0.25 min (rollback_approval_minutes); the host is left "
            "as patched for a person")
    assert run["state"]["type"] == "FAILED", f"{run['state']}\n{ui_stack.logs()}"
    assert f"rb-unanswered: {said}" in run["state"]["message"], run["state"]
    assert host.demo_web() == "1.1"
    [record] = host.records()
    assert record.recovery is not None and record.recovery.rollback is not None
    assert record.recovery.rollback.status == "unanswered" and said in record.reason
    assert [e["payload"]["status"] for e in alerts_about(ui_stack, "rb-unanswered")] == ["unanswered"]


def alerts_about(stack: RunningStack, host: str, deadline: float = 60.0) -> list[dict[str, Any]]:
    """The rollback-not-started events the server holds about a host, once there is one (events
    reach the API through a background worker; the deadline only guards against a hang)."""
    end = time.monotonic() + deadline
    with stack.api() as api:
        while True:
            found = api.post("/events/filter", json={"filter": {
                "event": {"name": ["patchdrill.patch.rollback-not-started"]},
                "resource": {"id": [f"patchdrill.host.{host}"]}}}).json()["events"]
            if found or time.monotonic() > end:
                return list(found)
            time.sleep(0.5)
