"""Rollback when a host's health probes fail after its install and reboot.

Destructive, so only with the policy's explicit `rollback: restore`, or with `rollback: ask`
once a person approved it in the run's pause (flows/rollback_approval.py); and only onto disks
restored from points this run took right before the install (an older point would throw away
what was written since): the workload is stopped (`workload_stop`, needed for image disks),
each protected disk is restored in place from its pre-patch point: cloned from the point's
reflink clone where the host keeps it (the backup policy's kept_clones: the instant-restore
tier), else through the backup pipeline's delta-aware restore (only blocks and files that differ
travel; what the point lacks is removed, so the disk equals the point), the workload is started again and the health probes run once
more. Everything is recorded: the disks and points restored, bytes written, seconds, and the
probes after it.

Inside the window, or not at all: a restore stopped half-way leaves a disk that is neither the
patched state nor the pre-patch one, so a rollback starts only while the host's maintenance
window has `rollback_minutes` left (unset: twice what taking the pre-patch points took, as a
restore reads and compares what that backup read). Otherwise it is not started ("too-late"),
the host is left as patched for a person and the run raises an alert saying which points to
restore. A run that started the host outside its window (it overrides windows) is not held to it.

A rolled-back host still failed its patch: its record stays `failed`, so the rollback counts
against the failure budget (max_errors) as any failed host does.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import structlog
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.models import HostConfig
from configs.recovery_point import RecoveryPointGate, protected_disks, rollback_problem
from configs.secrets import redact
from connectors import connect
from connectors.base import Connector
from tasks.backup.disk import open_repository, placed_disk as placed_on_host
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.restore import RestoreResult
from tasks.backup.steps import instantly_or, restore_on
from tasks.patching.errors import error_text
from tasks.patching.models import HostPatchRecord
from tasks.patching.plan import windows
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


def needed_seconds(gate: RecoveryPointGate, recovery: RecoveryRecord) -> float:
    """How long the host's rollback is allowed to need: the policy's rollback_minutes, else
    twice what taking its pre-patch points took."""
    if gate.rollback_minutes is not None:
        return gate.rollback_minutes * 60
    return 2 * sum(p.seconds or 0.0 for p in recovery.points if p.taken)


def seconds_to_spare(host: HostConfig, gate: RecoveryPointGate, recovery: RecoveryRecord, started_at: datetime,
                     now: datetime) -> float | None:
    """Seconds from now until a rollback started now must have finished to end inside the host's
    window (negative: too late already); None when the window does not bind it (the run started
    the host outside its window)."""
    if not windows.is_open(host, started_at):
        return None
    span = windows.open_span(host, now)
    left = (span.end - now).total_seconds() if span is not None else 0.0
    return left - needed_seconds(gate, recovery)


def too_late(host: HostConfig, gate: RecoveryPointGate, recovery: RecoveryRecord, started_at: datetime,
             now: datetime) -> str | None:
    """Why a rollback may not start now, the window being too short for it; None when it may."""
    spare = seconds_to_spare(host, gate, recovery, started_at, now)
    if spare is None or spare >= 0:
        return None
    span = windows.open_span(host, now)
    window = (f"the maintenance window closes in {(span.end - now).total_seconds() / 60:.1f} min"
              if span is not None else "the maintenance window has closed")
    points = ", ".join(f"{p.disk} from {p.point}" for p in recovery.points)
    return (f"{window} and a rollback may need {needed_seconds(gate, recovery) / 60:.1f} min, so none was started: "
            f"the host is left as patched for a person to restore ({points})")


def restore_pre_patch(repo: Repository, point: RecoveryPoint, host: HostConfig, conn: Connector, path: str,
                      base_dir: Path) -> RestoreResult:
    """One disk back to its pre-patch point, in place: cloned from the point's clone where the
    host still keeps it (the instant-restore tier: seconds, nothing read from the store), else
    the delta-aware restore from the repository, with the reason in its notes."""
    return instantly_or(point, host, host, path, base_dir, True, lambda: restore_on(repo, point, conn, path))


@task(name="rollback", task_run_name="roll back {host.name}", cache_policy=NO_CACHE)
def rollback_task(host: HostConfig, ctx: RunContext, recovery: RecoveryRecord, started_at: datetime) -> RollbackRecord:
    """Stop the workload, restore every protected disk's pre-patch point, start it, probe again;
    nothing when it could not finish inside the window the host's install started in."""
    gate, source = ctx.policy.recovery_point, ctx.point_policy
    assert gate is not None and source is not None
    refused = why_not(host, ctx, recovery)
    if refused:
        log.error("rollback not possible", host=host.name, reason=refused)
        return RollbackRecord(status="not-possible", error=refused)
    late = too_late(host, gate, recovery, started_at, datetime.now(timezone.utc))
    if late:
        log.error("rollback not started", host=host.name, reason=late)
        return RollbackRecord(status="too-late", error=late)
    disks = {d.name: placed_on_host(host, d, ctx.base_dir) for d in protected_disks(host, gate)}
    started, restored = time.monotonic(), []
    try:
        repo = open_repository(ctx.records.storage, ctx.base_dir, source.policy)
        with connect(host, base_dir=ctx.base_dir) as conn:
            if gate.workload_stop:
                _workload(conn, gate.workload_stop, gate.stop_timeout_seconds, "workload_stop")
            for used in recovery.points:
                try:
                    result = restore_pre_patch(repo, repo.read_point(used.point), host, conn, disks[used.disk].path,
                                               ctx.base_dir)
                except Exception as exc:  # noqa: BLE001 - named, then raised as the rollback's failure
                    left = " (the workload is left stopped)" if gate.workload_stop else ""
                    raise RollbackFailed(f"restore of disk {used.disk} from {used.point} failed part-way{left}: "
                                         f"{error_text(exc)}") from exc
                restored.append(RestoredDisk(disk=used.disk, point=used.point, bytes_written=result.bytes_written,
                                             removed=result.removed, seconds=round(result.seconds, 3),
                                             source=result.source, notes=list(result.notes)))
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


#: What a host's record says while its rollback waits for a person's answer (and keeps saying
#: in the history if the run dies meanwhile).
AWAITING = RollbackRecord(status="awaiting-approval", error="waiting for approval in the Prefect UI")


def after_failed_health(host: HostConfig, ctx: RunContext, record: HostPatchRecord) -> tuple[HostPatchRecord, list[str]]:
    """The record with its rollback (or, with `rollback: ask`, one awaiting approval, which the
    flow asks for once the batch is done), and what to add to its reason; unchanged with
    `rollback: report`."""
    gate = ctx.policy.recovery_point
    if gate is None or not gate.rolls_back or record.recovery is None:
        return record, []
    rolled = AWAITING if gate.rollback == "ask" else rollback_task(host, ctx, record.recovery, record.started_at)
    recovery = record.recovery.model_copy(update={"rollback": rolled})
    return record.model_copy(update={"recovery": recovery}), [rolled.describe()]


def awaiting_approval(record: HostPatchRecord) -> bool:
    return (record.recovery is not None and record.recovery.rollback is not None
            and record.recovery.rollback.status == AWAITING.status)


def with_rollback(record: HostPatchRecord, rolled: RollbackRecord) -> HostPatchRecord:
    """The record with the rollback that replaced the one awaiting approval, in its reason too."""
    assert record.recovery is not None and record.recovery.rollback is not None
    reason = record.reason.replace(record.recovery.rollback.describe(), rolled.describe())
    return record.model_copy(update={"recovery": record.recovery.model_copy(update={"rollback": rolled}),
                                     "reason": reason})


__all__ = ["AWAITING", "RollbackFailed", "after_failed_health", "awaiting_approval", "needed_seconds",
           "rollback_task", "seconds_to_spare", "too_late", "why_not", "with_rollback"]
