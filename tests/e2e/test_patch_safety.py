"""A patch run's safety net on real hosts: measured unavailability, the clock check, notices.

The hosts are tests/e2e/test_patch_run.py's: real sshd servers in their own mount namespace,
each with a sandboxed real apt, whose `shutdown` asks the test's watcher for a simulated reboot
(sshd killed, a new boot id, sshd started again after `down_for` seconds). The reboot's real
length is taken on the host's side (SshdHost.outages: from the kill to sshd listening again),
not from anything the product reports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from connectors.stores import LocalBlobStore
from tasks.patching.history import history
from tests.e2e.test_patch_run import (  # noqa: F401 - fixtures
    HEALTH_PROBE, LabHost, LabMaker, RebootWatcher, baseline_now, lab_host, reboot_watcher, records, run_artifacts, run_patch,
    write_config,
)

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
    assert "ssh connect" in shown.output and "health probes" in shown.output


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
