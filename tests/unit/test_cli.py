"""The `patchdrill` command as a user meets it: clear errors, JSON everywhere, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "hosts", "version"):
        assert command in result.output
    result = runner.invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["patchdrill"]


def test_config_check_ok_and_json() -> None:
    result = runner.invoke(app, ["config", "check", str(REPO / "configs/fleet.example.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["hosts"] == 5 and report["storage"] == "azure"


def test_config_check_lists_problems_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  kind: local\n  path: s\nhosts:\n  - name: a\n    transport: ssh\n    user: u\n    password: hunter22\n")
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{bad}:8: hosts[0].password" in result.output
    assert "hunter22" not in result.output
    result = runner.invoke(app, ["config", "check", str(bad), "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert problems[0]["field"] == "hosts[0].password" and problems[0]["line"] == 8


def test_config_schema_is_json() -> None:
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    assert "HostConfig" in json.loads(result.stdout)["$defs"]


def test_hosts_ping_lab_and_unreachable_row(tmp_path: Path) -> None:
    result = runner.invoke(app, ["hosts", "ping", "--config", str(REPO / "configs/lab.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["reachable"] is True and row["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    cfg = tmp_path / "down.yaml"
    cfg.write_text(
        "storage: {kind: local, path: s}\nhosts:\n"
        "  - {name: up, transport: local}\n"
        "  - {name: gone, transport: ssh, address: 127.0.0.1, port: 1, user: u, connect_timeout: 2}\n"
    )
    result = runner.invoke(app, ["hosts", "ping", "--config", str(cfg), "--json"])
    assert result.exit_code == 2, result.output
    rows = {r["host"]: r for r in json.loads(result.stdout)}
    assert rows["up"]["reachable"] is True
    assert rows["gone"]["reachable"] is False and "gone" in rows["gone"]["error"]


def test_unknown_group_and_host_are_clear_errors() -> None:
    lab = str(REPO / "configs/lab.yaml")
    result = runner.invoke(app, ["hosts", "ping", "--config", lab, "--host", "nope"])
    assert result.exit_code == 1 and "no such host: nope" in result.output
    result = runner.invoke(app, ["hosts", "ping", "--config", lab, "--group", "nope"])
    assert result.exit_code == 1 and "no host matches" in result.output


def test_commands_that_run_no_flow_do_not_load_prefect() -> None:
    """Prefect costs about a second to import; `--help`, `config check` and `hosts ping` don't need it."""
    import subprocess
    import sys

    probe = "import sys, cli.app; print('prefect' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_points_and_config_check_load_neither_prefect_nor_the_azure_sdk(tmp_path: Path) -> None:
    """Commands that run no flow start without the background server, Prefect or the Azure SDK."""
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage: {kind: local, path: s}\nhosts:\n  - {name: up, transport: local}\n")
    probe = ("import sys, cli.app\n"
             "for args in (['config', 'check', sys.argv[1]], ['points', '-c', sys.argv[1], '--json']):\n"
             "    try:\n        cli.app.app(args, standalone_mode=False)\n"
             "    except SystemExit as e:\n        assert not e.code, e.code\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'azure'}))")
    proc = subprocess.run([sys.executable, "-c", probe, str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
