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

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from connectors.storage import LocalBlobStore
from flows.patch_run import PatchRunReport, patch_run
from tasks.patching.history import history
from tasks.patching.models import ComplianceState, HostPatchRecord
from tests.hosts.aptlab import REBOOT_POSTINST, AptLab
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import SshdHost
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
        self.reboots: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="reboot-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for host in list(self.hosts):
                if (host.run_dir / REBOOT_REQUEST).exists():
                    self.reboots[host.name] = self.reboots.get(host.name, 0) + 1
                    host.reboot(down_for=0.3)

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


def write_config(path: Path, hosts: list[dict[str, Any]], policy: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": hosts,
                                    "patch_policies": {"default": {"reboot_timeout_minutes": 3, **policy}}}))
    return path


def baseline_now() -> list[int]:
    return list(range(1, 13))


def hotpatch_now() -> list[int]:
    this_month = datetime.now(timezone.utc).month
    return [m for m in range(1, 13) if m != this_month]


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


def test_failed_health_probe_stops_the_rollout_before_the_next_update_domain(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    bad, spared = lab_host("budget-bad", 1, breaks_health=True), lab_host("budget-spared", 2)
    cfg = write_config(tmp_path / "fleet.yaml", [bad.config(), spared.config()],
                       {"baseline_months": baseline_now(), "max_errors": 0, "health_probes": [HEALTH_PROBE]})
    spared_boot = spared.sshd.boot_id

    report = patch_run(config_path=str(cfg))

    rows = records(report)
    assert rows["budget-bad"].status == "failed" and rows["budget-bad"].rebooted
    assert "health: command" in rows["budget-bad"].reason and "exited 1" in rows["budget-bad"].reason
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

    from tasks.patching.steps import reboot_limit_name, update_domain_slot

    host = lab_host("slot-busy", 7)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()], {"baseline_months": baseline_now()})
    boot_before = host.sshd.boot_id
    # Another run holds update domain 7 (its limit created as a run would create it).
    with update_domain_slot(7, timeout_seconds=30):
        report = patch_run(config_path=str(cfg), domain_slot_timeout_minutes=0.02)
    [record] = report.records
    assert record.status == "failed" and reboot_limit_name(7) in record.reason
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert host.sshd.boot_id == boot_before
    # Once released, the slot is free again for the next run.
    with concurrency(reboot_limit_name(7), occupy=1, timeout_seconds=30, strict=True):
        pass


def test_approval_pause_is_resumed_through_the_prefect_api(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.patch_run as patch_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(patch_flow, "APPROVAL_POLL_SECONDS", 1)
    host = lab_host("approve-me", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "approval_required": True})
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = patch_run(config_path=str(cfg), approval_timeout_minutes=5)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="paused-patch-run")
    worker.start()
    paused_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    paused = []
    while not paused and worker.is_alive():
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(flow_run_filter=paused_filter)
        time.sleep(0.2)
    assert paused, outcome.get("error")
    # Nothing is installed while the run waits for its approval.
    assert host.versions()["demo-web"] == "1.0"
    resume_flow_run(paused[0].id, run_input={"approve": True, "comment": "change 42"})
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    [record] = outcome["report"].records
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

    [record] = patch_run(config_path=str(cfg)).records

    assert record.status == "skipped"
    assert record.reason == ("pre hook \"echo 'load balancer still sends traffic' >&2; exit 4\" exited 4: "
                             "load balancer still sends traffic")
    assert host.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}


def test_cli_assess_and_dry_run_report_without_changing_the_host(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

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

    from flows.cli import app

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
