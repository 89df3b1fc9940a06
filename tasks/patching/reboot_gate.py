"""The reboot gate: whether a patched host reboots, and proof that it really did.

The decision is made apart from whether every patch installed: a policy of IfRequired reboots
a host that asks for it even when one of its updates failed (the others still need the reboot
to take effect), Never leaves a pending reboot to the operator, and Always reboots regardless.
The calendar (no reboot for a hotpatching host in a hotpatch month) and the maintenance window
can only hold a reboot back, never force one.

A reboot is proven by the boot identity (Linux boot_id, Windows LastBootUpTime): the gate reads
it before, asks the host to restart, and waits until the host answers with a different one.
A host that is still on the old identity when the timeout ends did not reboot, which is a
failure, not a success that came back quickly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

from connectors.base import BootIdentity, Connector, ConnectorError, HostTimeout

RebootPolicy = Literal["IfRequired", "Never", "Always"]

LINUX_REBOOT = "shutdown -r now 'patchdrill: reboot after patching'"
WINDOWS_REBOOT = "Restart-Computer -Force"
# Long enough for a slow host to accept the request; the connection may drop before it answers.
REQUEST_TIMEOUT_SECONDS = 60.0


class RebootFailed(Exception):
    """The host refused to reboot, or did not come back with a new boot identity in time."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


@dataclass(frozen=True)
class RebootDecision:
    reboot: bool
    reason: str
    #: True when a reboot is needed but held back: the host stays InstalledPendingReboot.
    deferred: bool = False


def decide(policy: RebootPolicy, *, pending: bool, calendar_allows: bool, window_allows: bool) -> RebootDecision:
    """Whether to reboot now. Install success is deliberately not an input."""
    if policy == "Never":
        return RebootDecision(False, "policy Never: the pending reboot is left to the operator" if pending
                              else "policy Never", deferred=pending)
    wanted = policy == "Always" or pending
    if not wanted:
        return RebootDecision(False, "no reboot pending")
    if not calendar_allows:
        return RebootDecision(False, "hotpatch month: a hotpatching host does not reboot", deferred=pending)
    if not window_allows:
        return RebootDecision(False, "reboot held back: outside the maintenance window (needs the "
                              "reboot-outside-window flag or an approval that allows it)", deferred=True)
    return RebootDecision(True, "policy Always" if policy == "Always" else "reboot pending")


@dataclass(frozen=True)
class RebootOutcome:
    before: BootIdentity
    after: BootIdentity
    seconds: float


def reboot_command(connector: Connector) -> str:
    return WINDOWS_REBOOT if connector.os_family == "windows" else LINUX_REBOOT


def reboot_and_wait(
    connector: Connector,
    *,
    timeout: float,
    before_reboot: Callable[[BootIdentity], None],
    interval: float = 1.0,
) -> RebootOutcome:
    """Reboot the host and wait for it to come back as a new boot.

    `before_reboot` runs after the old identity is read and before the restart is requested:
    the caller records there that the host is going down, so no host reboots unrecorded.
    """
    started = time.monotonic()
    before = connector.boot_identity()
    before_reboot(before)
    try:
        result = connector.run(reboot_command(connector), timeout=REQUEST_TIMEOUT_SECONDS)
    except ConnectorError:
        # The host may cut the session while it goes down; whether it really rebooted is
        # decided by its boot identity below, not by this call.
        result = None
    if result is not None and not result.ok:
        detail = result.tail(3)
        raise RebootFailed(connector.name, f"the reboot request exited {result.exit_code}" + (f": {detail}" if detail else ""))
    try:
        after = connector.wait_until_up(timeout, interval=interval, not_boot_id=before.boot_id)
    except HostTimeout as exc:
        raise RebootFailed(connector.name, f"did not come back as a new boot within {timeout:.0f}s ({exc.message})") from None
    return RebootOutcome(before=before, after=after, seconds=time.monotonic() - started)


__all__ = ["RebootDecision", "RebootFailed", "RebootOutcome", "RebootPolicy", "decide", "reboot_and_wait", "reboot_command"]
