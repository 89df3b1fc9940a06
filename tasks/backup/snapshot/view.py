"""A snapshot once taken: its consistency level, where it is read, and how it is removed.

What removal must do is plain data (`RemovalStep`s, and a `HostCheck` that tells whether the view
still holds), so a snapshot crosses a task boundary as a `SnapshotRecord` and can be removed by
another task over another connection: `host.attach` makes a live `Snapshot` of a record again.
A live snapshot used as a context manager is removed on leaving the block, also when the backup
inside failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict

from configs.secrets import redact
from connectors.base import ConnectorError
from tasks.backup.repo.repository import Consistency

log = structlog.stdlib.get_logger("patchdrill.backup")

APPLICATION: Consistency = "application-consistent"
FILE_SYSTEM: Consistency = "file-system-consistent"
CRASH: Consistency = "crash-consistent"


class SnapshotError(Exception):
    """A snapshot could not be taken (or no longer holds); names the host and the disk."""

    def __init__(self, host: str, disk: str, message: str) -> None:
        self.host = host
        self.disk = disk
        self.message = redact(message)
        super().__init__(f"host {host} disk {disk}: {self.message}")


class SnapshotRemovalError(SnapshotError):
    """Removal failed: something is left on the host (named in the message) to clean up."""


class RemovalStep(BaseModel):
    """One thing removal must do on the host: a linux_snapshot.sh action, a thaw, removing a VSS
    shadow copy, or the post-script held back until the read was over."""

    model_config = ConfigDict(frozen=True)
    label: str
    action: Literal["linux", "thaw", "vss-remove", "post-script"]
    args: tuple[str, ...] = ()
    #: a failed step stays pending for the next remove() (deleting a snapshot); one that must
    #: run at most once (the post-script) does not
    retry: bool = True


class HostCheck(BaseModel):
    """How to ask the host whether the view still holds what it held when taken."""

    model_config = ConfigDict(frozen=True)
    action: Literal["linux", "vss-check"]
    args: tuple[str, ...] = ()


class SnapshotRecord(BaseModel):
    """A snapshot as data: what the backup reads and records, and what removing it takes."""

    model_config = ConfigDict(frozen=True)
    host: str
    disk: str
    snapshot_id: str
    method: str
    consistency: Consistency
    read_path: str
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = {}
    taken_at: datetime
    removal: tuple[RemovalStep, ...] = ()
    check: HostCheck | None = None


class StepRunner(Protocol):
    """Carries out removal steps and checks on the snapshot's host (host.SnapshotHost)."""

    def run_step(self, step: RemovalStep) -> None: ...

    def check(self, check: HostCheck) -> None: ...


@dataclass
class Snapshot:
    """A consistent view of one disk, readable at `read_path` until `remove()`."""

    host: str
    disk: str
    read_path: str
    consistency: Consistency
    method: str
    notes: list[str] = field(default_factory=list)
    snapshot_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    taken_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    removal_error: SnapshotRemovalError | None = None
    _steps: list[RemovalStep] = field(default_factory=list, repr=False)
    _check: HostCheck | None = field(default=None, repr=False)
    _runner: StepRunner | None = field(default=None, repr=False)

    @property
    def removed(self) -> bool:
        return not self._steps

    def verify(self) -> None:
        """Raise SnapshotError when the view no longer holds what it held when taken.

        Call it after reading and before writing the recovery point: an LVM snapshot that
        overflowed, a shadow copy VSS deleted for space, or a file system the safety timer
        thawed mean the data read cannot be trusted at the recorded level.
        """
        if self._check is not None and self._steps and self._runner is not None:
            self._runner.check(self._check)

    def remove(self) -> None:
        """Undo everything take_snapshot did on the host. Idempotent: done steps are not
        repeated, failed snapshot deletions are retried by the next call."""
        errors: list[str] = []
        for step in list(self._steps):
            if not step.retry:
                self._steps.remove(step)
            try:
                assert self._runner is not None, "a snapshot with removal steps has a host to run them on"
                self._runner.run_step(step)
            except (SnapshotError, ConnectorError) as exc:
                errors.append(f"{step.label}: {getattr(exc, 'message', exc)}")
                continue
            if step in self._steps:
                self._steps.remove(step)
        if not errors:
            self.removal_error = None
            log.info("snapshot.removed", host=self.host, disk=self.disk, snapshot_id=self.snapshot_id, method=self.method)
            return
        self.removal_error = SnapshotRemovalError(
            self.host, self.disk, f"removing {self.method} snapshot {self.snapshot_id} failed: {'; '.join(errors)}")
        log.error("snapshot.removal_failed", host=self.host, disk=self.disk, snapshot_id=self.snapshot_id,
                  method=self.method, errors=[redact(e) for e in errors])
        raise self.removal_error

    def record(self) -> dict[str, Any]:
        """What the recovery point and the report keep about this snapshot."""
        return {"method": self.method, "consistency": self.consistency, "notes": list(self.notes),
                "snapshot_id": self.snapshot_id, "taken_at": self.taken_at.isoformat(), "details": dict(self.details)}

    def describe(self) -> SnapshotRecord:
        """This snapshot as data, with the removal steps still pending."""
        return SnapshotRecord(host=self.host, disk=self.disk, snapshot_id=self.snapshot_id, method=self.method,
                              consistency=self.consistency, read_path=self.read_path, notes=tuple(self.notes),
                              details=dict(self.details), taken_at=self.taken_at, removal=tuple(self._steps),
                              check=self._check)

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        try:
            self.remove()
        except SnapshotRemovalError as removal:
            if exc is None:
                raise
            # The body's own failure is what the caller must see; the leftover is logged (in
            # remove) and named on it and on self.removal_error.
            exc.add_note(str(removal))
        return False
