"""The staging area of a repository: raw blocks a Windows host uploaded straight to the store,
waiting to become chunks (docs/repository.md, *Windows hosts*). A leftover costs space, not a
backup, so removing staging reports what it could not delete instead of raising."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from configs.secrets import redact
from connectors.stores import BlobNotFound, BlobStore, StoreError
from tasks.backup.repo.repository import STAGING_PREFIX

log = structlog.stdlib.get_logger("patchdrill.backup")

@dataclass
class StagingCleanup:
    """What removing staging blobs did: leftovers are reported, never raised."""

    deleted: int = 0
    bytes: int = 0
    left: list[str] = field(default_factory=list)
    #: why the listing itself failed, if it did (then what is left is unknown)
    error: str | None = None

    def warning(self, prefix: str) -> str | None:
        """One line for the run's report when something was left under prefix; None otherwise."""
        if self.error:
            return (f"staged upload blobs under {prefix} could not be listed for deletion ({redact(self.error)}); "
                    "the point stands, the next prune removes them")
        if self.left:
            return (f"{len(self.left)} staged upload blobs under {prefix} could not be deleted; "
                    "the point stands, the next prune removes them")
        return None


def remove_staged(store: BlobStore, prefix: str = STAGING_PREFIX, *, dry_run: bool = False) -> StagingCleanup:
    """Delete staged blobs under prefix, uncommitted ones (a killed block upload, a host's Put
    Block never committed) included; count and log what cannot be deleted instead of raising.

    Staged blobs are raw copies of data already in chunks, or of a run that failed: a leftover
    costs space, not a backup, so it must not fail the point that was written or a prune.
    """
    report = StagingCleanup()
    try:
        for info in list(store.list(prefix, uncommitted=True)):
            if not dry_run:
                try:
                    store.delete(info.key)
                except BlobNotFound:
                    continue
                except StoreError as exc:
                    report.left.append(info.key)
                    log.warning("staging.left", key=info.key, error=str(exc))
                    continue
            report.deleted += 1
            report.bytes += info.size
    except StoreError as exc:
        report.error = str(exc)
        log.warning("staging.unlisted", prefix=prefix, error=str(exc))
    return report
