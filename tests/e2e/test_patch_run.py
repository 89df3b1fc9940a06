"""Whole patch runs on a real Prefect test server, over real hosts.

Linux hosts are real sshd servers in their own mount namespace, each with its own sandboxed
real apt and dpkg (tests/hosts/aptlab.py) reached through sshd's SetEnv. The demo-kernel
security update's postinst writes /run/reboot-required, as Debian's kernel packages do. The
product reboots a host with `shutdown -r now`; on these test hosts `shutdown` (first on the
session's PATH) only leaves a request in the host's private /run, and the test's watcher turns
that into SshdHost.reboot(): sshd goes down and comes back with a new boot id and an empty
/run. The Windows host is the WinRM test host with the simulated Windows Update of
tests/hosts/wu_sim.py (what is simulated is listed there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from uuid import UUID

import pytest
import yaml

from prefect.client.schemas.objects import State

from connectors.stores import LocalBlobStore
from flows.patch import PatchRunReport, patch_run
from tasks.patching.history import history
from tasks.patching.models import ComplianceState, HostPatchRecord
from tests.alert_checks import alerts_section, events, run_record
from tests.config_reads import count_config_reads
from tests.hosts.aptlab import REBOOT_POSTINST, AptLab
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import SshdHost
from tests.hosts.webhook import WebhookReceiver
from tests.hosts.winrm import HostFactory
from tests.hosts.wu_sim import SimulatedUpdate, SimulatedWindowsUpdate

pytestmark = pytest.mark.e2e

# Generous: the machine may be shared and busy; nothing here measures speed.
SLOW_HOST_SECONDS = 60.0
ALWAYS_OPEN = [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "duration_minutes": 1440}]
REBOOT_REQUEST = "patchdrill-test-reboot"
# The test host's power button: the watcher reboots the host, which kills this session as a
# real shutdown does, so the product reconnects only once the host is down.
SHUTDOWN_STUB = f"#!/bin/sh\ntouch /run/{REBOOT_REQUEST}\nexec sleep 60\n"
HEALTH_PROBE = {"kind": "command", "command": 'grep -qx ok "$DPKG_ROOT/etc/demo/health"',
                "timeout_seconds": SLOW_HOST_SECONDS}
# An update that breaks the application it patches: its host fails the health probe afterwards.
BREAKING_POSTINST = REBOOT_POSTINST + 'echo broken > "$DPKG_ROOT/etc/demo/health"\n'


@dataclass
class LabHost:
    """One Linux test host: sshd in its own namespace with its own apt root."""

    sshd: SshdHost
    lab: AptLab
    update_domain: int
    windows: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.sshd.name

    def config(self) -> dict[str, Any]:
        host = self.sshd.host_config(update_domain=self.update_domain, groups=["lab"],
                                     maintenance_windows=self.windows, connect_timeout=SLOW_HOST_SECONDS)
        return host.model_dump(mode="json", exclude_none=True)

    def versions(self) -> dict[str, str | None]:
        return {name: self.lab.installed_version(name) for name in ("demo-web", "demo-kernel", "demo-db")}

    @property
    def reboot_required(self) -> bool:
        return (self.sshd.run_dir / "reboot-required").exists()


class RebootWatcher:
    """Turns the stub `shutdown` requests of the hosts into simulated reboots."""

    def __init__(self) -> None:
        self.hosts: list[SshdHost] = []
        #: How long a simulated reboot keeps a host down before its sshd starts again.
        self.down_for = 0.3
        self.reboots: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="reboot-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for host in list(self.hosts):
                if (host.run_dir / REBOOT_REQUEST).exists():
                    self.reboots[host.name] = self.reboots.get(host.name, 0) + 1
                    host.reboot(down_for=self.down_for)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def reboot_watcher() -> Iterator[RebootWatcher]:
    watcher = RebootWatcher()
    yield watcher
    watcher.close()


LabMaker = Callable[..., LabHost]


@pytest.fixture
def lab_host(sshd_factory: SshdMaker, tmp_path_factory: pytest.TempPathFactory,
             reboot_watcher: RebootWatcher) -> LabMaker:
    def make(name: str, update_domain: int, *, windows: list[dict[str, Any]] | None = None,
             breaks_health: bool = False) -> LabHost:
        base = tmp_path_factory.mktemp(f"lab-{name}")
        lab = AptLab(base).create()
        # Maintenance scripts write $DPKG_ROOT/run/reboot-required: make that the host's own /run.
        (lab.root / "run").rmdir()
        (lab.root / "run").symlink_to("/run")
        (lab.root / "etc/demo").mkdir(parents=True)
        (lab.root / "etc/demo/health").write_text("ok\n")
        for package in ("demo-web", "demo-kernel", "demo-db"):
            lab.install_base(package, "1.0")
        lab.publish("security", "demo-web", "1.1")
        lab.publish("security", "demo-kernel", "1.1", postinst=BREAKING_POSTINST if breaks_health else REBOOT_POSTINST)
        lab.publish("main", "demo-db", "1.2")
        lab.apt_get("update")
        stubs = base / "bin"
        stubs.mkdir()
        (stubs / "shutdown").write_text(SHUTDOWN_STUB)
        (stubs / "shutdown").chmod(0o755)
        setenv = {**lab.env, "PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin"}
        sshd = sshd_factory(name, namespace=True, extra_config={"SetEnv": setenv})
        reboot_watcher.hosts.append(sshd)
        return LabHost(sshd=sshd, lab=lab, update_domain=update_domain,
                       windows=ALWAYS_OPEN if windows is None else windows)

    return make


def write_config(path: Path, hosts: list[dict[str, Any]], policy: dict[str, Any],
                 alerts: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": hosts,
                                    "patch_policies": {"default": {"reboot_timeout_minutes": 3, **policy}},
                                    **({"alerts": alerts} if alerts else {})}))
    return path


def baseline_now() -> list[int]:
    return list(range(1, 13))


def hotpatch_now() -> list[int]:
    this_month = datetime.now(timezone.utc).month
    return [m for m in range(1, 13) if m != this_month]


def run_patch(**parameters: Any) -> tuple[State[Any], PatchRunReport]:
    """Run the flow; its final state as the Prefect server holds it, and its report."""
    from prefect.client.orchestration import get_client

    state = patch_run(return_state=True, **parameters)
    report = state.result(raise_on_failure=False)
    assert isinstance(report, PatchRunReport), f"{state.name}: {state.message}: {report!r}"
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).state
    assert stored is not None
    return stored, report


def cancel_as_the_ui_does(run_id: UUID) -> None:
    """What the Prefect UI's Cancel does to a run: Cancelling, on the server."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        assert client.set_flow_run_state(run_id, Cancelling(message="cancelled in the UI")).state.is_cancelling()


def cancelled_while_paused(worker: threading.Thread, outcome: dict[str, Any]) -> tuple[UUID, Any]:
    """Cancel the run once it is paused, as the UI does; its id and what the run returned,
    which must come well before any pause's deadline (the tests give those hours)."""
    paused = paused_run(worker, outcome)
    cancel_as_the_ui_does(paused)
    worker.join(120)
    assert not worker.is_alive(), "the run kept waiting in its pause after the cancellation"
    return paused, joined(worker, outcome)


def records(report: PatchRunReport) -> dict[str, HostPatchRecord]:
    return {r.host: r for r in report.records}


def states(record: HostPatchRecord) -> dict[str, ComplianceState]:
    return {o.update_id: o.state for o in record.updates}


def run_artifacts(run_id: str) -> dict[str, Any]:
    """The run's artifacts by key, read back from the Prefect server."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))
    return {a.key: (json.loads(a.data) if a.type == "table" else a.data) for a in found if a.key}


def in_thread(target: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test that joins
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, outcome


def joined(thread: threading.Thread, outcome: dict[str, Any]) -> Any:
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def paused_run(worker: threading.Thread, outcome: dict[str, Any]) -> UUID:
    """The id of the flow run paused for approval, once the server has it so."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    paused_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    paused = []
    while not paused and worker.is_alive():
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=paused_filter)
        time.sleep(0.2)
    assert paused, outcome
    return paused[0].id


def test_dry_run_plans_batches_and_touches_nothing(prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    a, b = lab_host("dry-a", 1), lab_host("dry-b", 2)
    closed = lab_host("dry-closed", 1, windows=[])
    gone = {"name": "dry-gone", "transport": "ssh", "address": "127.0.0.1", "port": 1, "user": "root",
            "connect_timeout": 1, "update_domain": 3}
    cfg = write_config(tmp_path / "fleet.yaml", [a.config(), b.config(), closed.config(), gone],
                       {"baseline_months": baseline_now(), "max_concurrency": 1})
    boots = {h.name: h.sshd.boot_id for h in (a, b, closed)}

    report = patch_run(config_path=str(cfg), dry_run=True)

    assert [(batch.update_domain, batch.hosts) for batch in report.plan.batches] == [(1, ["dry-a"]), (2, ["dry-b"])]
    assert "outside its maintenance window (no maintenance window)" in report.plan.skipped["dry-closed"]
    assert sorted(report.plan.expected_reboots) == []  # apt cannot say a reboot is certain
    assert "unreachable" in report.assessment.errors["dry-gone"]
    plans = {p.host: p for p in report.assessment.plans}
    assert sorted(u.id for u in plans["dry-a"].install) == ["demo-kernel=1.1", "demo-web=1.1"]
    assert {o.update_id: o.state for o in plans["dry-a"].held} == {"demo-db=1.2": ComplianceState.EXCLUDED}
    for host in (a, b, closed):
        assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
        assert host.sshd.boot_id == boots[host.name] and not host.reboot_required
    assert not (tmp_path / "store").exists(), "a dry run writes no enrollment or history record"


def test_patch_run_reboots_through_the_gate_and_records_history(
        prefect_server: None, lab_host: LabMaker, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    linux = lab_host("run-linux", 1)
    closed = lab_host("run-closed", 1, windows=[])
    winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
    wu = SimulatedWindowsUpdate(winrm, [
        SimulatedUpdate("KB5050001", "2026-11 Cumulative Update for Windows Server", reboot_behaviour="always"),
        SimulatedUpdate("KB5050002", "Update for Microsoft Defender", classification="Definition Updates",
                        reboot_behaviour="never"),
    ], caption="Microsoft Windows Server 2022 Datacenter").attach()
    windows = winrm.host_config("run-win", connect_timeout=SLOW_HOST_SECONDS, update_domain=2, groups=["lab"],
                                maintenance_windows=ALWAYS_OPEN)
    cfg = write_config(tmp_path / "fleet.yaml",
                       [linux.config(), closed.config(), windows.model_dump(mode="json", exclude_none=True)],
                       {"baseline_months": baseline_now()})
    boot_before, win_boot_before = linux.sshd.boot_id, winrm.boot_time

    report = patch_run(config_path=str(cfg))

    assert report.plan.expected_reboots == ["run-win"]  # its cumulative update always reboots
    rows = records(report)
    assert rows["run-linux"].status == "succeeded", rows["run-linux"].reason
    assert linux.versions() == {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}
    assert states(rows["run-linux"]) == {"demo-kernel=1.1": ComplianceState.INSTALLED,
                                         "demo-web=1.1": ComplianceState.INSTALLED,
                                         "demo-db=1.2": ComplianceState.EXCLUDED}
    # The gate waited for a real new boot: a new boot id, and the reboot-required flag gone with /run.
    assert rows["run-linux"].rebooted and linux.sshd.boot_id != boot_before
    assert rows["run-linux"].boot_id_before == boot_before and rows["run-linux"].boot_id_after == linux.sshd.boot_id
    assert not linux.reboot_required

    assert rows["run-win"].status == "succeeded", rows["run-win"].reason
    assert wu.installed == {"KB5050001"} and wu.reboots == 1 and winrm.boot_time != win_boot_before
    assert states(rows["run-win"]) == {"KB5050001": ComplianceState.INSTALLED, "KB5050002": ComplianceState.EXCLUDED}

    assert rows["run-closed"].status == "skipped" and "maintenance window" in rows["run-closed"].reason
    assert closed.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}

    artifacts = run_artifacts(report.run_id)
    table = {(row["host"], row["update"]): row["state"] for row in artifacts["patch-all-compliance"]}
    assert table[("run-win", "KB5050001")] == "Installed" and table[("run-closed", "demo-web=1.1")] == "Missing"
    assert "| run-linux | succeeded | yes | 2 | 0 | 0 | 0 | reboot pending |" in artifacts["patch-all-summary"]

    store = LocalBlobStore(tmp_path / "store")
    stored = history(store, "run-linux")
    assert [(r.run_id, r.status, r.rebooted) for r in stored] == [(report.run_id, "succeeded", True)]
    assert history(store, "run-closed")[0].status == "skipped"
    assert store.exists("enrollments/run-win.json")


def test_a_patch_run_reads_its_config_once_and_hands_tasks_typed_models(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Survey, install, reboot gate, health probes and history writes all run, yet the config
    file is parsed once: the tasks get the hosts, the policy and the store, not the path."""
    host, closed = lab_host("once-a", 1), lab_host("once-closed", 1, windows=[])
    cfg = write_config(tmp_path / "fleet.yaml", [host.config(), closed.config()],
                       {"baseline_months": baseline_now(), "health_probes": [HEALTH_PROBE]})
    reads = count_config_reads(monkeypatch)

    state, report = run_patch(config_path=str(cfg))

    rows = records(report)
    assert state.is_completed() and rows["once-a"].status == "succeeded" and rows["once-a"].rebooted
    assert rows["once-closed"].status == "skipped"
    store = LocalBlobStore(tmp_path / "store")
    assert [r.status for r in history(store, "once-a")] == ["succeeded"] and store.exists("enrollments/once-a.json")
    assert history(store, "once-closed")[0].status == "skipped"
    assert reads == [str(cfg)]


def test_failed_health_probe_stops_the_rollout_before_the_next_update_domain(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    bad, spared = lab_host("budget-bad", 1, breaks_health=True), lab_host("budget-spared", 2)
    # The same check as a script on the controller, named relative to the config file.
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "health.sh").write_text('grep -qx ok "$DPKG_ROOT/etc/demo/health"\n')
    script_probe = {"kind": "script", "script": "checks/health.sh", "name": "health script", "timeout_seconds": 60}
    cfg = write_config(tmp_path / "fleet.yaml", [bad.config(), spared.config()],
                       {"baseline_months": baseline_now(), "max_errors": 0, "health_probes": [HEALTH_PROBE, script_probe]})
    spared_boot = spared.sshd.boot_id

    state, report = run_patch(config_path=str(cfg))

    # A stopped rollout fails the run (an "on Failed" automation fires), its artifacts still published.
    assert state.is_failed() and "rollout stopped" in (state.message or "") and "budget-bad" in (state.message or "")
    assert {"patch-all-compliance", "patch-all-summary"} <= set(run_artifacts(report.run_id))
    rows = records(report)
    assert rows["budget-bad"].status == "failed" and rows["budget-bad"].rebooted
    assert "health: command" in rows["budget-bad"].reason and "exited 1" in rows["budget-bad"].reason
    assert "health script: exited 1, expected 0" in rows["budget-bad"].reason
    assert report.stopped and "exceed the budget of 0" in report.stopped
    assert rows["budget-spared"].status == "skipped" and rows["budget-spared"].reason == report.stopped
    # The other update domain was never touched.
    assert spared.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert spared.sshd.boot_id == spared_boot and not spared.reboot_required
    assert {o.state for o in rows["budget-spared"].updates if o.update_id != "demo-db=1.2"} == {ComplianceState.MISSING}


def test_hotpatch_month_installs_only_hotpatches_and_does_not_reboot(
        prefect_server: None, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
    wu = SimulatedWindowsUpdate(winrm, [
        SimulatedUpdate("KB5060001", "2026-11 Hotpatch for Windows Server Azure Edition", hotpatch=True),
        SimulatedUpdate("KB5060002", "2026-11 Cumulative Update for Windows Server", reboot_behaviour="always"),
    ]).attach()
    windows = winrm.host_config("hot-win", connect_timeout=SLOW_HOST_SECONDS, maintenance_windows=ALWAYS_OPEN)
    cfg = write_config(tmp_path / "fleet.yaml", [windows.model_dump(mode="json", exclude_none=True)],
                       {"baseline_months": hotpatch_now(), "reboot": "Always"})
    boot_before = winrm.boot_time

    report = patch_run(config_path=str(cfg))

    [record] = report.records
    assert record.month_kind == "hotpatch" and record.status == "succeeded", record.reason
    assert wu.installed == {"KB5060001"} and wu.install_requests == [["KB5060001"]]
    assert states(record)["KB5060002"] is ComplianceState.MISSING
    assert "waits for the baseline of" in {o.update_id: o.reason for o in record.updates}["KB5060002"]
    # Even a policy of Always does not reboot a hotpatching host in a hotpatch month.
    assert not record.rebooted and wu.reboots == 0 and winrm.boot_time == boot_before


def test_a_busy_update_domain_slot_keeps_a_second_run_off_the_domain(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    from prefect.concurrency.sync import concurrency

    from tasks.patching.slots import reboot_limit_name, update_domain_slot

    host = lab_host("slot-busy", 7)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    boot_before = host.sshd.boot_id
    # Another run holds update domain 7 (its limit created as a run would create it).
    with update_domain_slot(7, timeout_seconds=30):
        state, report = run_patch(config_path=str(cfg), domain_slot_timeout_minutes=0.02)
    assert state.is_failed() and "slot-busy" in (state.message or "")
    [record] = report.records
    assert record.status == "failed" and reboot_limit_name(7) in record.reason
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert host.sshd.boot_id == boot_before
    # Once released, the slot is free again for the next run.
    with concurrency(reboot_limit_name(7), occupy=1, timeout_seconds=30, strict=True):
        pass


def test_approval_pause_is_resumed_through_the_prefect_api(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.patch as patch_flow
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(patch_flow, "APPROVAL_POLL_SECONDS", 1)
    host = lab_host("approve-me", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "approval_required": True})
    worker, outcome = in_thread(lambda: patch_run(config_path=str(cfg), approval_timeout_minutes=5), "paused-patch-run")
    paused = paused_run(worker, outcome)
    # Nothing is installed while the run waits for its approval.
    assert host.versions()["demo-web"] == "1.0"
    resume_flow_run(paused, run_input={"approve": True, "comment": "change 42"})
    [record] = joined(worker, outcome).records
    assert record.status == "succeeded", record.reason
    assert host.versions() == {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}


def test_window_override_installs_but_holds_the_reboot_back(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    host = lab_host("override", 1, windows=[])
    hooks = host.lab.root / "etc/demo/hooks"
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {
        "baseline_months": baseline_now(),
        "pre_hooks": ['echo "pre $(cat "$DPKG_ROOT/usr/share/demo-web/version")" > "$DPKG_ROOT/etc/demo/hooks"'],
        "post_hooks": ['echo "post $(cat "$DPKG_ROOT/usr/share/demo-web/version")" >> "$DPKG_ROOT/etc/demo/hooks"']})
    boot_before = host.sshd.boot_id

    report = patch_run(config_path=str(cfg), ignore_windows=True)

    [record] = report.records
    assert record.status == "succeeded" and not record.rebooted
    assert "outside the maintenance window" in record.reason
    assert set(states(record).values()) == {ComplianceState.INSTALLED_PENDING_REBOOT, ComplianceState.EXCLUDED}
    assert host.versions()["demo-kernel"] == "1.1" and host.reboot_required and host.sshd.boot_id == boot_before
    assert hooks.read_text() == "pre 1.0\npost 1.1\n"  # before and after the install, on the host


def test_a_failing_pre_hook_skips_the_host_untouched(prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    host = lab_host("drained", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {
        "baseline_months": baseline_now(), "max_errors": 1,
        "pre_hooks": ["echo 'load balancer still sends traffic' >&2; exit 4"]})

    state, report = run_patch(config_path=str(cfg))
    [record] = report.records

    assert state.is_failed() and "drained" in (state.message or "")
    assert record.status == "skipped"
    assert record.reason == ("pre hook \"echo 'load balancer still sends traffic' >&2; exit 4\" exited 4: "
                             "load balancer still sends traffic")
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    # A skipped host still misses everything it missed, in its record and the compliance table.
    assert states(record) == {"demo-kernel=1.1": ComplianceState.MISSING, "demo-web=1.1": ComplianceState.MISSING,
                              "demo-db=1.2": ComplianceState.EXCLUDED}
    table = {row["update"]: row["state"] for row in run_artifacts(report.run_id)["patch-all-compliance"]}
    assert table == {"demo-kernel=1.1": "Missing", "demo-web=1.1": "Missing", "demo-db=1.2": "Excluded"}
    assert "| drained | skipped | no | 0 | 0 | 2 | 0 |" in run_artifacts(report.run_id)["patch-all-summary"]


def test_cli_assess_and_dry_run_report_without_changing_the_host(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    host = lab_host("cli-host", 4)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    runner = CliRunner()

    assessed = runner.invoke(app, ["patch", "assess", "--config", str(cfg), "--json"])
    assert assessed.exit_code == 0, assessed.output
    [plan] = json.loads(assessed.stdout)["plans"]
    assert sorted(u["id"] for u in plan["install"]) == ["demo-kernel=1.1", "demo-web=1.1"]

    planned = runner.invoke(app, ["patch", "run", "--config", str(cfg), "--group", "lab", "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert "Dry run" in planned.output and "batch 1  update domain 4  cli-host" in planned.output

    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert not host.reboot_required and not (tmp_path / "store").exists()


def test_cli_assess_surveys_each_host_in_one_connection_and_one_session(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    host = lab_host("survey-host", 5)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    seen = host.sshd.log_path.read_text(errors="replace")
    for extra in ([], ["--no-refresh", "--forks", "1"]):
        assessed = CliRunner().invoke(app, ["patch", "assess", "--config", str(cfg), "--json", *extra])
        assert assessed.exit_code == 0, assessed.output
        [plan] = json.loads(assessed.stdout)["plans"]
        assert sorted(u["id"] for u in plan["install"]) == ["demo-kernel=1.1", "demo-web=1.1"]
        log = host.sshd.log_path.read_text(errors="replace")
        new, seen = log[len(seen):], log
        assert (new.count("Connection from "), new.count("Starting session: ")) == (1, 1), new
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert not host.reboot_required and not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- outcomes and read-only words


class LogWatch(logging.Handler):
    """The product's log events as this process emits them (rendered lines), for a test to wait
    on a step it cannot see from outside (a run waiting for a slot, an assessment retried)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def seen(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))


@pytest.fixture
def log_watch() -> Iterator[LogWatch]:
    watch, logger = LogWatch(), logging.getLogger("patchdrill")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


def flow_run_state(run_id: str) -> State[Any]:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    assert state is not None
    return state


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under a host's apt root (the dpkg status, the package lists, the
    caches), by path; the root's `run` is the host's shared /run, not apt's."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file() and not path.is_symlink() and path.relative_to(root).parts[0] != "run"}


def test_hotpatch_month_patches_linux_and_ordinary_windows_hosts_like_any_month(
        prefect_server: None, lab_host: LabMaker, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    linux = lab_host("monthly-linux", 1)
    winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
    wu = SimulatedWindowsUpdate(winrm, [
        SimulatedUpdate("KB5070001", "2026-12 Security Update for .NET Framework", reboot_behaviour="never"),
    ], caption="Microsoft Windows Server 2022 Datacenter").attach()  # not Azure Edition: never hotpatches
    windows = winrm.host_config("monthly-win", connect_timeout=SLOW_HOST_SECONDS, update_domain=2,
                                maintenance_windows=ALWAYS_OPEN)
    # The policy says nothing of between_baselines: the default must patch these hosts.
    cfg = write_config(tmp_path / "fleet.yaml", [linux.config(), windows.model_dump(mode="json", exclude_none=True)],
                       {"baseline_months": hotpatch_now()})

    result = CliRunner().invoke(app, ["patch", "run", "--config", str(cfg), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert flow_run_state(report["run_id"]).is_completed()
    rows = {r["host"]: r for r in report["records"]}
    assert {r["month_kind"] for r in rows.values()} == {"hotpatch"}
    assert rows["monthly-linux"]["status"] == "succeeded" and rows["monthly-linux"]["rebooted"]
    assert linux.versions() == {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}
    assert rows["monthly-win"]["status"] == "succeeded", rows["monthly-win"]["reason"]
    assert {o["update_id"]: o["state"] for o in rows["monthly-win"]["updates"]} == {"KB5070001": "Installed"}
    assert wu.installed == {"KB5070001"}


def test_rejected_approval_cancels_the_run_with_the_approvers_comment(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.patch as patch_flow
    from prefect.flow_runs import resume_flow_run
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr(patch_flow, "APPROVAL_POLL_SECONDS", 1)
    host = lab_host("reject-me", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "approval_required": True})
    worker, outcome = in_thread(lambda: CliRunner().invoke(
        app, ["patch", "run", "--config", str(cfg), "--wait-for-approval", "--json"]), "rejected-patch-run")
    paused = paused_run(worker, outcome)
    resume_flow_run(paused, run_input={"approve": False, "comment": "change freeze until Friday"})
    result = joined(worker, outcome)

    assert result.exit_code == 3, result.output
    state = flow_run_state(str(paused))
    assert state.is_cancelled() and state.message == "change freeze until Friday"
    [record] = json.loads(result.stdout)["records"]
    assert record["status"] == "skipped" and record["reason"] == "not approved: change freeze until Friday"
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    table = {row["update"]: row["state"] for row in run_artifacts(str(paused))["patch-all-compliance"]}
    assert table == {"demo-kernel=1.1": "Missing", "demo-web=1.1": "Missing", "demo-db=1.2": "Excluded"}


def test_a_run_cancelled_in_prefect_while_it_waits_for_approval_ends_cancelled_at_once(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI's Cancel on a run paused for approval: the run notices at its next poll (not at
    the approval's deadline), installs nothing and ends Cancelled, the one state a cancelling
    run may reach (it used to stay Cancelling for good after an error at the deadline)."""
    import flows.patch as patch_flow
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr(patch_flow, "APPROVAL_POLL_SECONDS", 1)
    host = lab_host("cancel-me", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "approval_required": True})
    worker, outcome = in_thread(lambda: CliRunner().invoke(
        app, ["patch", "run", "--config", str(cfg), "--wait-for-approval", "--json"]),
        "cancelled-patch-run")
    paused, result = cancelled_while_paused(worker, outcome)

    assert result.exit_code == 3, result.output
    state = flow_run_state(str(paused))
    assert state.is_cancelled(), state
    assert "stopped while waiting for approval: cancelled in Prefect" in (state.message or ""), state.message
    [record] = json.loads(result.stdout)["records"]
    assert record["status"] == "skipped" and record["reason"].startswith("stopped while waiting for approval")
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}


def test_ctrl_c_lets_the_running_batch_finish_and_starts_no_other_update_domain(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    """`patchdrill patch run` sent SIGINT (a terminal's Ctrl-C) while update domain 0 installs:
    that batch ends and is recorded (never a host left mid-install without a record), domain 1
    is never started, the command exits 3 and the run is Cancelled, saying why. A pre-install
    hook that marks the moment and waits is what makes "while it installs" certain."""
    import signal

    from prefect.settings import get_current_settings

    marker = tmp_path / "installing"
    first, second = lab_host("ctrl-c-first", 0), lab_host("ctrl-c-second", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [first.config(), second.config()], {
        "baseline_months": baseline_now(), "max_errors": 5,
        "pre_hooks": [f"if [ ! -e {marker} ]; then touch {marker}; sleep 3; fi"]})
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as sink:
        process = subprocess.Popen([str(Path(sys.executable).with_name("patchdrill")), "patch", "run", "--config",
                                    str(cfg), "--no-refresh", "--json"], env=env, stdout=subprocess.PIPE,
                                   stderr=sink, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the first host's install never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 3, stderr.read_text()[-3000:]
    report = json.loads(out)
    found = {r["host"]: r for r in report["records"]}
    assert found["ctrl-c-first"]["status"] == "succeeded", found["ctrl-c-first"]
    assert first.versions()["demo-web"] == "1.1"
    assert found["ctrl-c-second"]["status"] == "skipped"
    assert found["ctrl-c-second"]["reason"] == "interrupted by SIGINT: no new batch was started"
    assert second.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    state = flow_run_state(report["run_id"])
    assert state.is_cancelled() and (state.message or "").startswith("stopped: interrupted by SIGINT"), state
    assert "Traceback" not in stderr.read_text()


def test_a_failed_install_fails_the_run_and_the_command_and_alerts(prefect_server: None, lab_host: LabMaker,
                                                                   tmp_path: Path, webhook: WebhookReceiver) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    host = lab_host("install-fails", 1)
    host.lab.publish("security", "demo-web", "1.3", postinst="#!/bin/sh\necho 'cannot migrate' >&2\nexit 1\n")
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now(), "max_errors": 1},
                       alerts=alerts_section())

    result = CliRunner().invoke(app, ["patch", "run", "--config", str(cfg), "--json"])

    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    [record] = report["records"]
    assert record["status"] == "failed" and report["stopped"] is None
    assert {o["update_id"]: o["state"] for o in record["updates"]}["demo-web=1.3"] == "Failed"
    state = flow_run_state(report["run_id"])
    assert state.is_failed() and state.message == "1 host(s) not patched: install-fails"
    artifacts = run_artifacts(report["run_id"])
    assert {row["update"]: row["state"] for row in artifacts["patch-all-compliance"]}["demo-web=1.3"] == "Failed"
    # The failed run's alert: at the webhook and as a Prefect event, saying which host failed.
    [post] = webhook.wait_for("patchdrill.run.failed")
    assert post["payload"]["run_id"] == report["run_id"] and post["payload"]["flow"] == "patch-run"
    assert "1 host(s) not patched: install-fails" in post["text"]
    [event] = events("patchdrill.run.failed", f"patchdrill.run.{report['run_id']}")
    assert event.payload["message"] == "1 host(s) not patched: install-fails"
    assert all(webhook.token not in text for text in run_record(report["run_id"], "alert.posted").values())


def test_assess_and_dry_run_say_they_refresh_lists_and_no_refresh_changes_nothing(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    host = lab_host("read-only", 1)
    host.lab.publish("main", "demo-db", "1.3")  # published after the host last refreshed its lists
    # apt reads a file: repository in place, so publishing made the host's caches stale, which
    # no http repository can do between two refreshes: rebuild them as the last refresh did.
    subprocess.run(["apt-cache", "gencaches"], env={**os.environ, **host.lab.env}, check=True, capture_output=True)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    runner, before = CliRunner(), tree_digest(host.lab.root)

    for command in (["patch", "assess"], ["patch", "run", "--dry-run"]):
        result = runner.invoke(app, [*command, "--config", str(cfg), "--no-refresh"])
        assert result.exit_code == 0, result.output
        assert "nothing on any host changed" in result.output and "refreshed" not in result.output
        assert tree_digest(host.lab.root) == before, command  # dpkg status, lists, caches: byte for byte

    assessed = runner.invoke(app, ["patch", "assess", "--config", str(cfg), "--json"])
    assert assessed.exit_code == 0, assessed.output
    report = json.loads(assessed.stdout)
    assert report["refreshed"] == ["read-only"]
    assert "demo-db=1.3" in {held["update_id"] for held in report["plans"][0]["held"]}  # the refresh saw it
    for command in (["patch", "assess"], ["patch", "run", "--dry-run"]):
        said = runner.invoke(app, [*command, "--config", str(cfg)])
        assert said.exit_code == 0, said.output
        assert "package lists of 1 host(s) were refreshed (read-only)" in " ".join(said.output.split()), command

    after = tree_digest(host.lab.root)
    lists = [path for path in before if path.startswith("var/lib/apt/lists/")]
    assert [after.get(path) for path in lists] != [before[path] for path in lists], "the refresh rewrote the lists"
    assert {p: d for p, d in after.items() if p.startswith("var/lib/dpkg/")} == \
        {p: d for p, d in before.items() if p.startswith("var/lib/dpkg/")}
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}


def test_two_runs_never_work_on_one_host_at_once(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, log_watch: LogWatch) -> None:
    from tasks.patching.slots import host_limit_name

    host = lab_host("contended", 1)
    started, release = host.lab.root / "hook-started", host.lab.root / "hook-release"
    # The first run's pre-hook keeps it on the host until the test lets go (at most 2 minutes).
    hook = (f'touch {started}; i=0; while [ ! -e {release} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done')
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "pre_hooks": [hook]})

    first, first_outcome = in_thread(lambda: run_patch(config_path=str(cfg)), "first-run")
    while first.is_alive() and not started.exists():
        time.sleep(0.05)
    assert started.exists(), first_outcome
    connections = host.sshd.log_path.read_text(errors="replace").count("Connection from ")
    second, second_outcome = in_thread(lambda: run_patch(config_path=str(cfg)), "second-run")
    waiting = f"limit={host_limit_name('contended')}"
    while second.is_alive() and not log_watch.seen(waiting) and \
            host.sshd.log_path.read_text(errors="replace").count("Connection from ") == connections:
        time.sleep(0.05)
    # The second run waits for the host's slot before it even connects (its list refresh would
    # collide with the first run's apt).
    assert log_watch.seen(waiting) and host.sshd.log_path.read_text(errors="replace").count(
        "Connection from ") == connections, "the second run reached the host while the first worked on it"
    release.touch()

    first_state, first_report = joined(first, first_outcome)
    second_state, second_report = joined(second, second_outcome)
    assert first_state.is_completed() and second_state.is_completed(), (first_state, second_state)
    assert records(first_report)["contended"].status == "succeeded"
    assert host.versions() == {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}
    # The second run assessed the host after the first had patched it: nothing left to install.
    [plan] = second_report.assessment.plans
    assert plan.install == [] and records(second_report)["contended"].status == "succeeded"


def test_a_package_lock_held_on_the_host_is_waited_out(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, log_watch: LogWatch) -> None:
    import fcntl

    host = lab_host("apt-busy", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    # Another apt-get update on the host (unattended-upgrades, an operator) holds the lists lock.
    lock = os.open(host.lab.root / "var/lib/apt/lists/lock", os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        run, outcome = in_thread(lambda: run_patch(config_path=str(cfg)), "run-behind-apt")
        while run.is_alive() and not log_watch.seen("assessment retried"):
            time.sleep(0.05)
    finally:
        os.close(lock)
    state, report = joined(run, outcome)

    assert log_watch.seen("Could not get lock")
    assert state.is_completed(), state.message
    assert records(report)["apt-busy"].status == "succeeded"
    assert host.versions() == {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}
