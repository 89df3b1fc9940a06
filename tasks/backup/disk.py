"""One disk of one host, end to end, without Prefect: the runbook of a disk and its steps.

`back_up_disk` runs the steps in runbook order, each over its own connection and with plain data
between them, so the flow can run each step as a Prefect task of its own (tasks/backup/steps.py)
and the UI shows which one failed: take the snapshot, scan and upload the changed blocks, write
the recovery point, and always remove the snapshot, also when a step before failed or the run
was stopped. The repository's backup lock is held from before the scan until the point is
written, so a prune can never delete the new chunks in between.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import structlog
from pydantic import BaseModel

from configs.models import DiskConfig, HostConfig, PatchdrillConfig, StorageConfig
from configs.policies import BackupPolicy, KeptClones, SnapshotPolicy
from configs.secrets import redact
from connectors import connect
from connectors.base import Connector, ConnectorError, RetryPolicy
from connectors.stores import open_store
from tasks.backup import cancel, kept
from tasks.backup.engine import LOCK_WAIT, BackupRequest, Upload, scan_and_upload, write_point
from tasks.backup.errors import BackupError, SourceError
from tasks.backup.policy import policy_from_config
from tasks.backup.repo.repository import RecoveryPoint, Repository, point_stamp
from tasks.backup.scheduling import default_workers
from tasks.backup.snapshot import take as snapshots
from tasks.backup.snapshot.host import attach
from tasks.backup.snapshot.view import SnapshotRecord
from tasks.backup.sources import windows_direct_upload as direct_upload
from tasks.backup.sources.base import BlockSource, TreeSource
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource, is_directory_disk
from tasks.backup.sources.remote import RemoteBlockSource, RemoteTreeSource

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


class DiskUpload(BaseModel):
    """What the scan-and-upload step hands the point step."""

    upload: Upload
    #: staged upload blobs (Windows hosts) the backup could not delete, and the warning saying so
    staging_left: int = 0
    warning: str | None = None


def open_repository(storage: StorageConfig, base_dir: Path, policy: BackupPolicy, *,
                    create: bool = False) -> Repository:
    store = open_store(storage, base_dir)
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


def placed_disk(host: HostConfig, disk: DiskConfig, base_dir: Path) -> DiskConfig:
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
    disk = placed_disk(host, disk, base_dir)
    connector = connect(host, base_dir=base_dir)
    try:
        yield _source(connector, host, disk, disk.path)
    finally:
        connector.close()


# -- the steps of one disk ---------------------------------------------------------------------
# Each opens what it needs (a connection, the repository) and returns plain data: a task
# boundary may lie between any two of them.

def take_disk_snapshot(host: HostConfig, disk: DiskConfig, policy: BackupPolicy, base_dir: Path) -> SnapshotRecord:
    """Step 1: the most consistent view of the disk the policy and the host allow."""
    # Transient host faults are retried by the Prefect task around the whole disk (the run is
    # resumable); a connector retrying too would multiply the attempts.
    with connect(host, base_dir=base_dir, retry=RetryPolicy(attempts=1)) as connector:
        # Looked up at call time, so a test can watch the snapshot step without replacing this module.
        return snapshots.take_snapshot(connector, host, disk, SnapshotPolicy.of(policy)).describe()


def scan_and_upload_disk(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                         policy: BackupPolicy, snap: SnapshotRecord) -> DiskUpload:
    """Steps 2 and 3: scan the snapshot for changed blocks and upload them, with the map. Run
    under a backup lock held until the point is written."""
    repo = open_repository(storage, base_dir, policy)
    request = _request(host, disk, policy, snap)
    with connect(host, base_dir=base_dir, retry=RetryPolicy(attempts=1)) as connector:
        cancel.check()
        if host.transport == "winrm":
            # Windows hosts upload straight to Azure Blob (docs/repository.md, *Windows hosts*).
            return _upload_from_windows(repo, connector, snap.read_path, request)
        source = _source(connector, host, disk, snap.read_path)
        tracking: list[str] = []
        if policy.kept_clones is not None and hasattr(source, "tracked"):
            found = kept.track(connector, host.name, disk.name, repo.latest_point(host.name, disk.name), snap,
                               policy.block_size)
            if isinstance(found, str):
                tracking.append(found)
            else:
                source.tracked = found  # type: ignore[union-attr]
        upload = scan_and_upload(repo, source, request)
        return DiskUpload(upload=upload.model_copy(update={"notes": [*tracking, *upload.notes]}))


def write_disk_point(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                     policy: BackupPolicy, snap: SnapshotRecord, done: DiskUpload,
                     policy_name: str | None = None) -> DiskReport:
    """Step 4: the recovery point, written last, under the lock the upload was made under."""
    repo = open_repository(storage, base_dir, policy)
    rules = policy.kept_clones
    if rules is None or snap.method != "reflink" or host.transport == "winrm":
        point = write_point(repo, done.upload, _request(host, disk, policy, snap, policy_name))
    else:
        point, warning = _write_point_keeping_clone(repo, base_dir, host, disk, policy, rules, snap, done, policy_name)
        done = done.model_copy(update={"warning": "; ".join(w for w in (done.warning, warning) if w) or None})
    t = point.totals
    return DiskReport(host=host.name, disk=disk.name, point=point.key, consistency=point.consistency,
                      snapshot_method=point.snapshot_method, scanned_bytes=t.scanned, changed_bytes=t.changed_bytes,
                      uploaded_bytes=t.uploaded_bytes, stored_bytes=t.stored_bytes, size_bytes=t.size,
                      repaired_chunks=t.repaired_chunks, staging_left=done.staging_left, warning=done.warning)


def _write_point_keeping_clone(repo: Repository, base_dir: Path, host: HostConfig, disk: DiskConfig,
                               policy: BackupPolicy, rules: KeptClones, snap: SnapshotRecord, done: DiskUpload,
                               policy_name: str | None) -> tuple[RecoveryPoint, str | None]:
    """The point, with the clone it was read from kept on the host (before the point is written,
    so the point records it), then the host's kept clones cut back to the policy's tier and
    space limit. A clone that cannot be kept or trimmed costs a warning, never the point."""
    disks = [placed_disk(host, d, base_dir) for d in host.disks]
    with connect(host, base_dir=base_dir) as connector:
        held = kept.keep(connector, host.name, disk, snap, rules, disks)
        upload = done.upload.model_copy(update={"notes": [*done.upload.notes, *held.notes]})
        try:
            point = write_point(repo, upload, _request(host, disk, policy, snap, policy_name), held.clone)
        except BaseException:
            if held.clone is not None:
                kept.drop_clone(connector, host.name, disk, point_stamp(snap.taken_at))
            raise
        warning = held.warning
        try:
            kept.drop_unwanted(repo, connector, host.name, disks, rules,
                               protect=frozenset({(disk.name, point_stamp(snap.taken_at))}), held=held.held)
        except (BackupError, ConnectorError) as exc:
            warning = "; ".join(filter(None, (warning, f"kept clones not trimmed: {exc}")))
    return point, warning


def remove_disk_snapshot(host: HostConfig, disk: DiskConfig, policy: BackupPolicy, base_dir: Path,
                         snap: SnapshotRecord) -> None:
    """Step 5: undo everything the snapshot step did on the host (raises SnapshotRemovalError
    naming what is left)."""
    if not snap.removal:
        log.info("snapshot.removed", host=snap.host, disk=snap.disk, snapshot_id=snap.snapshot_id, method=snap.method)
        return
    # The connector's own retries, not the task's: removal runs once, also after a stop.
    with connect(host, base_dir=base_dir) as connector:
        attach(snap, connector, host, disk, SnapshotPolicy.of(policy)).remove()


@dataclass(frozen=True)
class DiskSteps:
    """The steps `back_up_disk` runs: these plain functions, or Prefect tasks wrapping them."""

    snapshot: Callable[[HostConfig, DiskConfig, BackupPolicy, Path], SnapshotRecord] = take_disk_snapshot
    scan_and_upload: Callable[[StorageConfig, Path, HostConfig, DiskConfig, BackupPolicy, SnapshotRecord],
                              DiskUpload] = scan_and_upload_disk
    point: Callable[[StorageConfig, Path, HostConfig, DiskConfig, BackupPolicy, SnapshotRecord, DiskUpload,
                     str | None], DiskReport] = write_disk_point
    remove_snapshot: Callable[[HostConfig, DiskConfig, BackupPolicy, Path, SnapshotRecord], None] = remove_disk_snapshot


def back_up_disk(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig, policy: BackupPolicy,
                 *, policy_name: str | None = None, steps: DiskSteps = DiskSteps()) -> DiskReport:
    """Back up one disk in runbook order; errors propagate (the caller decides what is retried)."""
    cancel.check()
    started = time.monotonic()
    disk = placed_disk(host, disk, base_dir)
    repo = open_repository(storage, base_dir, policy, create=True)
    if host.transport == "winrm":
        # Before the snapshot: a disk that cannot go this way should not cost a VSS copy.
        direct_upload.check_direct_upload(repo.store, host.name, disk.name, disk.kind)
    snap = steps.snapshot(host, disk, policy, base_dir)
    try:
        cancel.check()  # stopped while the snapshot was taken: removal follows
        with repo.lock("backup", wait=LOCK_WAIT):
            done = steps.scan_and_upload(storage, base_dir, host, disk, policy, snap)
            report = steps.point(storage, base_dir, host, disk, policy, snap, done, policy_name)
    except BaseException as failure:
        try:
            steps.remove_snapshot(host, disk, policy, base_dir, snap)
        except Exception as removal:  # noqa: BLE001 - the step's own failure is what the caller must see
            failure.add_note(str(removal))
        raise
    steps.remove_snapshot(host, disk, policy, base_dir, snap)
    return report.model_copy(update={"seconds": round(time.monotonic() - started, 3)})


def _request(host: HostConfig, disk: DiskConfig, policy: BackupPolicy, snap: SnapshotRecord,
             policy_name: str | None = None) -> BackupRequest:
    return BackupRequest(host=host.name, disk=disk.name, consistency=snap.consistency, snapshot_method=snap.method,
                         notes=snap.notes, block_size=policy.block_size, workers=policy.workers or default_workers(),
                         # A live view ("none") is read after the lock: the engine stamps it then.
                         snapshot_time=snap.taken_at if snap.method != "none" else None,
                         policy=policy_name, rehash=policy.rehash)


def _upload_from_windows(repo: Repository, connector: Connector, path: str, request: BackupRequest) -> DiskUpload:
    """An image file on a Windows host: the host scans it and uploads changed blocks straight to
    the store; the controller makes chunks and the map, and always removes the staging prefix
    (what it cannot remove is in the result, never raised). Prune deletes staging blobs whenever
    no backup holds a lock: the caller holds one."""
    direct_upload.check_direct_upload(repo.store, request.host, request.disk, "block")
    scan = direct_upload.scan_on_host(connector, path, request.block_size)
    plan = direct_upload.plan_upload(repo, request.host, request.disk, scan.size, request.block_size, scan.hashes(),
                                     rehash=request.rehash)
    source = direct_upload.StagedBlockSource(repo.store, plan, path)
    try:
        sent = direct_upload.upload_from_host(connector, repo.store, plan, path, threads=request.workers)
        log.info("backup.staged", host=request.host, disk=request.disk, blocks=len(plan.changed), bytes_sent=sent)
        upload = scan_and_upload(repo, source, request)
    finally:
        cleanup = source.discard()
        if cleanup.left or cleanup.error:
            log.warning("backup.staging_left", host=request.host, disk=request.disk, prefix=plan.prefix,
                        blobs=len(cleanup.left), error=cleanup.error,
                        hint="the point stands; the next prune removes what is left")
    return DiskUpload(upload=upload, staging_left=len(cleanup.left), warning=cleanup.warning(plan.prefix))


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
