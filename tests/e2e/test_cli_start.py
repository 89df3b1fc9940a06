"""The installed `patchdrill` command's start on a fresh PREFECT_HOME: Prefect's temporary API
(PATCHDRILL_SERVER=temporary) and patchdrill's background server, each given too little time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli import app as cli_app

REPO = Path(__file__).resolve().parents[2]
PATCHDRILL = Path(sys.executable).with_name("patchdrill")


def test_a_temporary_server_that_does_not_start_in_time_is_one_line(tmp_path: Path) -> None:
    """A fresh PREFECT_HOME migrates its database first; given 1 s, the start times out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1",
               PATCHDRILL_SERVER="temporary")
    done = subprocess.run([str(PATCHDRILL), "patch", "assess", "-c", "configs/lab.yaml", "--no-refresh"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "ephemeral Prefect API server" in line and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line


def test_the_command_gives_prefects_temporary_api_time_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setattr(sys, "argv", ["patchdrill", "version"])
    with pytest.raises(SystemExit) as done:
        cli_app.main()
    assert done.value.code == 0
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == cli_app.EPHEMERAL_STARTUP_SECONDS


def test_a_background_server_that_does_not_start_in_time_is_one_line_and_is_not_left_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "PATCHDRILL_SERVER"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    done = subprocess.run([str(PATCHDRILL), "patch", "assess", "-c", "configs/lab.yaml", "--no-refresh"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "background Prefect server did not answer within 1 s" in line
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line and "server.log" in line
    [pid] = re.findall(r"background Prefect server \(pid (\d+)", done.stderr)
    assert not Path(f"/proc/{pid}").exists(), "the server that did not start in time was left running"
    assert not (tmp_path / "home" / "patchdrill" / "server" / "server.json").exists()
