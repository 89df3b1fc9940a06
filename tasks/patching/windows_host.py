"""Enroll, assess, install and check reboots on a Windows host through any Connector.

The same four operations as tasks.patching.linux_host, so a run treats both families alike.
Everything goes through host_scripts/windows_update.ps1 (the Windows Update Agent in a
temporary scheduled task) and its JSON is validated by tasks.patching.windows_update; the
outcome of an install is judged by the agent's per-update result *and* a fresh search
afterwards, never by the script's exit code alone.
"""

from __future__ import annotations

from datetime import datetime

from connectors.base import Connector
from tasks.patching import windows_update
from tasks.patching.linux_host import InstallResult
from tasks.patching.models import Enrollment, Update


def enroll(connector: Connector, *, timezone_name: str = "UTC", now: datetime | None = None) -> Enrollment:
    """What the host is. Windows reports no IANA zone, so the inventory's zone is recorded."""
    report = windows_update.assess(connector)
    enrollment = windows_update.enrollment_from_report(report, connector.name, now=now)
    return enrollment.model_copy(update={"timezone": timezone_name})


def assess(connector: Connector, *, timeout: float | None = None) -> list[Update]:
    """Missing updates. Searching changes nothing on the host."""
    return windows_update.assess(connector, timeout=timeout).missing


def assess_with_reboot_state(connector: Connector, *, timeout: float | None = None) -> tuple[list[Update], bool]:
    """Missing updates and whether a reboot is pending, from one search (a search is slow)."""
    report = windows_update.assess(connector, timeout=timeout)
    return report.missing, report.reboot_pending.any


def reboot_pending(connector: Connector, *, timeout: float | None = None) -> bool:
    """Any of CBS RebootPending, WindowsUpdate RebootRequired, PendingFileRenameOperations."""
    return windows_update.assess(connector, timeout=timeout).reboot_pending.any


def install(connector: Connector, updates: list[Update], *, timeout: float | None = None) -> InstallResult:
    if not updates:
        return InstallResult(outcomes=[], reboot_required=reboot_pending(connector, timeout=timeout))
    report = windows_update.install(connector, updates, timeout=timeout)
    assert report.install is not None  # windows_update.install checked the operation
    return InstallResult(
        outcomes=windows_update.install_outcomes(report, updates),
        reboot_required=report.install.reboot_required or report.reboot_pending.any,
    )


__all__ = ["assess", "assess_with_reboot_state", "enroll", "install", "reboot_pending"]
