"""What a host's history record keeps of its safety net: the recovery point of each protected
disk that let it be patched and the rollback when its health probes failed afterwards; the
measured unavailability, the clock reading and the notice hook's answers.

Plain pydantic, no Prefect and no transport, like the rest of tasks/patching/models.py, which
nests these in HostPatchRecord.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointUsed(_Frozen):
    """The recovery point of one disk the gate accepted."""

    disk: str
    point: str = Field(description="The point's key in the store (points/<host>/<disk>/<time>.json).")
    time: AwareDatetime = Field(description="When the data is from (the snapshot's time).")
    consistency: str
    taken: bool = Field(description="Taken by this run right before the install (else an existing point).")
    seconds: float | None = Field(default=None, description="How long taking it took (a point this run took).")


class RestoredDisk(_Frozen):
    disk: str
    point: str
    bytes_written: int = Field(description="Bytes the restore wrote onto the host (only what differed).")
    removed: int = Field(default=0, description="Entries the point lacked, removed so the disk equals it.")
    seconds: float
    source: str = Field(default="repository", description="Where the data came from: the repository, or the "
                                                          "instant copy (the point's clone kept on the host).")
    notes: list[str] = Field(default_factory=list, description="Why an instant copy the point had could not serve.")


#: A rollback that was never started: waiting for its approval, declined by a person, not
#: answered in time, or too late to finish inside the maintenance window.
NOT_STARTED = ("awaiting-approval", "declined", "unanswered", "too-late")


class RollbackRecord(_Frozen):
    """A rollback after failed health probes: what was restored, and the probes after it; or why
    none was started (`error` then says why)."""

    status: Literal["restored", "failed", "not-possible", "awaiting-approval", "declined", "unanswered", "too-late"]
    disks: list[RestoredDisk] = Field(default_factory=list)
    seconds: float = 0.0
    probes_after: str = Field(default="", description="'passed', or what still failed after the restore.")
    error: str = ""

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.disks)

    @property
    def left_for_a_person(self) -> bool:
        """The host is left as patched and unhealthy: no rollback was started, and no person chose that."""
        return self.status in ("unanswered", "too-late")

    def describe(self) -> str:
        if self.status in NOT_STARTED:
            return f"rollback not started: {self.error}"
        if self.status != "restored":
            return f"rollback {self.status}: {self.error}"
        disks = ", ".join(d.disk + (" from its instant copy" if d.source == "instant copy" else "") for d in self.disks)
        probes = "probes passed after it" if self.probes_after == "passed" else f"still unhealthy: {self.probes_after}"
        return (f"rolled back to the pre-patch point ({disks}; {self.bytes_written} bytes written in "
                f"{self.seconds:.1f} s); {probes}")


class RecoveryRecord(_Frozen):
    points: list[PointUsed] = Field(default_factory=list)
    rollback: RollbackRecord | None = None

    def describe(self) -> str:
        """One line for tables: each disk's point (stamp, and whether this run took it), then the rollback."""
        text = ", ".join(f"{p.disk}@{p.point.rsplit('/', 1)[-1].removesuffix('.json')}" + (" (taken)" if p.taken else "")
                         for p in self.points)
        return f"{text}; {self.rollback.describe()}" if self.rollback else text



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


__all__ = ["NOT_STARTED", "ClockReading", "NoticeAnswer", "NoticePhase", "Outage", "PointUsed", "RecoveryRecord", "RestoredDisk", "RollbackRecord", "TimeSync", "Unavailability"]
