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
    for where, text in {**record, "output": out + err, "caplog": caplog.text}.items():
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
