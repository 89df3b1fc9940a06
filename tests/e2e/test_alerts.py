"""Alerts end to end: the `patchdrill` command runs the flows on a real Prefect test server, the
hosts are real (an OpenSSH server, this machine), and the webhook is a real HTTP receiver on a
loopback port (tests/hosts/webhook.py). Events are read back through the Prefect API.

The failed patch run's alert is checked in test_patch_run.py and the missed RTO's in
test_drill_run.py, beside the fixtures those runs need.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from configs.loader import load_config
from configs.policies import BackupPolicy
from connectors.stores import open_store
from tasks.backup.disk import back_up_disk
from tasks.backup.repo.repository import parse_stamp, point_key
from tests.alert_checks import alerts_section, events, run_record
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process `patchdrill` fixture
from tests.hosts.sshd_server import SshdHost
from tests.hosts.webhook import WebhookReceiver, closed_port_url

pytestmark = pytest.mark.e2e
Cli = Callable[..., tuple[int, str, str]]


def failing_backup_config(tmp_path: Path, host: SshdHost, alerts: dict[str, Any]) -> Path:
    """One real SSH host whose only disk does not exist on it: the backup run fails."""
    cfg = tmp_path / "fleet.yaml"
    entry = host.host_config().model_dump(mode="json", exclude_none=True) | {
        "disks": [{"name": "www", "path": str(tmp_path / "no-such-dir"), "kind": "directory"}]}
    cfg.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": [entry],
                                   "backup_policies": {"default": {"block_size": 65536, "snapshot_method": "none"}},
                                   "alerts": alerts}))
    return cfg


def test_a_failed_backup_run_posts_to_the_webhook_and_emits_an_event(
        prefect_server: None, sshd_host: SshdHost, webhook: WebhookReceiver, tmp_path: Path, cli: Cli,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = failing_backup_config(tmp_path, sshd_host, alerts_section())

    code, out, err = cli("backup", "-c", str(cfg))

    assert code == 1, out + err
    [post] = webhook.wait_for("patchdrill.run.failed")
    payload = post["payload"]
    assert payload["flow"] == "backup-run" and payload["state"] == "Failed"
    assert f"{sshd_host.name}/www" in payload["message"] and payload["parameters"]["config_path"] == str(cfg)
    # Slack and Teams show `text`; it says what failed.
    assert post["text"].startswith("patchdrill: backup-run run ") and f"{sshd_host.name}/www" in post["text"]
    run_id = payload["run_id"]
    [event] = events("patchdrill.run.failed", f"patchdrill.run.{run_id}")
    assert event.payload["flow"] == "backup-run" and event.payload["message"] == payload["message"]
    assert event.resource["patchdrill.flow"] == "backup-run"
    assert f"prefect.flow-run.{run_id}" in {r.id for r in event.related}
    # The webhook's token is the credential: nowhere in what the run leaves or the command says.
    record = run_record(run_id, "alert.posted")
    for where, text in {**record, "event": event.model_dump_json(), "output": out + err, "caplog": caplog.text}.items():
        assert webhook.token not in text, where


def test_an_unreachable_webhook_leaves_the_failed_run_and_its_error_as_they_were(
        prefect_server: None, sshd_host: SshdHost, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = closed_port_url()
    monkeypatch.setenv("PATCHDRILL_TEST_WEBHOOK", url)
    cfg = failing_backup_config(tmp_path, sshd_host, alerts_section())

    code, out, err = cli("backup", "-c", str(cfg), "--json")

    # The command's error line is the backup's own failure; the post's is a warning before it.
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"{sshd_host.name}/www" in line and "not a directory" in line
    assert "alert.webhook_failed" in err
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
                 if r.parameters.get("config_path") == str(cfg)]
    assert run.state is not None and run.state.is_failed()
    assert f"{sshd_host.name}/www" in (run.state.message or "")
    # The event still went out; the post's failure is a warning in the run's logs, naming no URL.
    assert events("patchdrill.run.failed", f"patchdrill.run.{run.id}")
    record = run_record(str(run.id), "alert.webhook_failed")
    assert "ConnectError" in record["logs"]
    port_and_token = url.removeprefix("http://127.0.0.1")
    assert all(port_and_token not in text for text in (*record.values(), out, err))


def test_the_freshness_check_alerts_each_disk_whose_newest_point_is_older_than_its_policy_allows(
        prefect_server: None, webhook: WebhookReceiver, tmp_path: Path, cli: Cli) -> None:
    """Three disks of this machine: one backed up now, one backed up with its point's key then
    re-dated three days back (the store and its listing are real; the test does not wait three
    days), one never backed up. The policy allows one hour."""
    for name in ("fresh", "old", "never"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.txt").write_text(f"{name}\n")
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local",
                   "disks": [{"name": n, "path": n, "kind": "directory"} for n in ("fresh", "old", "never")]}],
        "backup_policies": {"nightly": {"block_size": 65536, "snapshot_method": "none", "max_point_age": "PT1H"}},
        "alerts": alerts_section()}))
    loaded = load_config(cfg)
    host = loaded.config.hosts[0]
    policy = loaded.config.backup_policies["nightly"]
    for disk in host.disks[:2]:
        back_up_disk(loaded.config.storage, loaded.base_dir, host, disk, policy, policy_name="nightly")
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        [key] = [i.key for i in store.list("points/lab-1/old/")]
        taken = parse_stamp(key.rsplit("/", 1)[1].removesuffix(".json"))
        store.put(point_key("lab-1", "old", taken - timedelta(days=3)), store.get(key))
        store.delete(key)

    code, out, err = cli("freshness", "-c", str(cfg), "--json")

    assert code == 1, err
    rows = {row["disk"]: row for row in json.loads(out)}
    assert {d: r["stale"] for d, r in rows.items()} == {"fresh": False, "old": True, "never": True}
    assert rows["never"]["newest_point"] is None and rows["old"]["age_seconds"] > 3 * 86400
    posts = {p["payload"]["disk"]: p for p in webhook.wait_for("patchdrill.backup.stale", count=2)}
    assert set(posts) == {"old", "never"}
    assert posts["never"]["text"] == "patchdrill: lab-1/never has no recovery point; backup policy nightly allows 1.0 h"
    assert posts["old"]["payload"]["max_age_seconds"] == 3600 and posts["old"]["payload"]["policy"] == "nightly"
    assert posts["old"]["payload"]["age_seconds"] > 3 * 86400
    for disk in ("old", "never"):
        [event] = events("patchdrill.backup.stale", f"patchdrill.disk.lab-1/{disk}")
        assert event.resource["patchdrill.host"] == "lab-1" and event.resource["patchdrill.disk"] == disk
    assert events("patchdrill.backup.stale", "patchdrill.disk.lab-1/fresh", deadline=0) == []


def test_a_run_failed_by_its_own_config_still_reaches_the_webhook(prefect_server: None, webhook: WebhookReceiver,
                                                                  tmp_path: Path) -> None:
    """As a deployment's run meets a config edited since: the flow fails loading it, and the
    hook reads the `alerts:` section on its own."""
    from flows.backup import backup_run

    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": [],
                                   "backup_policies": {"default": {"block_size": 3000}},
                                   "alerts": alerts_section()}))
    state = backup_run(config_path=str(cfg), return_state=True)
    assert state.is_failed()
    [post] = webhook.received("patchdrill.run.failed")
    assert "backup_policies.default.block_size" in post["payload"]["message"]
    assert post["payload"]["run_id"] == str(state.state_details.flow_run_id)
