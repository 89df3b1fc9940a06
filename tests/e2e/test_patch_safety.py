"""The patch run's safety net end to end: the recovery-point gate and the rollback.

The hosts are those of test_patch_run.py: real sshd servers in their own mount namespace, each
with a sandboxed real apt and dpkg. The disk each protects is its whole apt root (dpkg's status,
the package files, the application's health file), a directory disk backed up and restored over
SSH by the real backup pipeline into a local store, so a restored point puts the packages back
as they were. Runs go through the CLI or the flow, on the real Prefect test server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from connectors.stores import LocalBlobStore
from tasks.backup.repo.repository import Repository
from tasks.drill.copy import point_file_digests
from tasks.patching.history import history
from tests.alert_checks import alerts_section, events
from tests.hosts.webhook import WebhookReceiver
from tests.e2e.test_patch_run import (  # noqa: F401 - fixtures used by name
    HEALTH_PROBE, LabHost, LabMaker, baseline_now, lab_host, reboot_watcher, records, run_artifacts, run_patch,
    tree_digest, write_config,
)

pytestmark = pytest.mark.e2e

UNTOUCHED = {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
PATCHED = {"demo-web": "1.1", "demo-kernel": "1.1", "demo-db": "1.0"}
BLOCK = 64 * 1024


def protected(host: LabHost) -> dict[str, Any]:
    """The host's config with its apt root as its one protected disk."""
    return {**host.config(), "disks": [{"name": "root", "path": str(host.lab.root), "kind": "directory"}]}


def test_gate_skips_a_host_without_a_fresh_point_and_patches_one_that_has_it(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.common import console

    backed, bare = lab_host("gate-backed", 1), lab_host("gate-bare", 2)
    cfg = write_config(tmp_path / "fleet.yaml", [protected(backed), protected(bare)],
                       {"baseline_months": baseline_now(), "max_errors": 1, "recovery_point": {"max_age_hours": 24}})
    runner = CliRunner()
    backup = runner.invoke(app, ["backup", "--config", str(cfg), "--host", "gate-backed", "--json"])
    assert backup.exit_code == 0, backup.output
    [disk] = json.loads(backup.stdout)
    bare_boot = bare.sshd.boot_id

    result = runner.invoke(app, ["patch", "run", "--config", str(cfg), "--json"])

    # A skipped host fails the run, as a host skipped by its pre-hook does.
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    rows = {r["host"]: r for r in report["records"]}
    assert rows["gate-bare"]["status"] == "skipped"
    assert rows["gate-bare"]["reason"] == "disk root: no recovery point newer than 24 h (it has none)"
    assert bare.versions() == UNTOUCHED and bare.sshd.boot_id == bare_boot
    assert {o["state"] for o in rows["gate-bare"]["updates"] if o["update_id"] != "demo-db=1.2"} == {"Missing"}

    assert rows["gate-backed"]["status"] == "succeeded", rows["gate-backed"]["reason"]
    assert backed.versions() == PATCHED
    [used] = rows["gate-backed"]["recovery"]["points"]
    assert (used["disk"], used["point"], used["taken"]) == ("root", disk["point"], False)

    store = LocalBlobStore(tmp_path / "store")
    [stored] = history(store, "gate-backed")
    assert stored.recovery is not None and stored.recovery.points[0].point == disk["point"]
    assert history(store, "gate-bare")[0].reason == rows["gate-bare"]["reason"]
    summary = run_artifacts(report["run_id"])["patch-all-summary"]
    assert f"| gate-backed | root | {disk['point']} | crash-consistent | existing |" in summary
    monkeypatch.setattr(console, "width", 300)  # the table's columns whole, as on a wide terminal
    shown = runner.invoke(app, ["patch", "history", "gate-backed", "--config", str(cfg)])
    stamp = disk["point"].rsplit("/", 1)[1].removesuffix(".json")
    assert shown.exit_code == 0 and f"root@{stamp}" in shown.output, shown.output


def test_a_point_taken_before_install_is_the_pre_patch_state_and_named_in_history(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    host = lab_host("gate-take", 1)
    # The backup policy's pre-script makes the point application-consistent, which the gate requires.
    cfg = write_config(tmp_path / "fleet.yaml", [protected(host)],
                       {"baseline_months": baseline_now(),
                        "recovery_point": {"take_before_install": True, "app_consistent": True}})
    config = cfg.read_text() + "backup_policies: {default: {pre_script: 'true'}}\n"
    cfg.write_text(config)
    status_before = (host.lab.admindir / "status").read_bytes()

    state, report = run_patch(config_path=str(cfg))

    assert state.is_completed(), state.message
    record = records(report)["gate-take"]
    assert record.status == "succeeded" and host.versions() == PATCHED
    assert record.recovery is not None
    [used] = record.recovery.points
    assert used.taken and used.consistency == "application-consistent"
    assert record.started_at <= used.time <= (record.finished_at or used.time)
    # The point holds the host as it was before the install: dpkg's status of the 1.0 packages.
    repo = Repository.open(LocalBlobStore(tmp_path / "store"))
    point = repo.read_point(used.point)
    assert point_file_digests(repo, point, ["var/lib/dpkg/status"]) == {
        "var/lib/dpkg/status": hashlib.sha256(status_before).hexdigest()}
    [stored] = history(LocalBlobStore(tmp_path / "store"), "gate-take")
    assert stored.recovery == record.recovery
    assert f"| gate-take | root | {used.point} | application-consistent | taken before install |" in \
        run_artifacts(report.run_id)["patch-all-summary"]


def test_failed_health_rolls_back_to_the_pre_patch_point_and_counts_against_the_budget(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    bad, spared = lab_host("rollback-bad", 1, breaks_health=True), lab_host("rollback-spared", 2)
    stops = tmp_path / "workload.log"
    # A second disk, an image file of the workload's (kind block): the patch (a pre-hook, which
    # runs after the point is taken) rewrites 7 bytes of its second 64 KiB block.
    image = bad.lab.base / "vm.img"
    image.write_bytes(os.urandom(4 * BLOCK + 123))
    bad_host = protected(bad)
    bad_host["disks"].append({"name": "vm", "path": str(image), "kind": "block"})
    cfg = write_config(tmp_path / "fleet.yaml", [bad_host, protected(spared)], {
        "baseline_months": baseline_now(), "max_errors": 0, "health_probes": [HEALTH_PROBE],
        "pre_hooks": [f"printf patched | dd of={image} bs=1 seek={BLOCK + 100} conv=notrunc 2>/dev/null"],
        "recovery_point": {"take_before_install": True, "rollback": "restore",
                           "workload_stop": f"echo stop >> {stops}", "workload_start": f"echo start >> {stops}"}})
    cfg.write_text(cfg.read_text() + f"backup_policies: {{default: {{block_size: {BLOCK}}}}}\n")
    before, spared_boot = tree_digest(bad.lab.root), spared.sshd.boot_id
    image_before = hashlib.sha256(image.read_bytes()).hexdigest()

    # No list refresh: the host's disk at the run's start is then exactly its pre-patch point.
    state, report = run_patch(config_path=str(cfg), refresh=False)

    rows = records(report)
    record = rows["rollback-bad"]
    # Rolled back, still a failed patch: the budget of 0 stops the rollout before the next domain.
    assert record.status == "failed" and record.rebooted
    assert state.is_failed() and report.stopped and "exceed the budget of 0" in report.stopped
    assert rows["rollback-spared"].status == "skipped" and spared.versions() == UNTOUCHED
    assert spared.sshd.boot_id == spared_boot
    assert record.recovery is not None and record.recovery.rollback is not None
    rollback = record.recovery.rollback
    assert rollback.status == "restored" and rollback.probes_after == "passed", rollback
    used, used_image = record.recovery.points
    restored, restored_image = rollback.disks
    assert (restored.disk, restored.point) == ("root", used.point) and restored.bytes_written > 0
    # Delta-aware: of the image, only the one block the patch changed travelled back.
    assert (restored_image.disk, restored_image.point) == ("vm", used_image.point)
    assert restored_image.bytes_written == BLOCK
    assert hashlib.sha256(image.read_bytes()).hexdigest() == image_before
    assert "health: command" in record.reason and "rolled back to the pre-patch point (root, vm;" in record.reason
    # The disk equals its pre-patch state, byte for byte: packages, dpkg status, the health file.
    after = tree_digest(bad.lab.root)
    assert after == before
    repo = Repository.open(LocalBlobStore(tmp_path / "store"))
    assert point_file_digests(repo, repo.read_point(used.point), list(after)) == after
    assert bad.versions() == UNTOUCHED
    assert stops.read_text() == "stop\nstart\n"
    [stored] = history(LocalBlobStore(tmp_path / "store"), "rollback-bad")
    assert stored.recovery == record.recovery
    assert "| rollback-bad | rollback | | |" in run_artifacts(report.run_id)["patch-all-summary"]


def test_a_rollback_whose_workload_will_not_stop_restores_nothing_and_says_so(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path) -> None:
    host = lab_host("rollback-stuck", 1, breaks_health=True)
    cfg = write_config(tmp_path / "fleet.yaml", [protected(host)], {
        "baseline_months": baseline_now(), "max_errors": 1, "health_probes": [HEALTH_PROBE],
        "recovery_point": {"take_before_install": True, "rollback": "restore",
                           "workload_stop": "echo 'service busy' >&2; exit 3", "workload_start": "true"}})

    state, report = run_patch(config_path=str(cfg), refresh=False)

    record = records(report)["rollback-stuck"]
    assert state.is_failed() and record.status == "failed"
    assert record.recovery is not None and record.recovery.rollback is not None
    rollback = record.recovery.rollback
    assert rollback.status == "failed" and rollback.disks == []
    assert rollback.error == "workload_stop \"echo 'service busy' >&2; exit 3\" exited 3: service busy"
    assert f"rollback failed: {rollback.error}" in record.reason
    # Nothing was restored over a workload that still runs: the host keeps the patched packages.
    assert host.versions() == PATCHED


def closing_window(minutes_left: int) -> tuple[list[dict[str, Any]], datetime]:
    """A window open every day since an hour ago (to the minute), closing `minutes_left` minutes
    after that minute (UTC, the test hosts' zone), and when it closes: the run may patch, and
    knows how much time a rollback has."""
    opened = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=1)
    window = {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": opened.strftime("%H:%M"),
              "duration_minutes": 60 + minutes_left}
    return [window], opened + timedelta(minutes=60 + minutes_left)


def test_a_rollback_that_could_not_finish_inside_the_window_is_not_started_and_alerted(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, webhook: WebhookReceiver) -> None:
    """The window closes in about 30 min and the policy says a rollback may need 45: none starts.
    The restore is not begun at all, so the host keeps the patched (unhealthy) state, not a
    half-restored disk, and a person is told which points to restore."""
    host = lab_host("rollback-late", 1, breaks_health=True, windows=closing_window(30)[0])
    cfg = write_config(tmp_path / "fleet.yaml", [protected(host)], {
        "baseline_months": baseline_now(), "max_errors": 1, "health_probes": [HEALTH_PROBE],
        "recovery_point": {"take_before_install": True, "rollback": "restore", "rollback_minutes": 45}},
        alerts=alerts_section())

    state, report = run_patch(config_path=str(cfg), refresh=False)

    record = records(report)["rollback-late"]
    assert state.is_failed() and record.status == "failed" and host.versions() == PATCHED
    assert record.recovery is not None and record.recovery.rollback is not None
    rollback, [used] = record.recovery.rollback, record.recovery.points
    assert rollback.status == "too-late" and rollback.disks == [] and rollback.left_for_a_person
    assert re.fullmatch(r"the maintenance window closes in (29|30)\.\d min and a rollback may need 45\.0 min, so none "
                        r"was started: the host is left as patched for a person to restore \(root from "
                        + re.escape(used.point) + r"\)", rollback.error), rollback.error
    assert f"rollback not started: {rollback.error}" in record.reason
    # The run's own state says it, and so do the history and the alert.
    assert f"rollback-late: rollback not started: {rollback.error}" in (state.message or "")
    [stored] = history(LocalBlobStore(tmp_path / "store"), "rollback-late")
    assert stored.recovery == record.recovery
    [alert] = events("patchdrill.patch.rollback-not-started", "patchdrill.host.rollback-late")
    assert alert.payload["run_id"] == report.run_id and alert.payload["status"] == "too-late"
    assert alert.payload["points"] == [used.point]
    [posted] = webhook.received("patchdrill.patch.rollback-not-started")
    assert posted["text"].startswith("patchdrill: rollback-late failed its health probes after patching and was not "
                                     "rolled back: the maintenance window closes in")


def test_an_approval_nobody_gives_before_the_rollback_would_outrun_the_window_ends_the_wait_there(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, webhook: WebhookReceiver) -> None:
    """rollback: ask with a generous rollback_approval_minutes, but a window that leaves the
    rollback only about half a minute after the run starts: the pause ends when a rollback
    could last be started and still finish in the window, not at the approval timeout, and then
    no rollback is started. Nobody answers the Resume form; the run's own pause (flows/pause.py)
    on the Prefect test server is what waits."""
    window, closes = closing_window(30)
    host = lab_host("rollback-window", 1, breaks_health=True, windows=window)
    # What the run has from now until a rollback could last start. The point, the install and the
    # health probe happen in it (about 7 s on a busy 2-core machine); the rest is the pause's wait.
    margin = 30.0
    rollback_minutes = ((closes - datetime.now(timezone.utc)).total_seconds() - margin) / 60
    cfg = write_config(tmp_path / "fleet.yaml", [protected(host)], {
        "baseline_months": baseline_now(), "max_errors": 1, "health_probes": [HEALTH_PROBE],
        "recovery_point": {"take_before_install": True, "rollback": "ask", "rollback_approval_minutes": 600,
                           "rollback_minutes": rollback_minutes}}, alerts=alerts_section())

    state, report = run_patch(config_path=str(cfg), refresh=False)

    record = records(report)["rollback-window"]
    assert record.recovery is not None and record.recovery.rollback is not None
    rollback = record.recovery.rollback
    assert rollback.status == "unanswered", rollback
    assert re.fullmatch(r"nobody approved it within [\d.]+ min \(the time left in the maintenance window\); the host "
                        r"is left as patched for a person", rollback.error), rollback.error
    waited = float(re.search(r"within ([\d.]+) min", rollback.error).group(1))  # type: ignore[union-attr]
    assert waited < margin / 60 < 600
    assert state.is_failed() and f"rollback-window: rollback not started: {rollback.error}" in (state.message or "")
    assert host.versions() == PATCHED and record.status == "failed"
    [stored] = history(LocalBlobStore(tmp_path / "store"), "rollback-window")
    assert stored.recovery == record.recovery
    [alert] = events("patchdrill.patch.rollback-not-started", "patchdrill.host.rollback-window")
    assert alert.payload["status"] == "unanswered" and alert.payload["run_id"] == report.run_id


def test_a_run_cancelled_while_a_rollback_waits_for_approval_starts_no_other_update_domain(
        prefect_server: None, lab_host: LabMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rollback: ask, two update domains; the first host fails its health probe and the run
    pauses for the rollback's approval. The Prefect UI's Cancel (the run is then Cancelling):
    the pause ends at its next poll instead of after 600 min, nothing is restored, the host is
    recorded as left for a person and why, the second update domain is never started, and the
    run ends Cancelled, the one state a cancelling run may reach."""
    import flows.patch as patch_flow

    from tests.e2e.test_patch_run import cancelled_while_paused, in_thread

    monkeypatch.setattr(patch_flow, "APPROVAL_POLL_SECONDS", 1)
    first = lab_host("cancel-ask", 0, breaks_health=True)
    second = lab_host("cancel-next", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [protected(first), protected(second)], {
        "baseline_months": baseline_now(), "max_errors": 5, "health_probes": [HEALTH_PROBE],
        "recovery_point": {"take_before_install": True, "rollback": "ask", "rollback_approval_minutes": 600}})
    worker, outcome = in_thread(lambda: run_patch(config_path=str(cfg), refresh=False), "cancelled-rollback-approval")
    _, (state, report) = cancelled_while_paused(worker, outcome)

    assert state.is_cancelled(), state
    assert "cancelled in Prefect while it waited for an answer" in (state.message or ""), state.message
    found = records(report)
    rollback = found["cancel-ask"].recovery.rollback  # type: ignore[union-attr]
    assert rollback is not None and rollback.status == "unanswered"
    assert rollback.error.startswith("stopped while waiting for the rollback's approval (cancelled in Prefect")
    assert first.versions() == PATCHED  # nothing restored: a person decides
    assert found["cancel-next"].status == "skipped" and "no new batch was started" in found["cancel-next"].reason
    assert second.versions() == {"demo-web": "1.0", "demo-kernel": "1.0", "demo-db": "1.0"}
    assert report.stopped and report.stopped.startswith("cancelled in Prefect")
