"""The clock check: after a host's install (a reboot, a VM-preserving pause, a resume) its clock
is read against the controller's, and its time-sync service asked whether it is synchronised.

The host's time is read by a command of its own (`date`, or .NET's UtcNow on Windows) between
two readings of the controller's clock: the skew is the host's time minus the midpoint, known to
within half the round trip, and only a skew beyond the limit by more than that uncertainty
fails the gate, so a slow connection cannot fail a host whose clock is right. The time-sync
state comes from host_scripts/time_sync.sh (chrony, systemd-timesyncd, ntp) or time_sync.ps1
(w32time); it fails the gate only when the policy requires a synchronised service.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import structlog
from prefect import task

from configs.models import HostConfig
from configs.patch_safety import ClockCheck
from connectors import connect
from connectors.base import Connector, ConnectorError
from tasks.patching.safety.records import ClockReading, TimeSync, Unavailability

log = structlog.stdlib.get_logger("patchdrill.patch")

SCRIPTS = Path(__file__).with_name("host_scripts")
LINUX_SCRIPT = SCRIPTS / "time_sync.sh"
WINDOWS_SCRIPT = SCRIPTS / "time_sync.ps1"
LINUX_TIME = "date -u +%s.%N"
WINDOWS_TIME = "[DateTimeOffset]::UtcNow.ToUnixTimeMilliseconds()"
_SECONDS = re.compile(r"^\s*(\d+)(\.\d+)?\s*$")
# Units in the order a Linux host is likelier to run them; what reports call each.
_UNITS = {"chrony": "chrony", "chronyd": "chrony", "systemd-timesyncd": "systemd-timesyncd", "ntpsec": "ntp",
          "ntp": "ntp", "ntpd": "ntp"}
# What w32tm names as its source when it has no time server to follow.
_W32_UNSYNCED = {"", "local cmos clock", "free-running system clock"}


class ClockUnreadable(Exception):
    """The host answered, but not with a time."""


def read_skew(conn: Connector, *, windows: bool, timeout: float) -> tuple[float, float]:
    """(host clock − controller clock, uncertainty), in seconds."""
    sent = time.time()
    result = conn.run(WINDOWS_TIME if windows else LINUX_TIME, timeout=timeout)
    received = time.time()
    text = result.stdout.strip()
    match = _SECONDS.match(text)
    if not result.ok or not match:
        raise ClockUnreadable(f"the time command exited {result.exit_code} with {text[:80]!r}")
    uncertainty = (received - sent) / 2
    if windows:
        host = int(match.group(1)) / 1000
    elif match.group(2):
        host = float(match.group(1) + match.group(2))
    else:
        # A date without %N (busybox) gives whole seconds: the true time is within the second after.
        host, uncertainty = int(match.group(1)) + 0.5, uncertainty + 0.5
    return host - (sent + received) / 2, uncertainty


def parse_linux_sync(output: str) -> TimeSync:
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    active = [name for unit, name in _UNITS.items() if values.get(f"unit.{unit}") == "active"]
    leap = values.get("chrony.leap", "").strip()
    synced = values.get("timedatectl.synchronized", "").strip()
    synchronized: bool | None = None
    if leap:
        synchronized = leap == "Normal"
    elif synced in ("yes", "no"):
        synchronized = synced == "yes"
    service = active[0] if active else "none"
    detail = "; ".join(part for part in (f"chrony leap status {leap}" if leap else "",
                                         f"timedatectl NTPSynchronized={synced}" if synced else "") if part)
    return TimeSync(service=service, active=bool(active), synchronized=synchronized, detail=detail)


def parse_windows_sync(output: str) -> TimeSync:
    try:
        found = json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ClockUnreadable(f"time_sync.ps1 printed {output.strip()[:80]!r}, not JSON") from None
    source, last = str(found.get("source", "")), str(found.get("last_sync", ""))
    running = found.get("status") == "Running"
    synchronized = running and source.strip().lower() not in _W32_UNSYNCED and last.strip().lower() not in ("", "unspecified")
    return TimeSync(service="w32time", active=running, synchronized=synchronized if running else None,
                    detail=f"status {found.get('status')}" + (f", source {source}" if source else "")
                    + (f", last sync {last}" if last else ""))


def read_sync(conn: Connector, *, windows: bool, timeout: float) -> TimeSync:
    result = conn.run_script(WINDOWS_SCRIPT if windows else LINUX_SCRIPT, timeout=timeout)
    return parse_windows_sync(result.stdout) if windows else parse_linux_sync(result.stdout)


def judge(skew: float, uncertainty: float, sync: TimeSync, check: ClockCheck) -> str:
    """Why this reading fails the health gate; empty when it passes."""
    problems = []
    if abs(skew) - uncertainty > check.max_skew_seconds:
        side = "ahead of" if skew > 0 else "behind"
        problems.append(f"clock {abs(skew):.3f} s {side} the controller's (±{uncertainty:.3f} s), "
                        f"beyond the limit of {check.max_skew_seconds:g} s")
    if check.require_sync and not (sync.active and sync.synchronized):
        state = "no time-sync service runs" if not sync.active else f"{sync.service} is not synchronised"
        problems.append(f"time sync required: {state}")
    return "; ".join(problems)


def after_what(rebooted: bool, unavailability: Unavailability | None) -> str:
    """What the check follows: a reboot, an outage without one (a pause, a freeze), or an install."""
    if rebooted:
        return "reboot"
    return "outage" if unavailability is not None and unavailability.outages else "install"


def check_clock(conn: Connector, check: ClockCheck, *, windows: bool, after: str) -> ClockReading:
    skew, uncertainty = read_skew(conn, windows=windows, timeout=check.timeout_seconds)
    sync = read_sync(conn, windows=windows, timeout=check.timeout_seconds)
    return ClockReading(skew_seconds=skew, uncertainty_seconds=uncertainty, max_skew_seconds=check.max_skew_seconds,
                        after=after, sync=sync, failure=judge(skew, uncertainty, sync, check))


@task(name="clock-check", task_run_name="clock {host.name}")
def clock_task(host: HostConfig, base_dir: Path, check: ClockCheck, after: str) -> ClockReading:
    """The host's clock after its install; a reading that cannot be made fails the gate too."""
    try:
        with connect(host, base_dir=base_dir) as conn:
            reading = check_clock(conn, check, windows=host.os_family == "windows", after=after)
    except (ConnectorError, ClockUnreadable) as exc:
        reason = f"clock could not be read: {getattr(exc, 'message', None) or exc}"
        log.error("clock check failed", host=host.name, error=reason)
        return ClockReading(skew_seconds=None, uncertainty_seconds=0.0, max_skew_seconds=check.max_skew_seconds,
                            after=after, sync=TimeSync(service="unknown"), failure=reason)
    log_event = log.error if reading.failure else log.info
    log_event("clock checked", host=host.name, skew=round(reading.skew_seconds or 0.0, 3),
              uncertainty=round(reading.uncertainty_seconds, 3), sync=reading.sync.service,
              synchronized=reading.sync.synchronized, failure=reading.failure or None)
    return reading


__all__ = ["ClockUnreadable", "after_what", "check_clock", "clock_task", "judge", "parse_linux_sync",
           "parse_windows_sync", "read_skew", "read_sync"]
