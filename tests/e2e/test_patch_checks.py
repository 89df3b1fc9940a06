"""A patch run's safety net on real hosts: measured unavailability, the clock check, notices.

The hosts are tests/e2e/test_patch_run.py's: real sshd servers in their own mount namespace,
each with a sandboxed real apt, whose `shutdown` asks the test's watcher for a simulated reboot
(sshd killed, a new boot id, sshd started again after `down_for` seconds). The reboot's real
length is taken on the host's side (SshdHost.outages: from the kill to sshd listening again),
not from anything the product reports. The clock tests fake the host's time source with a
`date` wrapper on its PATH (fake_time_source says what else it stubs); the notice tests run
real hooks: a shell command on the controller, one on the host, and a webhook receiver on
loopback (tests/hosts/webhook.py) that answers with a deferral. The Windows tests use the
WinRM test host: real WS-Management, logins and outages, simulated Windows (each test's
docstring says where the simulation starts).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from connectors.stores import LocalBlobStore
from tasks.patching.history import history
from tests.e2e.test_patch_run import (  # noqa: F401 - lab_host and reboot_watcher are fixtures
    ALWAYS_OPEN, HEALTH_PROBE, LabHost, LabMaker, RebootWatcher, baseline_now, hotpatch_now, lab_host,
    reboot_watcher, records, run_artifacts, run_patch, write_config,
)
from tests.hosts.webhook import WebhookReceiver
from tests.hosts.winrm import HostFactory
from tests.hosts.wsman_sim import Invocation, SimResult
from tests.hosts.wu_sim import SimulatedUpdate, SimulatedWindowsUpdate

pytestmark = pytest.mark.e2e

INTERVAL = 0.25
# Several intervals long, so the figure is a measurement and not a rounding of one probe.
DOWN_FOR = 1.5


def test_unavailability_is_measured_within_one_probe_interval_of_the_real_reboot(
        prefect_server: None, lab_host: LabMaker, reboot_watcher: RebootWatcher, tmp_path: Path) -> None:
    """No health probes: a connect over SSH measures it. A health-probed host in the next update
    domain is measured by its probe, and a host that does not reboot shows no outage."""
    reboot_watcher.down_for = DOWN_FOR
    plain = lab_host("down-plain", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [plain.config()],
                       {"baseline_months": baseline_now(), "unavailability": {"interval_seconds": INTERVAL}})

    state, report = run_patch(config_path=str(cfg))

    assert state.is_completed(), state.message
    record = records(report)["down-plain"]
    assert record.rebooted
    [(went_down, came_back)] = plain.sshd.outages
    real = came_back - went_down
    measured = record.unavailability
    assert measured is not None and measured.probe == "ssh connect" and measured.interval_seconds == INTERVAL
    [outage] = measured.outages
    assert outage.recovered and measured.seconds == outage.seconds
    assert measured.resolution_seconds >= INTERVAL
    assert abs(measured.seconds - real) <= measured.resolution_seconds, (measured, real)

    # A month without a reboot, measured by the policy's health probe: no outage, to within the interval.
    plain.lab.publish("security", "demo-web", "1.2")
    quiet = write_config(tmp_path / "quiet.yaml", [plain.config()],
                         {"baseline_months": baseline_now(), "reboot": "Never", "health_probes": [HEALTH_PROBE],
                          "unavailability": {"interval_seconds": INTERVAL}})
    state, second = run_patch(config_path=str(quiet))

    assert state.is_completed(), state.message
    calm = records(second)["down-plain"]
    assert not calm.rebooted and len(plain.sshd.outages) == 1
    assert calm.unavailability is not None and calm.unavailability.probe.startswith("health probes: command")
    assert calm.unavailability.seconds == 0.0 and calm.unavailability.outages == []
    assert calm.unavailability.probes >= 2  # probed before the install and after it

    # The run's artifacts: per host, per update domain and for the run, and in the compliance table.
    artifacts = run_artifacts(report.run_id)
    rows = {(row["scope"], row["name"]): row for row in artifacts["patch-all-unavailability"]}
    assert set(rows) == {("host", "down-plain"), ("update domain", "1"), ("run", "all")}
    assert float(rows[("run", "all")]["unavailable_seconds"]) == pytest.approx(measured.seconds, abs=0.01)
    assert rows[("host", "down-plain")]["probe"] == "ssh connect"
    assert {row["unavailable"] for row in artifacts["patch-all-compliance"]} == {measured.text()}
    assert "## Measured unavailability" in artifacts["patch-all-summary"]

    # The history keeps both, and `patch history` shows the trend.
    stored = history(LocalBlobStore(tmp_path / "store"), "down-plain")
    assert [r.unavailability for r in stored] == [calm.unavailability, measured]
    shown = CliRunner().invoke(app, ["patch", "history", "down-plain", "--config", str(quiet)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert f"{measured.seconds:.1f} s (baseline) → 0.0 s (baseline)" in shown.output
    # Which probe measured each figure, read where no terminal width can wrap it.
    as_json = CliRunner().invoke(app, ["patch", "history", "down-plain", "--config", str(quiet), "--json"])
    assert as_json.exit_code == 0, as_json.output
    probes = {record["unavailability"]["probe"] for record in json.loads(as_json.output)}
    assert "ssh connect" in probes and any(p.startswith("health probes") for p in probes), probes



def test_a_hotpatch_month_on_windows_measures_no_outage_by_a_winrm_connect(
        prefect_server: None, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    """The WinRM test host with tests/hosts/wu_sim.py's simulated Windows Update (what is
    simulated is listed there): a rebootless hotpatch, probed by WinRM logins throughout."""
    winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
    SimulatedWindowsUpdate(winrm, [SimulatedUpdate("KB5080001", "2026-12 Hotpatch for Windows Server Azure Edition",
                                                   hotpatch=True)]).attach()
    windows = winrm.host_config("hot-measured", connect_timeout=60, update_domain=3, maintenance_windows=ALWAYS_OPEN)
    cfg = write_config(tmp_path / "fleet.yaml", [windows.model_dump(mode="json", exclude_none=True)],
                       {"baseline_months": hotpatch_now(), "unavailability": {"interval_seconds": INTERVAL}})

    state, report = run_patch(config_path=str(cfg))

    [record] = report.records
    assert state.is_completed() and record.month_kind == "hotpatch" and not record.rebooted, record.reason
    assert record.unavailability is not None and record.unavailability.probe == "winrm connect"
    assert record.unavailability.seconds == 0.0 and record.unavailability.update_domain == 3
    assert record.unavailability.probes >= 2

# --------------------------------------------------------------------------- the clock


def fake_time_source(host: LabHost, *, offset_seconds: int, leap_status: str) -> None:
    """Put a time source of the test's choosing on the host's PATH (first on it, as the
    `shutdown` stub is): `date` answers as if the clock were `offset_seconds` off (GNU date
    itself, asked for "now + N seconds"), and systemctl/chronyc/timedatectl answer as a host
    running chrony with `leap_status` would. A wrapper, not libfaketime: the product reads the
    host's time with `date`, and no chrony runs on this machine to ask."""
    stubs = host.lab.base / "bin"
    scripts = {
        "date": f'#!/bin/sh\nexec /usr/bin/date -d "now {offset_seconds:+d} seconds" "$@"\n',
        "systemctl": '#!/bin/sh\n[ "$1 $2" = "is-active chrony" ] && { echo active; exit 0; }\necho inactive\nexit 3\n',
        "chronyc": f'#!/bin/sh\necho "A9FEA97B,169.254.169.123,4,1764662400.1,-0.000012,0.000003,0.000020,'
                   f'-5.1,0.001,0.02,0.0005,0.0001,64.2,{leap_status}"\n',
        "timedatectl": "#!/bin/sh\necho yes\n",
    }
    for name, text in scripts.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)


def test_a_skewed_clock_fails_the_health_gate_and_an_in_sync_one_passes(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    skewed, steady = lab_host("clock-skewed", 1), lab_host("clock-steady", 1)
    fake_time_source(skewed, offset_seconds=3600, leap_status="Not synchronised")
    fake_time_source(steady, offset_seconds=0, leap_status="Normal")
    cfg = write_config(tmp_path / "fleet.yaml", [skewed.config(), steady.config()],
                       {"baseline_months": baseline_now(), "max_concurrency": 2, "max_errors": 1,
                        "clock": {"max_skew_seconds": 5}})

    state, report = run_patch(config_path=str(cfg))

    rows = records(report)
    assert state.is_failed() and "clock-skewed" in (state.message or "") and "clock-steady" not in (state.message or "")
    bad, good = rows["clock-skewed"], rows["clock-steady"]
    assert bad.status == "failed" and bad.rebooted and bad.clock is not None and good.clock is not None
    assert bad.clock.skew_seconds is not None and abs(bad.clock.skew_seconds - 3600) <= bad.clock.uncertainty_seconds + 1
    assert bad.clock.after == "reboot" and bad.clock.sync.service == "chrony" and bad.clock.sync.synchronized is False
    assert re.search(r"health: clock 3\d{3}\.\d{3} s ahead of the controller's \(±[\d.]+ s\), beyond the limit of 5 s",
                     bad.reason), bad.reason
    assert good.status == "succeeded" and good.clock.failure == "" and good.clock.sync.synchronized is True
    assert good.clock.skew_seconds is not None and abs(good.clock.skew_seconds) <= good.clock.uncertainty_seconds + 1
    # The skewed host's record in the store says the same.
    [stored] = history(LocalBlobStore(tmp_path / "store"), "clock-skewed")
    assert stored.clock == bad.clock and stored.reason == bad.reason


def test_require_sync_fails_a_host_whose_time_service_is_not_synchronised(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    host = lab_host("clock-unsynced", 1)
    fake_time_source(host, offset_seconds=0, leap_status="Not synchronised")
    cfg = write_config(tmp_path / "fleet.yaml", [host.config()],
                       {"baseline_months": baseline_now(), "reboot": "Never", "max_errors": 1,
                        "clock": {"max_skew_seconds": 5, "require_sync": True}})

    state, report = run_patch(config_path=str(cfg))

    [record] = report.records
    assert state.is_failed() and record.status == "failed" and not record.rebooted
    assert record.reason == "health: time sync required: chrony is not synchronised"
    assert record.clock is not None and record.clock.after == "install"


# --------------------------------------------------------------------------- notices

NOTICE_LEAD = 1.0
# The controller-side hook keeps what it was told: the JSON on its standard input and its environment.
RECORDING_HOOK = ('cat > "notices/$PATCHDRILL_NOTICE_HOST-$PATCHDRILL_NOTICE_PHASE.json"; '
                  'env | grep ^PATCHDRILL_NOTICE_ | grep -v _JSON= | sort '
                  '> "notices/$PATCHDRILL_NOTICE_HOST-$PATCHDRILL_NOTICE_PHASE.env"')


def _told(directory: Path, host: str, phase: str) -> tuple[dict[str, Any], dict[str, str]]:
    document = json.loads((directory / f"{host}-{phase}.json").read_text())
    env = dict(line.split("=", 1) for line in (directory / f"{host}-{phase}.env").read_text().splitlines())
    return document, env


def test_a_notice_hook_is_told_before_each_batch_and_after_it_with_the_expected_impact(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    first, second = lab_host("notice-first", 1), lab_host("notice-second", 2)
    (tmp_path / "notices").mkdir()
    cfg = write_config(tmp_path / "fleet.yaml", [first.config(), second.config()], {
        "baseline_months": baseline_now(),
        "notice": {"kind": "controller", "command": RECORDING_HOOK, "lead_seconds": NOTICE_LEAD}})

    state, report = run_patch(config_path=str(cfg))

    assert state.is_completed(), state.message
    rows = records(report)
    told = {(host, phase): _told(tmp_path / "notices", host, phase)
            for host in rows for phase in ("before", "after")}
    for host, record in rows.items():
        before, env = told[(host, "before")]
        after, _ = told[(host, "after")]
        sent, not_before = datetime.fromisoformat(before["sent_at"]), datetime.fromisoformat(before["not_before"])
        # The lead is given and kept: the host's patching starts no sooner than the notice said.
        assert not_before - sent == timedelta(seconds=NOTICE_LEAD) and record.started_at >= not_before
        assert before["reboot"] == "possible"  # apt cannot say a reboot is certain; the policy allows one
        assert before["window_end"] and datetime.fromisoformat(before["window_end"]) > not_before
        assert sorted(before["updates"]) == ["demo-kernel=1.1", "demo-web=1.1"]
        assert env == {"PATCHDRILL_NOTICE_HOST": host, "PATCHDRILL_NOTICE_NOT_BEFORE": before["not_before"],
                       "PATCHDRILL_NOTICE_PHASE": "before", "PATCHDRILL_NOTICE_REBOOT": "possible",
                       "PATCHDRILL_NOTICE_WINDOW_END": before["window_end"]}
        # After the batch: what happened, once the host's patching had finished.
        assert (after["phase"], after["reboot"], after["status"]) == ("after", "yes", "succeeded")
        assert record.finished_at is not None and datetime.fromisoformat(after["sent_at"]) >= record.finished_at
        assert [(n.phase, n.hook, n.deferred, n.failed) for n in record.notices] == \
            [("before", "controller", False, False), ("after", "controller", False, False)]
    # One update domain at a time: the second batch was announced once the first had ended.
    assert told[("notice-second", "before")][0]["sent_at"] >= told[("notice-first", "after")][0]["sent_at"]
    assert told[("notice-second", "before")][0]["batch"] == 2
    stored = history(LocalBlobStore(tmp_path / "store"), "notice-first")
    assert [n.phase for n in stored[0].notices] == ["before", "after"]


def test_a_deferring_hook_keeps_its_host_untouched_within_the_failure_budget(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, webhook: WebhookReceiver) -> None:
    busy, free = lab_host("notice-busy", 1), lab_host("notice-free", 1)
    (busy.lab.root / "etc/demo/busy").write_text("nightly export\n")
    hook = ('if [ -e "$DPKG_ROOT/etc/demo/busy" ]; then echo "$(cat "$DPKG_ROOT/etc/demo/busy") still running"; '
            'exit 75; fi')
    cfg = write_config(tmp_path / "fleet.yaml", [busy.config(), free.config()], {
        "baseline_months": baseline_now(), "max_concurrency": 2, "max_errors": 1,
        "notice": {"kind": "host", "command": hook}})
    boot = busy.sshd.boot_id

    state, report = run_patch(config_path=str(cfg))

    rows = records(report)
    assert state.is_failed() and "notice-busy" in (state.message or "") and not report.stopped
    assert rows["notice-busy"].status == "skipped"
    assert rows["notice-busy"].reason == "deferred by the notice hook: nightly export still running"
    assert busy.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert busy.sshd.boot_id == boot and busy.sshd.outages == []
    assert [(n.phase, n.deferred) for n in rows["notice-busy"].notices] == [("before", True)]
    assert rows["notice-free"].status == "succeeded" and free.versions()["demo-web"] == "1.1"
    [stored] = history(LocalBlobStore(tmp_path / "store"), "notice-busy")
    assert stored.status == "skipped" and stored.reason == rows["notice-busy"].reason

    # The same by a webhook's reply, with the budget spent: the rollout stops there.
    quiet = lab_host("notice-webhook", 1)
    webhook.reply = lambda post: ({"defer": True, "reason": "payroll closes tonight"} if post["phase"] == "before"
                                  else {})
    cfg = write_config(tmp_path / "webhook.yaml", [quiet.config()], {
        "baseline_months": baseline_now(),
        "notice": {"kind": "webhook", "webhook": {"url": "env:PATCHDRILL_TEST_WEBHOOK"}}})

    state, report = run_patch(config_path=str(cfg))

    [record] = report.records
    assert state.is_failed() and report.stopped and "exceed the budget of 0" in report.stopped
    assert record.status == "skipped" and record.reason == "deferred by the notice hook: payroll closes tonight"
    assert quiet.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    [post] = webhook.received("patchdrill.maintenance")
    assert (post["host"], post["phase"], post["reboot"]) == ("notice-webhook", "before", "possible")
    assert webhook.token not in record.model_dump_json()


# --------------------------------------------------------------------------- Windows hosts


def test_a_windows_reboot_is_measured_within_one_probe_interval_by_winrm_logins(
        prefect_server: None, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    """Real: the WS-Management endpoint going down (connections refused) for the simulated
    reboot and coming back, the WinRM logins that probe it, and the product's measurement.
    Simulated (tests/hosts/wu_sim.py): Windows Update and `Restart-Computer`, which makes the
    test host go down DOWN_FOR seconds; its real length is taken on the host's side (when it
    stopped answering, when it listened again)."""
    winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
    wu = SimulatedWindowsUpdate(winrm, [SimulatedUpdate("KB5080002", "2026-12 Cumulative Update for Windows Server",
                                                        reboot_behaviour="always")],
                                caption="Microsoft Windows Server 2022 Datacenter", reboot_down_for=DOWN_FOR).attach()
    windows = winrm.host_config("win-reboot", connect_timeout=60, update_domain=2, maintenance_windows=ALWAYS_OPEN)
    cfg = write_config(tmp_path / "fleet.yaml", [windows.model_dump(mode="json", exclude_none=True)],
                       {"baseline_months": baseline_now(), "unavailability": {"interval_seconds": INTERVAL}})

    state, report = run_patch(config_path=str(cfg))

    [record] = report.records
    assert state.is_completed() and record.rebooted and wu.reboots == 1, record.reason
    [(went_down, came_back)] = winrm.outages
    measured = record.unavailability
    assert measured is not None and measured.probe == "winrm connect" and measured.update_domain == 2
    [outage] = measured.outages
    assert outage.recovered and measured.resolution_seconds >= INTERVAL
    assert abs(measured.seconds - (came_back - went_down)) <= measured.resolution_seconds, (measured, winrm.outages)


# The hook a Windows host's owner might write: it reads the notice from standard input and
# defers while a marker file says the workload is busy (its content is the reason).
WINDOWS_HOOK = ("$notice = [Console]::In.ReadToEnd() | ConvertFrom-Json\n"
                "$busy = 'C:\\ProgramData\\payroll\\busy'\n"
                "if ($notice.phase -eq 'before' -and (Test-Path $busy)) { Get-Content $busy; exit 75 }\n"
                "\"told: $($notice.phase) $env:PATCHDRILL_NOTICE_REBOOT\"")


class SimulatedHook:
    """What WINDOWS_HOOK does on its host, simulated (no PowerShell here): the handler sees the
    command text, the session's `$env:` variables and standard input exactly as the WinRM
    connector delivered them, and answers as the hook would, given whether the marker file
    exists (`busy`, its content)."""

    def __init__(self, busy: str | None) -> None:
        self.busy = busy
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    def __call__(self, call: Invocation) -> SimResult | None:
        if call.script.strip() != WINDOWS_HOOK:
            return None
        notice = json.loads(call.stdin())
        self.seen.append((notice, {k: v for k, v in call.env.items() if k.startswith("PATCHDRILL_NOTICE_")}))
        if notice["phase"] == "before" and self.busy is not None:
            return SimResult(stdout=self.busy + "\r\n", exit_code=75)
        return SimResult(stdout=f"told: {notice['phase']} {call.env['PATCHDRILL_NOTICE_REBOOT']}\r\n")


def test_a_notice_hook_runs_on_windows_hosts_over_winrm_and_one_defers(
        prefect_server: None, wsman_host_factory: HostFactory, tmp_path: Path) -> None:
    """Real: the hook command, its PATCHDRILL_NOTICE_* variables and the JSON on its standard
    input travelling over WinRM as the product sends them, and the product reading the exit code
    and last line. Simulated: what the PowerShell hook does on the host (SimulatedHook), and
    Windows Update (tests/hosts/wu_sim.py)."""
    hosts, hooks, updates = [], {}, {}
    for name, busy in (("win-told", None), ("win-busy", "payroll run until 02:00")):
        winrm = wsman_host_factory(scheme="https", auth=("ntlm",))
        updates[name] = SimulatedWindowsUpdate(winrm, [SimulatedUpdate("KB5080003", "2026-12 Security Update",
                                                                       reboot_behaviour="never")]).attach()
        hooks[name] = SimulatedHook(busy)
        winrm.windows.session_handlers.insert(0, hooks[name])
        hosts.append(winrm.host_config(name, connect_timeout=60, update_domain=1, maintenance_windows=ALWAYS_OPEN)
                     .model_dump(mode="json", exclude_none=True))
    cfg = write_config(tmp_path / "fleet.yaml", hosts, {
        "baseline_months": baseline_now(), "max_concurrency": 2, "max_errors": 1,
        "notice": {"kind": "host", "command": WINDOWS_HOOK, "lead_seconds": NOTICE_LEAD}})

    state, report = run_patch(config_path=str(cfg))

    rows = records(report)
    assert state.is_failed() and "win-busy" in (state.message or "") and not report.stopped
    told, busy = rows["win-told"], rows["win-busy"]
    assert told.status == "succeeded" and updates["win-told"].installed == {"KB5080003"}
    assert [(n.phase, n.hook, n.deferred, n.reason) for n in told.notices] == [
        ("before", "host", False, "told: before none"), ("after", "host", False, "told: after no")]
    (before, env), (after, _) = hooks["win-told"].seen
    assert (before["host"], before["phase"], before["reboot"], before["updates"]) == (
        "win-told", "before", "none", ["KB5080003"])
    assert env == {"PATCHDRILL_NOTICE_PHASE": "before", "PATCHDRILL_NOTICE_HOST": "win-told",
                   "PATCHDRILL_NOTICE_NOT_BEFORE": before["not_before"], "PATCHDRILL_NOTICE_REBOOT": "none",
                   "PATCHDRILL_NOTICE_WINDOW_END": before["window_end"],
                   "PATCHDRILL_NOTICE_JSON": json.dumps(before, separators=(",", ":"))}
    assert (after["phase"], after["status"]) == ("after", "succeeded")
    # The deferring host was told once, and left untouched.
    assert busy.status == "skipped" and busy.reason == "deferred by the notice hook: payroll run until 02:00"
    assert updates["win-busy"].install_requests == [] and updates["win-busy"].reboots == 0
    assert [notice["phase"] for notice, _ in hooks["win-busy"].seen] == ["before"]
