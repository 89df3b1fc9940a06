"""One disk of one host, end to end, without Prefect: connect, snapshot, pick the source, back
up, and always remove the snapshot. The Prefect tasks and the CLI both call this."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import structlog
from pydantic import BaseModel

from configs.models import DiskConfig, HostConfig, PatchdrillConfig
from configs.policies import BackupPolicy
from configs.secrets import redact
from connectors import connect
from connectors.base import Connector, RetryPolicy
from connectors.stores import open_store
from tasks.backup import cancel
from tasks.backup.snapshot import take as snapshots
from tasks.backup.sources import windows_direct_upload as direct_upload
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.scheduling import default_workers
from tasks.backup.errors import BackupError, SourceError
from tasks.backup.policy import policy_from_config
from tasks.backup.sources.remote import RemoteBlockSource, RemoteTreeSource
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.repo.staging import StagingCleanup
from tasks.backup.snapshot.view import Snapshot
from tasks.backup.sources.base import BlockSource, TreeSource
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource, is_directory_disk

log = structlog.stdlib.get_logger("patchdrill.backup")


class DiskReport(BaseModel):
    """One row of a backup run's report (and of its table artifact)."""

    host: str
    disk: str
    status: str = "ok"
    point: str | None = None
    consistency: str | None = None
    snapshot_method: str | None = None
    scanned_bytes: int = 0
    changed_bytes: int = 0
    uploaded_bytes: int = 0
    stored_bytes: int = 0
    size_bytes: int = 0
    #: damaged chunks (found by verify, or missing) this backup wrote again
    repaired_chunks: int = 0
    seconds: float = 0.0
    error: str | None = None
    #: staged upload blobs (Windows hosts) the backup could not delete: the point stands
    staging_left: int = 0
    #: something to look at that did not fail the disk (staging left behind)
    warning: str | None = None


@contextlib.contextmanager
def take_snapshot(connector: Connector, host: HostConfig, disk: DiskConfig, policy: BackupPolicy) -> Iterator[Snapshot]:
    """The most consistent view the policy and host allow; leaving the block always removes it,
    also when the backup inside failed."""
    # Looked up at call time, so a test can watch the snapshot step without replacing this module.
    with snapshots.take_snapshot(connector, host, disk, snapshots.SnapshotPolicy.of(policy)) as taken:
        yield taken


def open_repository(config: PatchdrillConfig, base_dir: Path, policy: BackupPolicy, *, create: bool = False) -> Repository:
    store = open_store(config.storage, base_dir)
    return Repository.open(store, key_reference=policy.encryption_key, base_dir=base_dir, create=create,
                           compression_level=policy.compression_level)


def _source(connector: Connector, host: HostConfig, disk: DiskConfig, path: str) -> BlockSource | TreeSource:
    if host.transport == "local":
        return LocalTreeSource(path) if is_directory_disk(path, disk.kind) else LocalBlockSource(path)
    if host.transport == "ssh":
        directory = disk.kind == "directory" or (
            disk.kind == "auto" and connector.run(f"test -d {shlex.quote(path)}", timeout=60).ok)
        return RemoteTreeSource(connector, path) if directory else RemoteBlockSource(connector, path)
    raise SourceError(f"host {host.name} disk {disk.name}: no block source for transport {host.transport!r}")


def _placed(host: HostConfig, disk: DiskConfig, base_dir: Path) -> DiskConfig:
    if host.transport == "local" and not Path(disk.path).is_absolute():
        # The lab's paths are relative to the config file, not to wherever the run started.
        return disk.model_copy(update={"path": os.path.normpath(base_dir / disk.path)})
    return disk


def policy_name(config: PatchdrillConfig, policy: BackupPolicy) -> str | None:
    """The name under which the config defines this policy (recorded in each point it makes)."""
    for name in sorted(config.backup_policies):
        try:
            if policy_from_config(config.backup_policies, name) == policy:
                return name
        except BackupError:
            continue
    return None


@contextlib.contextmanager
def live_source(config: PatchdrillConfig, base_dir: Path, host_name: str, disk_name: str) -> Iterator[BlockSource | TreeSource]:
    """A disk read as it is now, without a snapshot: what repair reads damaged chunks back from
    (each block is checked against the chunk id it should have, so a moving disk is harmless)."""
    host, disk = find_disk(config, host_name, disk_name)
    if host.transport == "winrm":
        raise SourceError(f"host {host_name} disk {disk_name}: repair does not read Windows hosts yet; "
                          "back the disk up again instead (the backup rewrites damaged chunks it meets)")
    disk = _placed(host, disk, base_dir)
    connector = connect(host, base_dir=base_dir)
    try:
        yield _source(connector, host, disk, disk.path)
    finally:
        connector.close()


def back_up_disk(config: PatchdrillConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                 policy: BackupPolicy) -> DiskReport:
    """Back up one disk; errors propagate (the caller decides what is retried)."""
    cancel.check()
    started = time.monotonic()
    disk = _placed(host, disk, base_dir)
    repo = open_repository(config, base_dir, policy, create=True)
    windows = host.transport == "winrm"
    staging_left, warning = 0, None
    if windows:
        # Before the snapshot: a disk that cannot go this way should not cost a VSS copy.
        direct_upload.check_direct_upload(repo.store, host.name, disk.name, disk.kind)
    # Transient host faults are retried once, by the Prefect task around this call (the run is
    # resumable); a connector retrying too would multiply the attempts.
    connector = connect(host, base_dir=base_dir, retry=RetryPolicy(attempts=1))
    try:
        with take_snapshot(connector, host, disk, policy) as snap:
            request = BackupRequest(host=host.name, disk=disk.name, consistency=snap.consistency,
                                    snapshot_method=snap.method, notes=tuple(getattr(snap, "notes", ()) or ()),
                                    block_size=policy.block_size, workers=policy.workers or default_workers(),
                                    # A live view ("none") is read after the lock: the engine stamps it then.
                                    snapshot_time=snap.taken_at if snap.method != "none" else None,
                                    policy=policy_name(config, policy), rehash=policy.rehash)
            cancel.check()  # stopped while the snapshot was taken: leaving the block removes it
            if windows:
                # Windows hosts upload straight to Azure Blob (docs/repository.md, *Windows hosts*).
                done = back_up_from_host(repo, connector, str(snap.read_path), request)
                point, staging_left, warning = done.point, len(done.staging.left), done.warning
            else:
                point = backup(repo, _source(connector, host, disk, str(snap.read_path)), request)
    finally:
        connector.close()
    t = point.totals
    return DiskReport(host=host.name, disk=disk.name, point=point.key, consistency=point.consistency,
                      snapshot_method=point.snapshot_method, scanned_bytes=t.scanned, changed_bytes=t.changed_bytes,
                      uploaded_bytes=t.uploaded_bytes, stored_bytes=t.stored_bytes, size_bytes=t.size,
                      repaired_chunks=t.repaired_chunks, staging_left=staging_left, warning=warning,
                      seconds=round(time.monotonic() - started, 3))


@dataclass(frozen=True)
class StagedBackup:
    point: RecoveryPoint
    #: what removing the staging prefix left behind (a warning for the run's report, not a failure)
    staging: StagingCleanup
    prefix: str

    @property
    def warning(self) -> str | None:
        return self.staging.warning(self.prefix)


def back_up_from_host(repo: Repository, connector: Connector, path: str, request: BackupRequest) -> StagedBackup:
    """Back up an image file on a Windows host: the host scans it and uploads changed blocks
    straight to the store; the controller makes chunks, the map and the point, and always
    removes the staging prefix (what it cannot remove is in the result, never raised)."""
    direct_upload.check_direct_upload(repo.store, request.host, request.disk, "block")
    scan = direct_upload.scan_on_host(connector, path, request.block_size)
    # Held until staging is discarded: prune deletes staging blobs whenever no backup holds a lock.
    with repo.lock("backup", wait=request.lock_wait):
        plan = direct_upload.plan_upload(repo, request.host, request.disk, scan.size, request.block_size, scan.hashes(),
                           rehash=request.rehash)
        source = direct_upload.StagedBlockSource(repo.store, plan, path)
        try:
            sent = direct_upload.upload_from_host(connector, repo.store, plan, path, threads=request.workers)
            log.info("backup.staged", host=request.host, disk=request.disk, blocks=len(plan.changed), bytes_sent=sent)
            point = backup(repo, source, request)
        finally:
            cleanup = source.discard()
            if cleanup.left or cleanup.error:
                log.warning("backup.staging_left", host=request.host, disk=request.disk, prefix=plan.prefix,
                            blobs=len(cleanup.left), error=cleanup.error,
                            hint="the point stands; the next prune removes what is left")
    return StagedBackup(point, cleanup, plan.prefix)


def failed_report(host: str, disk: str, error: BaseException) -> DiskReport:
    status = "cancelled" if isinstance(error, cancel.Interrupted) else "failed"
    return DiskReport(host=host, disk=disk, status=status, error=redact(str(error) or type(error).__name__))


def find_disk(config: PatchdrillConfig, host_name: str, disk_name: str) -> tuple[HostConfig, DiskConfig]:
    hosts = {h.name: h for h in config.hosts}
    if host_name not in hosts:
        raise BackupError(f"no host {host_name!r} in the config (known: {', '.join(sorted(hosts)) or 'none'})")
    disks = {d.name: d for d in hosts[host_name].disks}
    if disk_name not in disks:
        raise BackupError(f"host {host_name!r} has no disk {disk_name!r} (known: {', '.join(sorted(disks)) or 'none'})")
    return hosts[host_name], disks[disk_name]
