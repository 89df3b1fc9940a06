"""A patch run's safety net on real hosts: measured unavailability, the clock check, notices.

The hosts are tests/e2e/test_patch_run.py's: real sshd servers in their own mount namespace,
each with a sandboxed real apt, whose `shutdown` asks the test's watcher for a simulated reboot
(sshd killed, a new boot id, sshd started again after `down_for` seconds). The reboot's real
length is taken on the host's side (SshdHost.outages: from the kill to sshd listening again),
not from anything the product reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from connectors.stores import LocalBlobStore
from tasks.patching.history import history
from tests.e2e.test_patch_run import (  # noqa: F401 - fixtures
    HEALTH_PROBE, LabMaker, RebootWatcher, baseline_now, lab_host, reboot_watcher, records, run_artifacts, run_patch,
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
