"""The Prefect tasks of the backup, restore and verify flows.

Retries are declared here and only for transient faults: a host that is unreachable or timed
out (HostUnreachable/HostTimeout; the backup opens its connector with a single attempt, so this
is the only retry layer for them) or a store that was briefly unavailable (StoreError.transient).
The engine itself never retries; a retried backup re-uploads only what the store still lacks.
"""

from __future__ import annotations

import os
import shlex
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import structlog
from prefect import task
from pydantic import BaseModel
from prefect.cache_policies import NO_CACHE
from prefect.transactions import CommitMode, transaction

from configs.models import DiskConfig, HostConfig, StorageConfig
from configs.policies import BackupPolicy
from connectors import connect
from connectors.base import Connector, ConnectorError
from connectors.local import LocalConnector
from tasks.backup.cancel import Interrupted
from tasks.backup.errors import BackupError, RepositoryBusy
from tasks.backup.remote_restore import restore_to_host
from tasks.backup import kept
from tasks.backup.restore import RestoreResult, restore
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.repo.retention import PruneData, PruneReport, forget_and_prune
from tasks.backup.disk import (
    DiskReport, DiskSteps, DiskUpload, back_up_disk, open_repository, placed_disk, remove_disk_snapshot,
    scan_and_upload_disk,
    take_disk_snapshot, write_disk_point,
)
from tasks.backup.snapshot.view import SnapshotRecord
from tasks.backup.repo.verify import VerifyReport, verify
from tasks.retry import retry_transient

log = structlog.stdlib.get_logger("patchdrill.backup")


# Two layers on purpose, at different time scales: the Azure SDK retries a single request within
# seconds (a dropped connection mid-upload), and this task retries the whole disk after 15 s and
# 60 s when the store or host stayed unreachable longer than that. Connectors open with one
# attempt here, so host faults are retried by this layer only. A retried disk uploads only what
# the store still lacks, so the outer layer costs a rescan, never a second copy of the data.
@task(name="backup-disk", task_run_name="backup {host.name}/{disk.name}", retries=2, retry_delay_seconds=[15, 60],
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def backup_disk_task(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                     policy: BackupPolicy, policy_name: str | None = None) -> DiskReport:
    """One disk in runbook order, each step a task run of its own (below)."""
    # Each step's outcome stands on its own: by default Prefect rolls nested task runs back when
    # their parent fails, and the UI would show a snapshot that was taken, and a removal that ran,
    # as "RolledBack".
    with transaction(commit_mode=CommitMode.EAGER):
        return back_up_disk(storage, base_dir, host, disk, policy, policy_name=policy_name, steps=TASK_STEPS)


# The steps of one disk, named so the UI says which one failed. No retries of their own: the
# disk's task retries the whole runbook, snapshot included.
@task(name="snapshot", task_run_name="snapshot {host.name}/{disk.name}", cache_policy=NO_CACHE)
def snapshot_task(host: HostConfig, disk: DiskConfig, policy: BackupPolicy, base_dir: Path) -> SnapshotRecord:
    return take_disk_snapshot(host, disk, policy, base_dir)


@task(name="scan-and-upload", task_run_name="scan and upload {host.name}/{disk.name}", cache_policy=NO_CACHE)
def scan_and_upload_task(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                         policy: BackupPolicy, snap: SnapshotRecord) -> DiskUpload:
    return scan_and_upload_disk(storage, base_dir, host, disk, policy, snap)


@task(name="recovery-point", task_run_name="recovery point {host.name}/{disk.name}", cache_policy=NO_CACHE)
def recovery_point_task(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig,
                        policy: BackupPolicy, snap: SnapshotRecord, done: DiskUpload,
                        policy_name: str | None = None) -> DiskReport:
    return write_disk_point(storage, base_dir, host, disk, policy, snap, done, policy_name)


@task(name="remove-snapshot", task_run_name="remove snapshot {host.name}/{disk.name}", cache_policy=NO_CACHE)
def remove_snapshot_task(host: HostConfig, disk: DiskConfig, policy: BackupPolicy, base_dir: Path,
                         snap: SnapshotRecord) -> None:
    remove_disk_snapshot(host, disk, policy, base_dir, snap)


TASK_STEPS = DiskSteps(snapshot=snapshot_task, scan_and_upload=scan_and_upload_task, point=recovery_point_task,
                       remove_snapshot=remove_snapshot_task)


class RetentionSummary(BaseModel):
    forgotten: list[str] = []
    prune: PruneReport | None = None
    #: why retention did not run now (a backup elsewhere held the repository); nothing was deleted
    prune_deferred: str | None = None
    #: kept clones removed from hosts with their points ("host/disk/stamp"), and why some could not be
    kept_clones_dropped: list[str] = []
    kept_clones_error: str | None = None


@task(name="retention", cache_policy=NO_CACHE)
def retention_task(storage: StorageConfig, base_dir: Path, policy: BackupPolicy, hosts: list[str], *,
                   dry_run: bool = False, prune_data: PruneData | None = None,
                   host_configs: list[HostConfig] | None = None) -> RetentionSummary:
    """Forget these hosts' points the policy no longer keeps, then prune (deferred, not failed, if
    busy). `prune_data` defaults to the policy's: after forgetting something, when policy.prune.
    The clones kept on `host_configs` for points that are gone go with them."""
    summary = RetentionSummary()
    mode: PruneData = prune_data or ("after-forget" if policy.prune else "never")
    if mode != "always" and (not hosts or policy.keep.keeps_everything):
        return summary  # nothing to forget (no disk backed up: maybe no repository either)
    repo = open_repository(storage, base_dir, policy)
    try:
        # One exclusive lock, taken before anything is forgotten (docs/repository.md, *Locks*).
        forgotten, pruned = forget_and_prune(repo, policy.keep, hosts=hosts, prune_data=mode, dry_run=dry_run)
    except RepositoryBusy as exc:
        summary.prune_deferred = str(exc)
        return summary
    summary.forgotten, summary.prune = forgotten.forgotten, pruned
    if not dry_run and forgotten.forgotten and host_configs:
        _drop_kept_clones(repo, base_dir, policy, [h for h in host_configs if h.name in hosts], summary)
    return summary


def _drop_kept_clones(repo: Repository, base_dir: Path, policy: BackupPolicy, hosts: list[HostConfig],
                      summary: RetentionSummary) -> None:
    """Remove the clones of forgotten points from their hosts. A host that cannot be reached
    keeps them until its next backup trims them; that is reported, not raised."""
    errors = []
    for host in hosts:
        if host.transport == "winrm":
            continue
        disks = [placed_disk(host, d, base_dir) for d in host.disks]
        try:
            with connect(host, base_dir=base_dir) as connector:
                dropped = kept.drop_unwanted(repo, connector, host.name, disks, policy.kept_clones)
        except (BackupError, ConnectorError) as exc:
            errors.append(str(exc))
            continue
        summary.kept_clones_dropped += [f"{host.name}/{d}" for d in dropped]
    summary.kept_clones_error = "; ".join(errors) or None


@task(name="restore-point", task_run_name="restore {host_name}/{disk_name}", cache_policy=NO_CACHE)
def restore_task(storage: StorageConfig, base_dir: Path, host_name: str, disk_name: str, target: str,
                 policy: BackupPolicy, point: str | None = None, force: bool = False,
                 include: list[str] | None = None, target_host: HostConfig | None = None,
                 source_host: HostConfig | None = None) -> RestoreResult:
    """Restore onto this machine, or onto target_host (a host of the config) when it is not local.
    A point whose clone is still kept on its host (source_host), restored onto that host, is
    cloned from it there; otherwise, or when the clone cannot serve, from the repository."""
    repo = open_repository(storage, base_dir, policy)
    chosen = repo.find_point(host_name, disk_name, point)

    def from_repository() -> RestoreResult:
        return _restore_from_repository(repo, chosen, base_dir, target, force, include, target_host)

    if include or source_host is None:
        return from_repository()
    return instantly_or(chosen, source_host, target_host, target, base_dir, force, from_repository)


def instantly_or(point: RecoveryPoint, source_host: HostConfig, target_host: HostConfig | None, target: str,
                 base_dir: Path, force: bool, from_repository: Callable[[], RestoreResult]) -> RestoreResult:
    """The point cloned from the clone its host keeps (the instant-restore tier: seconds, nothing
    read from the store) where that can serve this restore; else `from_repository()`, with the
    reason the clone could not serve in its notes."""
    if point.kept_clone is None or point.kind != "block":
        return from_repository()
    instant = kept.restore_instantly(point, source_host, target_host, target, base_dir, force)
    if isinstance(instant, RestoreResult):
        return instant
    log.info("restore.from_repository", point=point.key, why=instant)
    return replace(from_repository(), notes=[instant])


def restore_on(repo: Repository, point: RecoveryPoint, connector: Connector, path: str) -> RestoreResult:
    """Restore point at path on the connector's host (this machine for the local transport) in
    place, delta-aware: what is there already is rewritten only where it differs from the point,
    and what the point lacks is removed. A drill's copy, a failover's target, a rollback's disk."""
    if isinstance(connector, LocalConnector):
        return restore(repo, point, path, force=True)
    return restore_to_host(repo, point, connector, path, force=True)


def _restore_from_repository(repo: Repository, chosen: RecoveryPoint, base_dir: Path, target: str, force: bool,
                             include: list[str] | None, target_host: HostConfig | None) -> RestoreResult:
    if target_host is not None:
        host = target_host
        if host.transport != "local":
            with connect(host, base_dir=base_dir) as connector:
                existed = connector.run(f"test -e {shlex.quote(target)}", timeout=60).ok
                with _say_what_an_interruption_left(f"{host.name}:{target}", existed, chosen.key):
                    return restore_to_host(repo, chosen, connector, target, force=force, include=include)
    destination = Path(target)
    if not destination.is_absolute():
        destination = Path.cwd() / destination
    with _say_what_an_interruption_left(str(destination), os.path.lexists(destination), chosen.key):
        return restore(repo, chosen, destination, force=force, include=include)


@contextmanager
def _say_what_an_interruption_left(target: str, existed: bool, point: str) -> Iterator[None]:
    """A stopped restore names the state of its target: a new one is never half there (it is
    built under a temporary name, removed on the way out); an existing one forced in place is."""
    try:
        yield
    except Interrupted as exc:
        if existed:
            raise Interrupted(f"{exc}: restore of {point} stopped part-way; {target} was being overwritten in place "
                              f"and now holds a mix of its old content and the point's: run the restore again "
                              f"(with --force) to finish it") from None
        raise Interrupted(f"{exc}: restore of {point} stopped; {target} was not created and nothing is left "
                          f"behind") from None


@task(name="verify-repository", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=15,
      retry_condition_fn=retry_transient)
def verify_task(storage: StorageConfig, base_dir: Path, policy: BackupPolicy, host: str | None = None,
                disk: str | None = None, sample_percent: float = 100.0) -> VerifyReport:
    repo = open_repository(storage, base_dir, policy)
    return verify(repo, host=host, disk=disk, sample_percent=sample_percent)
