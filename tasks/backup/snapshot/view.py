"""A snapshot once taken: its consistency level, where it is read, and its removal.

`take.py` takes one; leaving `with take_snapshot(...) as snap:` removes it, also when the
backup inside failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Callable, Literal

import structlog

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


@dataclass
class RemovalStep:
    """One thing removal must do. `retry` steps stay pending when they fail."""

    label: str
    action: Callable[[], None]
    retry: bool = True


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
    _check: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def removed(self) -> bool:
        return not self._steps

    def verify(self) -> None:
        """Raise SnapshotError when the view no longer holds what it held when taken.

        Call it after reading and before writing the recovery point: an LVM snapshot that
        overflowed, a shadow copy VSS deleted for space, or a file system the safety timer
        thawed mean the data read cannot be trusted at the recorded level.
        """
        if self._check is not None and self._steps:
            self._check()

    def remove(self) -> None:
        """Undo everything take_snapshot did on the host. Idempotent: done steps are not
        repeated, failed snapshot deletions are retried by the next call."""
        errors: list[str] = []
        for step in list(self._steps):
            if not step.retry:
                self._steps.remove(step)
            try:
                step.action()
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
