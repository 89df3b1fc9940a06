"""A patch policy's safety settings: how unavailability is measured, how a host's clock is
checked after a reboot or a pause, and who is told before a host's maintenance starts.

Plain pydantic, nested in `configs.policies.PatchPolicy` (`unavailability`, `clock`, `notice`);
`tasks.patching.safety` runs them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from configs.alerts import WebhookConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnavailabilityProbing(_Frozen):
    """How a patched host's unavailability is measured: probed from before its install until it
    answers again after the reboot gate (with the policy's health probes, or a connect when it
    has none)."""

    interval_seconds: float = Field(
        default=1.0, ge=0.05, le=300,
        description="Seconds between two probes while a host is patched: the measurement's resolution, "
                    "reported with every figure.")
    timeout_seconds: float = Field(
        default=5.0, gt=0, le=300,
        description="How long one reachability probe (a connect) may take before it counts as failed.")
    settle_seconds: float = Field(
        default=0.0, ge=0, le=3600,
        description="After the reboot gate, how long probing goes on for a host that does not answer yet, "
                    "before it is reported still unavailable (0: one more probe). The health check runs after.")


class ClockCheck(_Frozen):
    """The host's clock against the controller's, checked after every install (a reboot, a
    VM-preserving pause, a resume): beyond max_skew_seconds fails the host's health gate."""

    max_skew_seconds: float = Field(default=2.0, gt=0, le=86400,
                                    description="Largest clock difference from the controller a host may have.")
    require_sync: bool = Field(
        default=False, description="Also fail a host whose time-sync service (chrony, systemd-timesyncd, w32time) "
                                   "is not running or not synchronised.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="How long the reading may take.")


class _Notice(_Frozen):
    lead_seconds: float = Field(
        default=0.0, ge=0, le=7 * 24 * 3600,
        description="How long before its batch starts a host's notice is sent (the batch waits for it).")
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600, description="How long the hook may take.")
    defer_exit_code: int = Field(
        default=75, ge=1, le=255,
        description="Exit code with which a command hook asks to defer the host (75, EX_TEMPFAIL, by default); "
                    "its last line of output is the reason. Any other non-zero exit is a failed hook, which skips "
                    "the host too.")


class HostCommandNotice(_Notice):
    kind: Literal["host"] = "host"
    command: str = Field(min_length=1, description="Shell command (PowerShell on Windows) run on the host itself.")


class ControllerCommandNotice(_Notice):
    kind: Literal["controller"] = "controller"
    command: str = Field(min_length=1, description="Shell command run on the controller (the machine running the flow).")


class WebhookNotice(_Notice):
    kind: Literal["webhook"] = "webhook"
    webhook: WebhookConfig = Field(
        description="Where the notice is posted as JSON; a reply {\"defer\": true, \"reason\": \"...\"} defers the host.")


NoticeHook = Annotated[HostCommandNotice | ControllerCommandNotice | WebhookNotice, Field(discriminator="kind")]


__all__ = ["ClockCheck", "ControllerCommandNotice", "HostCommandNotice", "NoticeHook", "UnavailabilityProbing",
           "WebhookNotice"]
