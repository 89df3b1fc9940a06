"""`make demo` end to end: the whole cycle on the embedded lab, one block per step, in 80 columns.

The real demo runs as a subprocess, as `make demo` starts it: a real enrollment and assessment of
the lab host through its sandboxed apt, a real dry run, real backups into the local store, a real
drill of plan lab-notes (notes-app restored, started inside a real network namespace, probed over
HTTP, with sqlite3 and by checksums), a real patch run of the lab host (real apt-get and dpkg in
the lab's sandbox, packages built by the demo, the running notes-app restarted by one and its
database broken by the next, probed over HTTP) and the real rollback of the notes disk, all on
Prefect's temporary server.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / ".lab"
DRILL_COPY = LAB / "drill" / "lab-notes"
STEPS = ("lab", "assess", "plan", "backup", "incremental", "verify", "restore", "drill", "patch", "safety net")
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


def demo_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A terminal wider than 80 columns (the demo must keep to 80 anyway), no Prefect server
    configured, and a Prefect home of its own: no `make server` another test runs is found."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PATCHDRILL_SERVER")}
    return env | {"COLUMNS": "200", "PREFECT_HOME": str(tmp / "prefect-home")} | extra


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo(demo_home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.demo"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=demo_env(demo_home))


def block(out: str, step: str) -> str:
    """The lines of one step's block: its mark line and the indented lines under it."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"[✓✗] {re.escape(step)}\s", line))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def test_every_step_has_its_tick_in_runbook_order_on_one_80_column_screen(
        demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    marked = [line for line in out.splitlines() if line[:2] in ("✓ ", "✗ ")]
    # A block's first line: the mark, the step's name in 11 columns, what it did.
    assert [line[2:13].strip() for line in marked[:-1]] == list(STEPS), out
    assert all(line.startswith("✓") for line in marked), out
    assert marked[-1] == "✓ the whole cycle ran"
    widest = max(len(line) for line in out.splitlines())
    assert widest <= 80, [line for line in out.splitlines() if len(line) > 80]
    assert len(out.splitlines()) <= 45, out
    # Each step's first line ends with its seconds.
    for step in STEPS:
        assert re.search(r"\d+\.\d s$", block(out, step).splitlines()[0]), block(out, step)


def test_the_logs_are_in_the_file_it_names_and_not_on_the_screen(demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    assert re.search(r"^logs    \.lab/demo\.log$", out, re.MULTILINE), out[-500:]
    log = (LAB / "demo.log").read_text()
    # structlog events, Prefect's run lines, and the temporary server's own lines (a child process).
    assert "backup.point" in log and "Beginning flow run" in log and "Starting temporary server" in log
    assert "Stopping temporary server" in log  # written at exit, after the screen's last line
    for noise in ("[info", "INFO", "Flow run", "Task run"):
        assert noise not in out, noise
    assert demo.stderr == ""
    assert "Traceback" not in log


def test_assess_and_plan_are_read_only_and_name_the_update_the_window_and_the_reboots(
        demo: subprocess.CompletedProcess[str]) -> None:
    assess, plan = block(demo.stdout, "assess"), block(demo.stdout, "plan")
    assert re.search(r"lab-local: .+, apt", assess), assess
    assert "missing: notes-app=1.1 (Security); reboot pending: no" in assess
    assert "dry run, policy lab-safety: 1 host in 1 batch" in plan
    assert "batch 1: update domain 0: lab-local" in plan
    assert re.search(r"window open until \S+ UTC", plan), plan
    assert "reboots expected: none" in plan


def test_backup_incremental_verify_and_restore_show_their_figures(demo: subprocess.CompletedProcess[str]) -> None:
    out = demo.stdout
    full = re.search(r"([\d.]+) MiB read, ([\d.]+) MiB stored", block(out, "backup"))
    incremental = re.search(r"([\d.]+) MiB read, ([\d.]+) MiB stored", block(out, "incremental"))
    assert full and incremental, out
    # Two 1 MiB image blocks and a small file changed: what is stored is what changed.
    assert float(incremental.group(2)) == 2.0 and float(full.group(2)) > 30
    assert re.search(r"(\d+)/\1 chunks of 6 points read back, all intact", block(out, "verify"))
    assert "byte-identical to the originals" in block(out, "restore")


def test_the_drill_shows_its_probes_rto_rpo_and_cleanup_proof(demo: subprocess.CompletedProcess[str]) -> None:
    drill = block(demo.stdout, "drill")
    assert re.search(r"plan lab-notes: notes@\d{8}T\d{6}Z restored", drill), drill
    assert re.search(r"started in namespace pd-\S+: no route out", drill), drill
    assert "probes inside it: http ✓  sql ✓  checksum ✓" in drill
    assert re.search(r"│ RTO │ [\d.]+ (s|min)\s*│ 5 min 00 s\s*│ ✓ │", drill), drill
    assert re.search(r"│ RPO │ [\d.]+ (s|min)\s*│ 24 h 00 min │ ✓ │", drill), drill
    assert "cleanup: process, path, copy-root, namespace: each checked gone" in drill
    assert "primary untouched: checksums equal before and after" in drill
    report = re.search(r"^report  (\S+\.html)$", demo.stdout, re.MULTILINE)
    assert report, demo.stdout[-500:]
    page = (REPO / report.group(1)).read_text()
    assert "lab-notes" in page and "cleanup" in page


def test_the_patch_passes_its_gate_and_the_bad_update_is_rolled_back(demo: subprocess.CompletedProcess[str]) -> None:
    patch, net = block(demo.stdout, "patch"), block(demo.stdout, "safety net")
    gate = re.search(r"gate: notes@(\d{8}T\d{6})Z, from the last backup", patch)
    assert gate, patch
    assert "installed notes-app=1.1, no reboot; notices: before and after" in patch
    unavailable = re.search(r"unavailable ([\d.]+) s ±[\d.]+ s \(health probes: notes-app /health\)", patch)
    assert unavailable and float(unavailable.group(1)) > 0, patch
    taken = re.search(r"notes-app=1\.2 installed after point notes@(\d{8}T\d{6})Z", net)
    assert taken, net
    assert "health probe failed: notes-app /health: answered 503, expected 200" in net
    assert re.search(r"rolled back: notes restored from that point, [\d.]+ KiB written", net), net
    assert "health probe after: passed; the run ends Failed, as it must" in net
    # The history says the same, newest first: the rollback, then the patch behind the gate.
    shown = CliRunner().invoke(app, ["patch", "history", "lab-local", "--json", "--config",
                                     str(REPO / "configs" / "lab.yaml")])
    assert shown.exit_code == 0, shown.output
    rolled, patched = json.loads(shown.stdout)
    assert patched["status"] == "succeeded" and gate.group(1) in patched["recovery"]["points"][0]["point"]
    assert f"{patched['unavailability']['seconds']:.1f}" == unavailable.group(1)
    assert rolled["status"] == "failed" and taken.group(1) in rolled["recovery"]["points"][0]["point"]
    rollback = rolled["recovery"]["rollback"]
    assert rollback["status"] == "restored" and rollback["probes_after"] == "passed"
    assert [d["disk"] for d in rollback["disks"]] == ["notes"]
    # The database is the point's again: the table 1.2's migration renamed is back, every note in it.
    with sqlite3.connect(LAB / "notes-app" / "data" / "notes.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM notes").fetchone() == (120,)
    sandbox = LAB / "apt" / "var" / "lib" / "dpkg"
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "notes-app"], capture_output=True, text=True,
                               env=os.environ | {"DPKG_ADMINDIR": str(sandbox)})
    assert installed.stdout == "1.2"  # the package database is not on the notes disk


def test_the_demo_leaves_nothing_running(demo: subprocess.CompletedProcess[str], demo_home: Path) -> None:
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    namespace = re.search(r"started in namespace (\S+):", demo.stdout)
    assert namespace, demo.stdout
    assert namespace.group(1) not in namespaces()
    assert processes_mentioning(str(DRILL_COPY)) == [] and not port_open(18081) and not DRILL_COPY.exists()
    # Nor the lab's notes-app service the patch steps ran, restarted and rolled back.
    assert not port_open(18082) and processes_mentioning("--port 18082") == []
    assert not (LAB / "notes-service" / "pid").exists()
    # Nor Prefect's temporary server, nor a background server.
    server = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", (LAB / "demo.log").read_text())
    assert server and not port_open(int(server.group(1)))
    assert processes_mentioning(str(demo_home)) == []
    # Its runs were kept in .lab's own database: none left in the user's Prefect home.
    assert (LAB / "prefect" / "prefect.db").stat().st_size > 0
    assert not (demo_home / "prefect-home" / "prefect.db").exists()


def test_a_configured_server_that_does_not_answer_stops_it_before_anything_is_touched(
        demo: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    before = (LAB / "demo.log").stat().st_mtime_ns
    refused = subprocess.run([sys.executable, "-m", "cli.demo", "--verbose"], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=demo_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert refused.returncode == 1
    assert "✗ the Prefect server at http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in refused.stdout
    assert "Traceback" not in refused.stderr
    # The last demo's lab is as it left it.
    assert (LAB / "demo.log").stat().st_mtime_ns == before and (LAB / "store").is_dir()


def run_in_terminal(env: dict[str, str], interrupt_at: bytes, timeout: float = 300) -> tuple[str, int]:
    """The demo on a real pseudo-terminal (so its spinner runs), sent one SIGINT, as Ctrl-C
    sends it, once `interrupt_at` is on the screen; what the terminal showed and the exit code."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the demo, as `make demo` starts it
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "cli.demo"], env)
    shown, interrupted, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    chunk = os.read(terminal, 65536)
                except OSError:  # the child has gone: its side of the terminal closed
                    break
                if not chunk:
                    break
                shown += chunk
            if not interrupted and interrupt_at in shown:
                os.kill(pid, signal.SIGINT)
                interrupted = True
    finally:
        os.close(terminal)
    _, status = os.waitpid(pid, 0)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace")), os.waitstatus_to_exitcode(status)


def test_ctrl_c_stops_the_step_under_way_and_the_demo_with_nothing_left(tmp_path: Path) -> None:
    """After the tests that read the full run's .lab/: this demo starts afresh and is stopped."""
    # Interrupted while it assesses (seconds long: the temporary API starts then), so the stop
    # lands inside a step whatever the machine's speed; a backup's own stop is in test_stop_signals.
    shown, code = run_in_terminal(demo_env(tmp_path, COLUMNS="80"), interrupt_at=b"assess: enrolling")
    assert code == 130, shown[-2000:]
    assert re.search(r"✗ assess .*\n(.*\n)*\s+stopped: interrupted by SIGINT", shown), shown[-2000:]
    assert "✗ the demo stopped at assess" in shown and "plan" not in shown.split("✗ assess", 1)[1]
    assert "Beginning flow run" not in shown and "[info" not in shown  # the logs stayed in the file
    assert "SIGINT: stopping cleanly" in (LAB / "demo.log").read_text()
    assert not port_open(18082) and processes_mentioning("--port 18082") == []
    assert processes_mentioning(str(tmp_path)) == []


def test_kill_9_of_the_demo_takes_its_notes_service_with_it(tmp_path: Path) -> None:
    """After the tests that read the full run's .lab/: this demo starts afresh and is killed.
    Prefect's temporary server, started in a session of its own so that a Ctrl-C cannot end it
    under a run, outlives a kill -9 (cli/temporary_server.py): it is ended here."""
    demo = subprocess.Popen([sys.executable, "-m", "cli.demo"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=demo_env(tmp_path))
    assert demo.stdout is not None
    try:
        for line in demo.stdout:
            if line.startswith("✓ assess"):  # the notes service runs from the lab step on
                break
        assert port_open(18082)
        demo.kill()
        demo.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (port_open(18082) or processes_mentioning("--port 18082")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not port_open(18082) and processes_mentioning("--port 18082") == []
    finally:
        server = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", (LAB / "demo.log").read_text())
        for pid in processes_mentioning(f"--port {server.group(1)}") if server else []:
            os.kill(pid, signal.SIGKILL)


def test_a_notes_app_left_on_its_port_stops_the_demo_at_the_lab_step_with_what_to_do(tmp_path: Path) -> None:
    """Last in this file: it starts a new demo, which empties .lab/ before it stops."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 18082))
        squatter.listen()
        stopped = subprocess.run([sys.executable, "-m", "cli.demo"], cwd=REPO, capture_output=True, text=True,
                                 timeout=300, env=demo_env(tmp_path))
    assert stopped.returncode == 1, stopped.stdout
    lab = block(stopped.stdout, "lab")
    assert lab.startswith("✗ lab") and "port 18082 is taken already" in lab and "fuser -k 18082/tcp" in lab
    assert "✗ the demo stopped at lab" in stopped.stdout
    assert processes_mentioning("--port 18082") == [] and not (LAB / "notes-service" / "pid").exists()
