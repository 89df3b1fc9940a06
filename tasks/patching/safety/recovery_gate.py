"""The recovery-point gate: before a host is patched, every protected disk has a recovery point
the policy accepts, or the host is skipped with the reason and left untouched.

A point is accepted when it is no older than `max_age_hours` (application-consistent where the
policy says so), or when this run took it right before the install (`take_before_install`),
through the backup pipeline itself: the same `backup-disk` task `patchdrill backup` runs, with its
snapshot, scan, point and snapshot-removal steps, under the host's slot and so inside its
maintenance window. A point this run took is the one a rollback restores
(tasks/patching/safety/rollback.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from configs.models import DiskConfig, HostConfig, StorageConfig
from configs.policies import BackupPolicy, PatchPolicy
from configs.recovery_point import RecoveryPointGate, protected_disks
from connectors.stores import open_store
from tasks.backup.disk import policy_name
from tasks.backup.policy import policy_from_config
from tasks.backup.repo.repository import CONFIG_KEY, Repository, parse_stamp
from tasks.backup.steps import backup_disk_task
from tasks.patching.errors import error_text
from tasks.patching.models import HostPatchRecord
from tasks.patching.plan import windows
from tasks.patching.plan.host import HostPlan, unpatched_updates
from tasks.patching.safety.records import PointUsed, RecoveryRecord

if TYPE_CHECKING:
    from tasks.patching.fleet import PatchFleet, RecordStore

log = structlog.stdlib.get_logger("patchdrill.patch")

APPLICATION = "application-consistent"


@dataclass(frozen=True)
class PointPolicy:
    """The backup policy that takes and reads a patch run's recovery points, and its name in the
    config (recorded in each point it takes, as a backup run records it)."""

    policy: BackupPolicy
    name: str | None


class RunContext(Protocol):
    """What the safety net reads of a patch run's context (tasks.patching.install.PatchContext,
    which calls it, so it is named by shape here rather than imported)."""

    @property
    def policy(self) -> PatchPolicy: ...
    @property
    def records(self) -> "RecordStore": ...
    @property
    def base_dir(self) -> Path: ...
    @property
    def point_policy(self) -> PointPolicy | None: ...


def point_policy(fleet: "PatchFleet") -> PointPolicy | None:
    """The run's point policy, None when its patch policy has no gate (config check has made sure
    the gate's backup_policy resolves)."""
    gate = fleet.policy.recovery_point
    if gate is None:
        return None
    config = fleet.loaded.config
    chosen = policy_from_config(config.backup_policies, gate.backup_policy, source=str(fleet.loaded.path))
    return PointPolicy(chosen, policy_name(config, chosen))


class GateVerdict(BaseModel):
    recovery: RecoveryRecord
    #: why the host may not be patched; None lets it through
    refused: str | None = None


def _age(moment: datetime, now: datetime) -> str:
    return f"{(now - moment).total_seconds() / 3600:.1f} h old"


def _used(disk: str, key: str, consistency: str, *, taken: bool) -> PointUsed:
    return PointUsed(disk=disk, point=key, time=parse_stamp(key.rsplit("/", 1)[1].removesuffix(".json")),
                     consistency=consistency, taken=taken)


def fresh_point(repo: Repository | None, host: str, disk: str, gate: RecoveryPointGate,
                now: datetime) -> PointUsed | str:
    """The newest point of host/disk the gate accepts as it stands, or why there is none. Reads
    manifests newest first, and only within the age limit."""
    assert gate.max_age_hours is not None
    cutoff = now - timedelta(hours=gate.max_age_hours)
    keys = repo.point_keys(host, disk) if repo is not None else []
    for key in reversed(keys):
        assert repo is not None
        used = _used(disk, key, "", taken=False)
        if used.time < cutoff:
            break
        consistency = repo.read_point(key).consistency
        if gate.app_consistent and consistency != APPLICATION:
            continue
        return used.model_copy(update={"consistency": consistency})
    kind = "application-consistent recovery point" if gate.app_consistent else "recovery point"
    newest = f"its newest point is {_age(_used(disk, keys[-1], '', taken=False).time, now)}" if keys else "it has none"
    return f"disk {disk}: no {kind} newer than {gate.age_text} ({newest})"


def take_point(storage: StorageConfig, base_dir: Path, host: HostConfig, disk: DiskConfig, gate: RecoveryPointGate,
               source: PointPolicy) -> PointUsed | str:
    """Back the disk up now through the backup pipeline; the point, or why it does not count."""
    try:
        report = backup_disk_task(storage, base_dir, host, disk, source.policy, source.name)
    except Exception as exc:  # noqa: BLE001 - a failed backup is the host's skip reason, never the run's crash
        log.error("recovery point not taken", host=host.name, disk=disk.name, error=error_text(exc))
        return f"disk {disk.name}: recovery point could not be taken: {error_text(exc)}"
    assert report.point is not None and report.consistency is not None
    log.info("recovery point taken", host=host.name, disk=disk.name, point=report.point,
             consistency=report.consistency, seconds=report.seconds)
    if gate.app_consistent and report.consistency != APPLICATION:
        return (f"disk {disk.name}: the point taken before install ({report.point}) is {report.consistency}; "
                f"the policy requires {APPLICATION}")
    return _used(disk.name, report.point, report.consistency, taken=True).model_copy(
        update={"seconds": round(report.seconds, 3)})


def _repository(storage: StorageConfig, base_dir: Path, source: PointPolicy) -> Repository | None:
    """The repository the points are in; None when the store has none yet (so no points either)."""
    store = open_store(storage, base_dir)
    if not store.exists(CONFIG_KEY):
        return None
    return Repository.open(store, key_reference=source.policy.encryption_key, base_dir=base_dir,
                           compression_level=source.policy.compression_level)


def check_recovery_points(host: HostConfig, storage: StorageConfig, base_dir: Path, gate: RecoveryPointGate,
                          source: PointPolicy, now: datetime | None = None) -> GateVerdict:
    """Every protected disk's point, taken now or found fresh enough; refused with every disk's
    reason when one has none."""
    disks = protected_disks(host, gate)
    if not disks:
        return GateVerdict(recovery=RecoveryRecord(), refused="no protected disk to have a recovery point of")
    used: list[PointUsed] = []
    missing: list[str] = []
    repo: Repository | None = None
    for disk in disks:
        found: PointUsed | str = take_point(storage, base_dir, host, disk, gate, source) \
            if gate.take_before_install else ""
        if not isinstance(found, PointUsed) and gate.max_age_hours is not None:
            repo = repo or _repository(storage, base_dir, source)
            existing = fresh_point(repo, host.name, disk.name, gate, now or datetime.now(timezone.utc))
            found = existing if isinstance(existing, PointUsed) else "; ".join(filter(None, [found, existing]))
        if isinstance(found, PointUsed):
            used.append(found)
        else:
            missing.append(found)
    refused = "; ".join(missing) if missing else None
    if refused:
        log.error("no recovery point: host skipped", host=host.name, reason=refused)
    return GateVerdict(recovery=RecoveryRecord(points=used), refused=refused)


@task(name="recovery-point-gate", task_run_name="recovery points {host.name}", cache_policy=NO_CACHE)
def recovery_gate_task(host: HostConfig, ctx: RunContext) -> GateVerdict:
    """The gate for one host, before anything is done to it (pre-hooks included)."""
    gate, source = ctx.policy.recovery_point, ctx.point_policy
    assert gate is not None and source is not None, "the gate runs only for policies that have one"
    try:
        return check_recovery_points(host, ctx.records.storage, ctx.base_dir, gate, source)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read skips the host; it is not patched blind
        return GateVerdict(recovery=RecoveryRecord(), refused=f"recovery points cannot be read: {error_text(exc)}")


def window_closed_meanwhile(host: HostConfig, started: datetime, now: datetime) -> str | None:
    """Why the install may no longer start when the host's window closed while its points were
    taken (a long backup); None while it is open, or when the run started the host outside its
    window (the run overrides windows)."""
    if not windows.is_open(host, started) or windows.is_open(host, now):
        return None
    return (f"the maintenance window closed while the recovery points were taken ({windows.describe(host, now)}); "
            f"the install would run outside it")


def gate_host(host: HostConfig, ctx: RunContext, plan: HostPlan,
              record: HostPatchRecord) -> tuple[HostPatchRecord, bool]:
    """The record with the points the host is patched on, and True when it must be skipped (the
    record then says why, its updates still missing); unchanged for policies without a gate."""
    if ctx.policy.recovery_point is None:
        return record, False
    verdict = recovery_gate_task(host, ctx)
    record = record.model_copy(update={"recovery": verdict.recovery})
    refused = verdict.refused or window_closed_meanwhile(host, record.started_at, datetime.now(timezone.utc))
    if refused is None:
        return record, False
    return record.model_copy(update={"status": "skipped", "reason": refused,
                                     "updates": unpatched_updates(plan, refused)}), True


__all__ = ["GateVerdict", "gate_host", "window_closed_meanwhile", "PointPolicy", "check_recovery_points", "fresh_point", "point_policy",
           "recovery_gate_task", "take_point"]
