"""`patchdrill patch …` as an operator meets it: the calendar, history, and clear refusals
before any flow (or host) is touched."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import yaml
from typer.testing import CliRunner

from connectors.stores import LocalBlobStore
from cli.app import app
from tasks.patching.history import write_record
from tasks.patching.models import HostPatchRecord

runner = CliRunner()


def _config(tmp_path: Path, policy: dict[str, object] | None = None) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "web-1", "transport": "ssh", "address": "127.0.0.1", "port": 1, "user": "ops",
                   "groups": ["web"]}],
        "patch_policies": {"web": policy or {}},
    }))
    return path


def test_calendar_lists_the_months_with_the_configs_unplanned_baseline(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"unplanned_baselines": ["2026-08"]})
    result = runner.invoke(app, ["patch", "calendar", "--year", "2026", "--config", str(cfg), "--group", "web", "--json"])
    assert result.exit_code == 0, result.output
    months = {m["month"]: m for m in json.loads(result.stdout)}
    assert months["2026-08"] == {"month": "2026-08", "patch_tuesday": "2026-08-11", "kind": "baseline", "unplanned": True}
    assert months["2026-01"]["kind"] == "baseline" and not months["2026-01"]["unplanned"]
    assert [m for m, v in months.items() if v["kind"] == "hotpatch"] == [
        "2026-02", "2026-03", "2026-05", "2026-06", "2026-09", "2026-11", "2026-12"]
    text = runner.invoke(app, ["patch", "calendar", "--year", "2026"])
    assert text.exit_code == 0 and "2026-11-10" in text.output


def test_history_shows_the_hosts_recent_runs(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    write_record(LocalBlobStore(tmp_path / "store"), HostPatchRecord(
        run_id="0f3c2a", host="web-1", started_at=started, month_kind="baseline", status="succeeded", rebooted=True))
    result = runner.invoke(app, ["patch", "history", "web-1", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["run_id"], row["status"], row["rebooted"]) == ("0f3c2a", "succeeded", True)
    missing = runner.invoke(app, ["patch", "history", "db-9", "--config", str(cfg)])
    assert missing.exit_code == 1 and "no such host: db-9" in missing.output


def test_run_refuses_an_approval_policy_without_yes(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"approval_required": True})
    result = runner.invoke(app, ["patch", "run", "--config", str(cfg), "--group", "web"])
    assert result.exit_code == 1
    assert "policy 'web' requires approval" in result.output and "--yes" in result.output
    assert not (tmp_path / "store").exists()


def test_run_refuses_a_policy_that_asks_before_a_rollback_without_a_server_to_answer_on(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"recovery_point": {"take_before_install": True, "rollback": "ask"}})
    config = yaml.safe_load(cfg.read_text())
    config["hosts"][0]["disks"] = [{"name": "www", "path": "/srv/www", "kind": "directory"}]
    cfg.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["patch", "run", "--config", str(cfg), "--group", "web", "--yes"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "policy 'web' asks before a rollback (recovery_point.rollback: ask)" in result.output
    assert "--wait-for-approval" in result.output and not (tmp_path / "store").exists()


def test_run_names_the_unknown_host_or_policy(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    host = runner.invoke(app, ["patch", "run", "--config", str(cfg), "--host", "web-9", "--dry-run"])
    assert host.exit_code == 1 and "no such host: web-9" in host.output and "Traceback" not in host.output
    policy = runner.invoke(app, ["patch", "assess", "--config", str(cfg), "--policy", "weekly"])
    assert policy.exit_code == 1 and f"{cfg}: patch_policies: no policy named 'weekly'" in policy.output


def test_history_shows_a_host_left_rebooting(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    write_record(LocalBlobStore(tmp_path / "store"), HostPatchRecord(
        run_id="7d1e9b", host="web-1", started_at=started, month_kind="baseline", status="rebooting",
        boot_id_before="b-1", reason="reboot requested on boot b-1; no result was recorded after the reboot"))
    result = runner.invoke(app, ["patch", "history", "web-1", "--config", str(cfg), "--json"])
    [row] = json.loads(result.stdout)
    assert (row["status"], row["finished_at"], row["boot_id_before"]) == ("rebooting", None, "b-1")
    text = runner.invoke(app, ["patch", "history", "web-1", "--config", str(cfg)])
    assert text.exit_code == 0 and "rebooting" in text.output.split()
