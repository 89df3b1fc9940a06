"""`make demo` end to end: the lab's backups, restores, DR drill and patch run on the embedded default.

The real demo runs as a subprocess, as `make demo` starts it: real backups into the local store,
a real drill of plan lab-notes (notes-app restored, started inside a real network namespace,
probed over HTTP, with sqlite3 and by checksums), and a real patch run of the lab host with
policy lab-safety (real apt-get and dpkg in the lab's sandbox, a package built by the demo, the
running notes-app restarted by it and probed over HTTP), on Prefect's ephemeral server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

REPO = Path(__file__).resolve().parents[2]
DRILL_COPY = REPO / ".lab" / "drill" / "lab-notes"
pytestmark = pytest.mark.e2e


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names `text` (the drill's copy, wherever it runs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return found


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    # Wide lines, so rich wraps no name or path the assertions read.
    env = os.environ | {"COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "cli.demo"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)


def test_demo_backs_up_and_restores_byte_identical(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "lab-local: up" in demo.stdout
    assert demo.stdout.count("byte-identical") == 2
    assert "all intact" in demo.stdout
    assert "Traceback" not in demo.stderr


def test_demo_drills_the_notes_app_and_prints_rto_rpo_and_report(demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    # Each of the copy's probes passed: HTTP's row count, the SQL count and the checksums.
    for probe in ("containing 'ok notes=120'", "SELECT count(*) FROM notes", "checksum app.py, data/notes.sqlite3"):
        line = next((l for l in out.splitlines() if probe in l), None)
        assert line is not None and "pass" in line, f"{probe}: {line}"
    assert "returned '120'" in out
    assert re.search(r"RTO\s*│ [\d.]+ (ms|s|min).* against 5 min 00 s: pass ✓", out), out[-2000:]
    assert re.search(r"RPO\s*│ [\d.]+ (ms|s|min).* against 24 h 00 min: pass ✓", out), out[-2000:]
    assert re.search(r"drill run [0-9a-f-]{36}; cleanup verified", out)
    assert "drill passed" in out
    report = re.search(r"HTML report: (\S+\.html)", out)
    assert report, out[-2000:]
    run_id = re.search(r"drill run ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
    page = Path(report.group(1)).read_text()
    assert run_id in page and "lab-notes" in page


def test_demo_patches_the_lab_host_behind_its_safety_net(demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    assert "patch dry run (policy lab-safety): notes-app=1.1" in out
    assert re.search(r"batch 1  update domain 0  lab-local", out)
    # The gate passed on the point the demo's second backup made of the notes disk.
    gate = re.search(r"recovery-point gate: passed on notes@(\S+) \(crash-consistent, from the last backup\)", out)
    assert gate, out[-3000:]
    assert re.search(r"notice before: notes-app told: before, reboot none, window ends \S+Z", out)
    assert "patch lab-local: succeeded, installed notes-app=1.1" in out
    assert re.search(r"notice after: notes-app told: after, reboot no, window ends \S+Z", out)
    # The update restarted the app: an outage seen by its health probe, and over.
    measured = re.search(r"measured unavailability: ([\d.]+) s ±[\d.]+ s \(health probes: notes-app /health\)$", out,
                         re.MULTILINE)
    assert measured and float(measured.group(1)) > 0, out[-3000:]
    # What the host's history keeps says the same, and the sandbox now holds the update.
    shown = CliRunner().invoke(app, ["patch", "history", "lab-local", "--json", "--config",
                                     str(REPO / "configs" / "lab.yaml")])
    assert shown.exit_code == 0, shown.output
    [record] = json.loads(shown.stdout)
    assert record["status"] == "succeeded" and record["recovery"]["points"][0]["point"].endswith(f"{gate.group(1)}.json")
    assert [n["phase"] for n in record["notices"]] == ["before", "after"]
    assert f"{record['unavailability']['seconds']:.1f}" == measured.group(1)
    sandbox = REPO / ".lab" / "apt" / "var" / "lib" / "dpkg"
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "notes-app"], capture_output=True, text=True,
                               env=os.environ | {"DPKG_ADMINDIR": str(sandbox)})
    assert installed.stdout == "1.1"


def test_demo_leaves_nothing_running(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    namespace = re.search(r"namespace\s*│ (\S+)", demo.stdout)
    pid = re.search(r"process\s*│ pid (\d+)", demo.stdout)
    assert namespace and pid, demo.stdout[-3000:]
    assert namespace.group(1) not in namespaces()
    # The copy's process (pid recorded above) ran from the copy's path: none such is left.
    assert processes_mentioning(str(DRILL_COPY)) == []
    assert not port_open(18081)
    # Nor the lab's notes-app service the patch step ran and restarted.
    assert not port_open(18082) and processes_mentioning("--port 18082") == []
    assert not (REPO / ".lab" / "notes-service" / "pid").exists()
    assert not DRILL_COPY.exists()
