"""Rollback when a host's health probes fail after its install and reboot.

Only with the policy's explicit `rollback: restore`, and only onto disks restored from points
this run took right before the install (an older point would throw away what was written since):
the workload is stopped (`workload_stop`, needed for image disks), each protected disk is
restored in place from its pre-patch point through the backup pipeline's delta-aware restore
(only blocks and files that differ travel; what the point lacks is removed, so the disk equals
the point), the workload is started again and the health probes run once more. Everything is
recorded: the disks and points restored, bytes written, seconds, and the probes after it.

A rolled-back host still failed its patch: its record stays `failed`, so the rollback counts
against the failure budget (max_errors) as any failed host does.
"""

from __future__ import annotations

import time

import structlog
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.models import HostConfig
from configs.recovery_point import protected_disks, rollback_problem
from configs.secrets import redact
from connectors import connect
from connectors.base import Connector
from tasks.backup.disk import open_repository, placed_disk as placed_on_host
from tasks.drill.copy import restore_copy
from tasks.patching.errors import error_text
from tasks.patching.models import HostPatchRecord
from tasks.patching.safety.recovery_gate import RunContext
from tasks.patching.safety.records import RecoveryRecord, RestoredDisk, RollbackRecord
from tasks.probes import check_health, failure_summary

log = structlog.stdlib.get_logger("patchdrill.patch")


class RollbackFailed(Exception):
    """A step of the rollback failed; the message says which and what the host is left with."""


def _workload(conn: Connector, command: str, timeout: float, what: str) -> None:
    result = conn.run(command, timeout=timeout)
    if not result.ok:
        tail = result.tail(3)
        raise RollbackFailed(redact(f"{what} {command!r} exited {result.exit_code}" + (f": {tail}" if tail else "")))


def why_not(host: HostConfig, ctx: RunContext, recovery: RecoveryRecord) -> str | None:
    """Why this host cannot be rolled back now, or None."""
    gate = ctx.policy.recovery_point
    assert gate is not None
    taken = {p.disk for p in recovery.points if p.taken}
    for disk in protected_disks(host, gate):
        problem = rollback_problem(host, disk, gate)
        if problem:
            return problem
        if disk.name not in taken:
            return f"disk {disk.name} has no point taken before this install; an older one would lose data written since"
    return None


@task(name="rollback", task_run_name="roll back {host.name}", cache_policy=NO_CACHE)
def rollback_task(host: HostConfig, ctx: RunContext, recovery: RecoveryRecord) -> RollbackRecord:
    """Stop the workload, restore every protected disk's pre-patch point, start it, probe again."""
    gate, source = ctx.policy.recovery_point, ctx.point_policy
    assert gate is not None and source is not None
    refused = why_not(host, ctx, recovery)
    if refused:
        log.error("rollback not possible", host=host.name, reason=refused)
        return RollbackRecord(status="not-possible", error=refused)
    disks = {d.name: placed_on_host(host, d, ctx.base_dir) for d in protected_disks(host, gate)}
    started, restored = time.monotonic(), []
    try:
        repo = open_repository(ctx.records.storage, ctx.base_dir, source.policy)
        with connect(host, base_dir=ctx.base_dir) as conn:
            if gate.workload_stop:
                _workload(conn, gate.workload_stop, gate.stop_timeout_seconds, "workload_stop")
            for used in recovery.points:
                try:
                    result = restore_copy(repo, repo.read_point(used.point), conn, disks[used.disk].path)
                except Exception as exc:  # noqa: BLE001 - named, then raised as the rollback's failure
                    left = " (the workload is left stopped)" if gate.workload_stop else ""
                    raise RollbackFailed(f"restore of disk {used.disk} from {used.point} failed part-way{left}: "
                                         f"{error_text(exc)}") from exc
                restored.append(RestoredDisk(disk=used.disk, point=used.point, bytes_written=result.bytes_written,
                                             removed=result.removed, seconds=round(result.seconds, 3)))
                log.info("disk rolled back", host=host.name, disk=used.disk, point=used.point,
                         bytes_written=result.bytes_written)
            if gate.workload_start:
                _workload(conn, gate.workload_start, gate.stop_timeout_seconds, "workload_start")
            probes = failure_summary(check_health(host, conn, ctx.policy.health_probes, base_dir=ctx.base_dir))
    except Exception as exc:  # noqa: BLE001 - a failed rollback is recorded on the host, never the run's crash
        error = str(exc) if isinstance(exc, RollbackFailed) else error_text(exc)
        log.error("rollback failed", host=host.name, error=error)
        return RollbackRecord(status="failed", disks=restored, seconds=round(time.monotonic() - started, 3),
                              error=error)
    record = RollbackRecord(status="restored", disks=restored, seconds=round(time.monotonic() - started, 3),
                            probes_after=probes or "passed")
    log.info("rolled back", host=host.name, bytes_written=record.bytes_written, seconds=record.seconds,
             probes_after=record.probes_after)
    return record


def after_failed_health(host: HostConfig, ctx: RunContext, record: HostPatchRecord) -> tuple[HostPatchRecord, list[str]]:
    """The record with its rollback, and what to add to its reason; unchanged unless the
    policy says `rollback: restore`."""
    gate = ctx.policy.recovery_point
    if gate is None or gate.rollback != "restore" or record.recovery is None:
        return record, []
    rolled = rollback_task(host, ctx, record.recovery)
    recovery = record.recovery.model_copy(update={"rollback": rolled})
    return record.model_copy(update={"recovery": recovery}), [rolled.describe()]


__all__ = ["RollbackFailed", "after_failed_health", "rollback_task", "why_not"]
