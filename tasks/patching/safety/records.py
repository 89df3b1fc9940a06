"""What a patched host's safety checks found, as kept in its HostPatchRecord: the measured
unavailability, the clock reading and the notice hook's answers. Plain pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Outage(_Frozen):
    started_at: AwareDatetime = Field(description="When the first failed probe of the outage saw the host down.")
    seconds: float = Field(ge=0, description="Until the first passing probe after it (or the end of probing).")
    recovered: bool = Field(description="False when the host still failed when probing ended.")
    detail: str = Field(default="", description="What the first failed probe said.")


class Unavailability(_Frozen):
    """How long a host was unavailable while it was patched, measured by probing it."""

    seconds: float = Field(ge=0, description="Total measured unavailability: the outages' sum.")
    resolution_seconds: float = Field(
        gt=0, description="How far the figure may be from the truth: the probe interval, or the longer gap between "
                          "two probes at an outage's edge when a probe outlasted the interval.")
    interval_seconds: float = Field(gt=0, description="The policy's probe interval.")
    probe: str = Field(description="What measured it: 'ssh connect', 'winrm connect', 'local', or the health probes.")
    update_domain: int = 0
    probes: int = Field(ge=0, description="Probes made.")
    outages: list[Outage] = Field(default_factory=list)

    @property
    def recovered(self) -> bool:
        return all(outage.recovered for outage in self.outages)

    def text(self) -> str:
        """'2.3 s ±0.5 s (ssh connect)', as tables show it."""
        tail = "" if self.recovered else ", still down when probing ended"
        return f"{self.seconds:.1f} s ±{self.resolution_seconds:.2g} s ({self.probe}{tail})"


class TimeSync(_Frozen):
    service: str = Field(description="chrony, systemd-timesyncd, ntp, w32time, or 'none' when no service was found.")
    active: bool = False
    synchronized: bool | None = Field(default=None, description="Whether the service says it is synchronised; None: unknown.")
    detail: str = ""


class ClockReading(_Frozen):
    """The host's clock against the controller's, read once after its install."""

    skew_seconds: float | None = Field(description="Host clock minus controller clock (positive: the host is ahead); "
                                                   "None when it could not be read.")
    uncertainty_seconds: float = Field(ge=0, description="Half the reading's round trip: the skew is known to within it.")
    max_skew_seconds: float
    after: str = Field(description="What the check followed: 'reboot', 'outage' (a pause without a reboot) or 'install'.")
    sync: TimeSync
    failure: str = Field(default="", description="Why the clock fails the health gate; empty when it passes.")


NoticePhase = Literal["before", "after"]


class NoticeAnswer(_Frozen):
    phase: NoticePhase
    sent_at: AwareDatetime
    hook: str = Field(description="host, controller or webhook.")
    deferred: bool = False
    failed: bool = False
    reason: str = ""


__all__ = ["ClockReading", "NoticeAnswer", "NoticePhase", "Outage", "TimeSync", "Unavailability"]
