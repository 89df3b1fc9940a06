"""`make demo`'s patch steps: a maintenance cycle behind its safety net on the lab host.

The lab host is this machine, so nothing real is upgraded: its apt is the sandbox of
cli/lab_apt.py, in which notes-app 1.0 is installed and a security update 1.1 waits in a
repository built here with dpkg-deb. The notes application itself runs for real (port 18082),
kept up the way a service manager keeps a service (`NotesService`: restarted a second after it
exits, stopped and started by its `ctl` script as `systemctl stop|start` would), and the
update's postinst restarts it as a package upgrade restarts its service.

Policy lab-safety (configs/lab.yaml) patches 1.1: the recovery-point gate passes on the point
the demo's backup made of the notes disk, the notice hook is told before and after, and the
app's health probe measures the outage around the restart. Then 1.2 is published, whose
postinst migrates the database wrongly (it renames the notes table the app reads): policy
lab-rollback backs the notes disk up right before the install, the health probe fails after it,
and the rollback stops the service, restores the disk from that point and starts it again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from cli import lab_apt
from cli.demo_screen import Step
from tasks.rendering import human_size

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / ".lab"
POLICY = "lab-safety"
ROLLBACK_POLICY = "lab-rollback"
HOST = "lab-local"
PACKAGE = "notes-app"
PORT = 18082
SERVICE = LAB / "notes-service"
#: Where lab-rollback's workload_stop/workload_start find the service's ctl script.
SERVICE_ENV = "LAB_NOTES_SERVICE"
#: How long the service manager waits before starting the application again (systemd's RestartSec).
RESTART_SECONDS = 1.0
STARTUP_SECONDS = 30.0
DESCRIPTION = "notes web application of the patchdrill lab"
#: The update's postinst: what `systemctl try-restart` does to a running service, by its pid file.
RESTART_POSTINST = """#!/bin/sh
set -e
pidfile="{pidfile}"
if [ -s "$pidfile" ]; then kill -TERM "$(cat "$pidfile")" 2>/dev/null || true; fi
"""
#: The bad update's postinst: a schema migration the running code does not follow.
BROKEN_POSTINST = """#!/bin/sh
set -e
python3 - "{database}" <<'MIGRATION'
import sqlite3, sys
with sqlite3.connect(sys.argv[1]) as db:
    db.execute("ALTER TABLE notes RENAME TO notes_v2")
MIGRATION
"""
#: `ctl stop|start`: stop waits until the process is gone, start until /health answers at all.
CTL = """#!/usr/bin/env python3
import os, sys, time, urllib.error, urllib.request
from pathlib import Path
service = Path(__file__).resolve().parent
stopped, pidfile = service / "stopped", service / "pid"
deadline = time.monotonic() + {startup}
if sys.argv[1:] == ["stop"]:
    stopped.touch()
    pid = int(pidfile.read_text()) if pidfile.exists() and pidfile.read_text().strip() else None
    if pid:
        try:
            os.kill(pid, 15)
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.02)
            sys.exit(f"notes-app (pid {{pid}}) did not stop")
        except ProcessLookupError:
            pass
elif sys.argv[1:] == ["start"]:
    stopped.unlink(missing_ok=True)
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen("http://127.0.0.1:{port}/health", timeout=1)
            sys.exit(0)
        except urllib.error.HTTPError:
            sys.exit(0)  # up, whatever it says: the health probes judge that
        except OSError:
            time.sleep(0.05)
    sys.exit("notes-app did not start")
else:
    sys.exit("usage: ctl stop|start")
"""


#: The app gets SIGTERM when the thread that started it ends, the demo killed with it (kill -9
#: included), as a unit ends with its service manager; setpriv is util-linux's, on every Debian.
DIE_WITH_DEMO = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


class ServiceFailed(RuntimeError):
    """notes-app did not come up; the message says where its log is."""


class NotesService:
    """notes-app on port 18082: started again RESTART_SECONDS after it exits, unless stopped by
    its ctl script, until stop()."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pidfile = SERVICE / "pid"
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="notes-service", daemon=True)

    def __enter__(self) -> "NotesService":
        if port_taken():
            raise ServiceFailed(f"port {PORT} is taken already (a notes-app an earlier demo left when it was "
                                f"killed?): stop what listens there, e.g. `fuser -k {PORT}/tcp`")
        SERVICE.mkdir(parents=True, exist_ok=True)
        ctl = SERVICE / "ctl"
        ctl.write_text(CTL.format(port=PORT, startup=STARTUP_SECONDS))
        ctl.chmod(0o755)
        (SERVICE / "stopped").unlink(missing_ok=True)
        os.environ[SERVICE_ENV] = str(SERVICE)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceFailed(f"notes-app did not answer on port {PORT}; see {SERVICE / 'log'}")
            time.sleep(0.1)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            if (SERVICE / "stopped").exists():
                self._stopping.wait(0.02)
                continue
            with self._lock, (SERVICE / "log").open("ab") as log:
                if self._stopping.is_set():
                    return
                self._process = subprocess.Popen(
                    [*DIE_WITH_DEMO, sys.executable, str(self.home / "app.py"), "--data", str(self.home / "data"),
                     "--port", str(PORT), "--bind", "127.0.0.1"], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT)
                self.pidfile.write_text(f"{self._process.pid}\n")
            self._process.wait()
            if not (SERVICE / "stopped").exists():
                self._stopping.wait(RESTART_SECONDS)

    def kill(self) -> None:
        """For an exit at once (a second Ctrl-C): the app must not outlive the demo, and the
        supervisor dies with the process."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                self._process.wait(timeout=30)
        if self._thread.is_alive():
            self._thread.join()
        self.pidfile.unlink(missing_ok=True)
        os.environ.pop(SERVICE_ENV, None)


def port_taken() -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", PORT)) == 0


def healthy() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def prepare_update(pidfile: Path) -> None:
    """notes-app 1.0 installed in the lab host's sandboxed apt, 1.1 waiting as a security update."""
    lab_apt.make_lab_apt_root(lab_apt.REPOSITORY)
    lab_apt.install_package(lab_apt.build_package(PACKAGE, "1.0", LAB / "apt-base", description=DESCRIPTION))
    lab_apt.build_package(PACKAGE, "1.1", lab_apt.REPOSITORY, description=DESCRIPTION,
                          postinst=RESTART_POSTINST.format(pidfile=pidfile))
    lab_apt.index_repository(lab_apt.REPOSITORY)
    os.environ.update(lab_apt.environment())


def publish_broken_update(home: Path) -> None:
    """notes-app 1.2 in the repository: its postinst renames the table the running app reads."""
    lab_apt.build_package(PACKAGE, "1.2", lab_apt.REPOSITORY, description=DESCRIPTION,
                          postinst=BROKEN_POSTINST.format(database=home / "data" / "notes.sqlite3"))
    lab_apt.index_repository(lab_apt.REPOSITORY)


def stamp(point_key: str) -> str:
    """`points/h/notes/20261202T143605.171058Z.json` → `20261202T143605Z`."""
    name = point_key.rsplit("/", 1)[-1].removesuffix(".json")
    return name.split(".")[0] + "Z" if "." in name else name


def run_record(state: Any, step: Step) -> Any:
    """The one host record of a patch run's report, or None (the step then says why)."""
    from flows.patch import PatchRunReport

    step.ran(state.state_details.flow_run_id)
    report = state.result(raise_on_failure=False)
    if not isinstance(report, PatchRunReport) or len(report.records) != 1:
        step.failed(f"patch run {state.name}: {state.message or report}")
        return None
    return report.records[0]


def patch_step(step: Step, config: Path) -> None:
    """lab-safety's run: the gate on the last backup's point, notices, install, unavailability."""
    from flows.patch import patch_run
    from tasks.patching.models import ComplianceState

    state = patch_run(config_path=str(config), hosts=[HOST], policy=POLICY, refresh=False, return_state=True)
    record = run_record(state, step)
    if record is None:
        return
    for used in record.recovery.points if record.recovery else []:
        step.passed(f"gate: {used.disk}@{stamp(used.point)}, "
                    + ("taken now" if used.taken else "from the last backup"))
    done = (ComplianceState.INSTALLED, ComplianceState.INSTALLED_PENDING_REBOOT)
    installed = ", ".join(o.update_id for o in record.updates if o.state in done) or "nothing"
    told = [n.phase for n in record.notices if not n.failed]
    if record.status != "succeeded" or not state.is_completed():
        step.failed(f"{record.host} {record.status}: {record.reason}")
        return
    step.passed(f"installed {installed}, {'rebooted' if record.rebooted else 'no reboot'}; "
                f"notices: {' and '.join(told) or 'none'}")
    if record.unavailability is not None:
        step.passed(f"unavailable {record.unavailability.text()}")


def safety_net_step(step: Step, config: Path, home: Path) -> None:
    """lab-rollback's run of the bad update: point taken, probe fails, rollback, probe passes."""
    from flows.patch import patch_run

    publish_broken_update(home)
    state = patch_run(config_path=str(config), hosts=[HOST], policy=ROLLBACK_POLICY, return_state=True)
    record = run_record(state, step)
    if record is None:
        return
    taken = [p for p in (record.recovery.points if record.recovery else []) if p.taken]
    rollback = record.recovery.rollback if record.recovery else None
    installed = ", ".join(o.update_id for o in record.updates) or "nothing"
    step.passed(f"{installed} installed after point "
                + ", ".join(f"{p.disk}@{stamp(p.point)}" for p in taken),
                f"health probe failed: {health_failure(record.reason)}")
    if rollback is None or rollback.status != "restored" or rollback.probes_after != "passed":
        step.failed(f"rollback: {rollback.describe() if rollback else 'none'}")
        return
    for disk in rollback.disks:
        step.passed(f"rolled back: {disk.disk} restored from that point, "
                    f"{human_size(disk.bytes_written)} written")
    # A rolled-back host still failed its patch: the run must say Failed, not Completed.
    if state.is_failed():
        step.passed("health probe after: passed; the run ends Failed, as it must")
    else:
        step.failed(f"health probe after: passed, but the run ended {state.name}")


def health_failure(reason: str) -> str:
    """The probe's own words from a failed host's reason (`... health probes failed: X; ...`)."""
    failure = reason.split("; ", 1)[0].removeprefix("health: ")
    # "<probe name>: <url> answered 503, expected 200": the name says where, the URL is long.
    return re.sub(r"https?://\S+ ", "", failure)


__all__ = ["NotesService", "patch_step", "prepare_update", "safety_net_step"]
