"""What a host's history record keeps of its safety net: the recovery point of each protected
disk that let it be patched, and the rollback when its health probes failed afterwards.

Plain pydantic, no Prefect and no transport, like the rest of tasks/patching/models.py, which
nests `RecoveryRecord` in HostPatchRecord.
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


class RestoredDisk(_Frozen):
    disk: str
    point: str
    bytes_written: int = Field(description="Bytes the restore wrote onto the host (only what differed).")
    removed: int = Field(default=0, description="Entries the point lacked, removed so the disk equals it.")
    seconds: float


class RollbackRecord(_Frozen):
    """A rollback after failed health probes: what was restored, and the probes after it."""

    status: Literal["restored", "failed", "not-possible"]
    disks: list[RestoredDisk] = Field(default_factory=list)
    seconds: float = 0.0
    probes_after: str = Field(default="", description="'passed', or what still failed after the restore.")
    error: str = ""

    @property
    def bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.disks)

    def describe(self) -> str:
        if self.status != "restored":
            return f"rollback {self.status}: {self.error}"
        disks = ", ".join(d.disk for d in self.disks)
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


__all__ = ["PointUsed", "RecoveryRecord", "RestoredDisk", "RollbackRecord"]
