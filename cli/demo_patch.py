"""`make demo`'s patch step: one maintenance cycle with its safety net on the lab host.

The lab host is this machine, so nothing real is upgraded: its apt is the sandbox of
cli/lab_apt.py, in which notes-app 1.0 is installed and a security update 1.1 waits in a
repository built here with dpkg-deb. The notes application itself runs for real (port 18082),
kept up the way a service manager keeps a service (restarted a second after it exits), and the
update's postinst restarts it as a package upgrade restarts its service. Policy lab-safety
(configs/lab.yaml) then shows: the dry run's plan; the recovery-point gate passing on the point
the demo's backup made of the notes disk; the notice hook's lines before and after; the install;
and the unavailability the app's health probe measured around the restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
from rich.console import Console

from cli import lab_apt

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / ".lab"
POLICY = "lab-safety"
HOST = "lab-local"
PACKAGE = "notes-app"
PORT = 18082
SERVICE = LAB / "notes-service"
#: How long the service manager waits before starting the application again (systemd's RestartSec).
RESTART_SECONDS = 1.0
STARTUP_SECONDS = 30.0
#: The update's postinst: what `systemctl try-restart` does to a running service, by its pid file.
RESTART_POSTINST = """#!/bin/sh
set -e
pidfile="{pidfile}"
if [ -s "$pidfile" ]; then kill -TERM "$(cat "$pidfile")" 2>/dev/null || true; fi
"""


class ServiceFailed(RuntimeError):
    """notes-app did not come up; the message says where its log is."""


class NotesService:
    """notes-app on port 18082, started again RESTART_SECONDS after it exits until stop()."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pidfile = SERVICE / "pid"
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="notes-service", daemon=True)

    def __enter__(self) -> "NotesService":
        SERVICE.mkdir(parents=True, exist_ok=True)
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
            with self._lock, (SERVICE / "log").open("ab") as log:
                if self._stopping.is_set():
                    return
                self._process = subprocess.Popen(
                    [sys.executable, str(self.home / "app.py"), "--data", str(self.home / "data"), "--port", str(PORT),
                     "--bind", "127.0.0.1"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
                self.pidfile.write_text(f"{self._process.pid}\n")
            self._process.wait()
            self._stopping.wait(RESTART_SECONDS)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
                self._process.wait(timeout=30)
        if self._thread.is_alive():
            self._thread.join()
        self.pidfile.unlink(missing_ok=True)


def healthy() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def prepare_update(pidfile: Path) -> None:
    """notes-app 1.0 installed in the lab host's sandboxed apt, 1.1 waiting as a security update."""
    lab_apt.make_lab_apt_root(lab_apt.REPOSITORY)
    description = "notes web application of the patchdrill lab"
    lab_apt.install_package(lab_apt.build_package(PACKAGE, "1.0", LAB / "apt-base", description=description))
    lab_apt.build_package(PACKAGE, "1.1", lab_apt.REPOSITORY, description=description,
                          postinst=RESTART_POSTINST.format(pidfile=pidfile))
    lab_apt.index_repository(lab_apt.REPOSITORY)
    os.environ.update(lab_apt.environment())


def patch_with_safety_net(config: Path, console: Console) -> bool:
    """Dry run, then the run: gate, notices, install, measured unavailability. True when it succeeded."""
    try:
        return _patch(config, console)
    except (ServiceFailed, lab_apt.LabAptError) as exc:
        console.print(f"[red]patch step not run[/]: {exc}", highlight=False, soft_wrap=True)
        return False


def _patch(config: Path, console: Console) -> bool:
    from flows.patch import PatchRunReport, patch_run
    from tasks.patching.models import ComplianceState

    with NotesService(LAB / "notes-app") as service:
        prepare_update(service.pidfile)
        dry = patch_run(config_path=str(config), hosts=[HOST], policy=POLICY, dry_run=True, return_state=True)
        planned = dry.result(raise_on_failure=False)
        if not isinstance(planned, PatchRunReport):
            console.print(f"[red]patch dry run {dry.name}[/]: {dry.message}", highlight=False, soft_wrap=True)
            return False
        chosen = ", ".join(u.id for p in planned.assessment.plans for u in p.install) or "nothing"
        console.print(f"patch dry run (policy {POLICY}): {chosen}", highlight=False, soft_wrap=True)
        console.print(planned.plan.as_text(), highlight=False, soft_wrap=True)
        state = patch_run(config_path=str(config), hosts=[HOST], policy=POLICY, return_state=True)
        report = state.result(raise_on_failure=False)
    if not isinstance(report, PatchRunReport) or len(report.records) != 1:
        console.print(f"[red]patch run {state.name}[/]: {state.message}", highlight=False, soft_wrap=True)
        return False
    [record] = report.records
    for used in record.recovery.points if record.recovery else []:
        console.print(f"recovery-point gate: passed on {used.disk}@{used.point.rsplit('/', 1)[1].removesuffix('.json')} "
                      f"({used.consistency}, {'taken now' if used.taken else 'from the last backup'})", highlight=False, soft_wrap=True)
    notices = {notice.phase: notice for notice in record.notices}
    if "before" in notices:
        console.print(f"notice before: {notices['before'].reason}", highlight=False, soft_wrap=True)
    done = (ComplianceState.INSTALLED, ComplianceState.INSTALLED_PENDING_REBOOT)
    installed = ", ".join(o.update_id for o in record.updates if o.state in done) or "nothing"
    color = "green" if record.status == "succeeded" else "red"
    console.print(f"patch {record.host}: [{color}]{record.status}[/], installed {installed}"
                  + ("" if record.status == "succeeded" else f": {record.reason}"), highlight=False, soft_wrap=True)
    if record.unavailability is not None:
        console.print(f"measured unavailability: {record.unavailability.text()}", highlight=False, soft_wrap=True)
    if "after" in notices:
        console.print(f"notice after: {notices['after'].reason}", highlight=False, soft_wrap=True)
    return state.is_completed() and record.status == "succeeded"


__all__ = ["NotesService", "patch_with_safety_net"]
