"""A drill's journal: what ran when, which points were used, what the probes said, what cleanup
proved, and the RTO and RPO measured against the plan's targets.

Plain pydantic, no Prefect and no transport: the flows fill it in as they go, the store keeps it
as the run's evidence record (JSON), and the markdown, table and HTML reports are rendered from
it alone, so a report can be rebuilt later from the store without the run.

RTO is measured from the failover's start to the moment the last group's probes all passed;
RPO is the failover's start minus the oldest recovery point the run restored (the worst data
loss of any member).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DrillKind = Literal["test-failover", "planned-failover", "unplanned-failover", "failback"]
Outcome = Literal["running", "passed", "failed", "cancelled", "crashed"]
ProbePhase = Literal["primary-before", "copy", "primary-after", "target"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(_Record):
    """One timestamped step of the timeline (readiness, restore, start, probe, cleanup…)."""

    name: str
    group: str | None = None
    member: str | None = None
    started: datetime
    finished: datetime | None = None
    ok: bool | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        return (self.finished - self.started).total_seconds() if self.finished else None


class ProbeRecord(_Record):
    member: str
    phase: ProbePhase
    probe: str
    ok: bool
    detail: str
    seconds: float
    at: datetime
    observed: str | None = None


class PointUsed(_Record):
    member: str
    host: str
    disk: str
    point_id: str
    taken_at: datetime
    consistency: str
    bytes_written: int | None = None
    restore_seconds: float | None = None


class CleanupItem(_Record):
    """One thing the run created, what cleanup did to it and how its absence was verified."""

    member: str | None = None
    kind: str
    target: str
    identifier: str
    action: str
    verified: bool
    evidence: str


class Checksum(_Record):
    """A digest of a primary's disk taken before and after the run: a test failover must leave
    them equal (it never touches the primary)."""

    host: str
    disk: str
    before: str
    after: str | None = None

    @property
    def unchanged(self) -> bool | None:
        return None if self.after is None else self.before == self.after


class GroupResult(_Record):
    name: str
    started: datetime
    probes_passed_at: datetime | None = None
    ok: bool = False
    detail: str = ""


class DrillEvidence(_Record):
    run_id: str
    kind: DrillKind
    plan: str
    plan_version: str = Field(description="sha256 of the plan's canonical JSON: which version of the plan ran.")
    operator: str
    started: datetime = Field(description="When the failover itself began: RTO and RPO count from here.")
    finished: datetime | None = None
    outcome: Outcome = "running"
    rto_target_seconds: float
    rpo_target_seconds: float
    groups: list[GroupResult] = Field(default_factory=list)
    points: list[PointUsed] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    probes: list[ProbeRecord] = Field(default_factory=list)
    cleanup: list[CleanupItem] = Field(default_factory=list)
    cleanup_verified: bool | None = None
    primary_checksums: list[Checksum] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @property
    def rto_seconds(self) -> float | None:
        """Start → all probes of the last group pass; None while (or when) that never happened."""
        if not self.groups or any(g.probes_passed_at is None for g in self.groups):
            return None
        last = max(g.probes_passed_at for g in self.groups if g.probes_passed_at is not None)
        return (last - self.started).total_seconds()

    @property
    def rpo_seconds(self) -> float | None:
        """Start − the oldest point restored: the most data any member lost."""
        if not self.points:
            return None
        # A planned failover's final point is taken after the start: nothing was lost, not less.
        return max(0.0, (self.started - min(p.taken_at for p in self.points)).total_seconds())

    @property
    def rto_ok(self) -> bool | None:
        rto = self.rto_seconds
        return None if rto is None else rto <= self.rto_target_seconds

    @property
    def rpo_ok(self) -> bool | None:
        rpo = self.rpo_seconds
        return None if rpo is None else rpo <= self.rpo_target_seconds

    def group_rto_seconds(self, group: str) -> float | None:
        for g in self.groups:
            if g.name == group and g.probes_passed_at is not None:
                return (g.probes_passed_at - self.started).total_seconds()
        return None


def plan_version(plan: BaseModel) -> str:
    """A stable fingerprint of a plan's content: equal plans give equal versions."""
    body: Any = plan.model_dump(mode="json")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def evidence_key(plan: str, run_id: str) -> str:
    """Where a run's evidence record lives in the store, beside the repository's own keys."""
    return f"evidence/drills/{plan}/{run_id}.json"


__all__ = [
    "Checksum", "CleanupItem", "DrillEvidence", "DrillKind", "GroupResult", "Outcome", "PointUsed",
    "ProbePhase", "ProbeRecord", "Step", "evidence_key", "plan_version", "utcnow",
]
