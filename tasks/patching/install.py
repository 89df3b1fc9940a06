"""One host's patching as Prefect tasks: pre-hooks, install, reboot gate, health probes, post-hooks.

Retries: connecting is retried by the connector itself (tenacity, backoff and jitter), so a
task is retried by Prefect only when a transient fault (a timeout, a dropped host) hit a
command; never for a refused login, a parse error or a failed install, which a retry cannot
fix (tasks.retry). The reboot itself is never retried: asking twice could reboot a host twice.
The survey (tasks.patching.survey) is the exception in form, not in rule: one of its task runs
holds many hosts, so it retries a host's transient fault itself rather than have Prefect
re-survey every host of the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import structlog
from prefect import task
from pydantic import BaseModel

from configs.models import HostConfig
from configs.policies import PatchPolicy
from configs.secrets import redact
from connectors import connect
from connectors.base import BootIdentity, Connector, ConnectorError
from tasks.patching import history, linux_host, windows_host
from tasks.patching.errors import error_text
from tasks.patching.fleet import RecordStore
from tasks.probes import check_health, failure_summary
from tasks.patching.linux_host import InstallResult
from tasks.patching.models import ComplianceState, Enrollment, HostPatchRecord, Update, UpdateOutcome
from tasks.patching.plan import windows
from tasks.patching.plan.host import HostPlan, unpatched_updates
from tasks.patching.safety.clock import after_what, clock_task
from tasks.patching.safety.unavailability import meter_for
from tasks.patching.reboot_gate import RebootFailed, decide, reboot_and_wait
from tasks.patching.safety.recovery_gate import PointPolicy, gate_host
from tasks.patching.safety.rollback import after_failed_health
from tasks.patching.slots import HOST_SLOT_TIMEOUT_SECONDS, host_busy, host_slots
from tasks.retry import retry_transient

log = structlog.stdlib.get_logger("patchdrill.patch")


@dataclass(frozen=True)
class PatchContext:
    """What every host of a run shares, taken from the config the flow loaded once."""

    run_id: str
    records: RecordStore
    base_dir: Path
    policy: PatchPolicy
    reboot_outside_window: bool
    host_slot_timeout_seconds: float = HOST_SLOT_TIMEOUT_SECONDS
    #: takes and reads the recovery points of a policy with a recovery_point gate
    point_policy: PointPolicy | None = None


def _run_hooks(conn: Connector, commands: list[str], timeout: float, stage: str) -> str | None:
    """None when every hook passed; otherwise why the first one failed."""
    for command in commands:
        result = conn.run(command, timeout=timeout)
        if not result.ok:
            tail = result.tail(3)
            return redact(f"{stage} hook {command!r} exited {result.exit_code}" + (f": {tail}" if tail else ""))
    return None


def install_on_host(conn: Connector, enrollment: Enrollment, updates: list[Update], timeout: float) -> InstallResult:
    if enrollment.os_family == "windows":
        return windows_host.install(conn, updates, timeout=timeout)
    return linux_host.install(conn, enrollment.package_manager, updates, timeout=timeout)


def still_pending(conn: Connector, enrollment: Enrollment) -> bool:
    if enrollment.os_family == "windows":
        return windows_host.reboot_pending(conn)
    return linux_host.reboot_pending(conn, enrollment.package_manager)


@task(name="install-updates", task_run_name="install on {enrollment.host}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def install_task(host: HostConfig, base_dir: Path, enrollment: Enrollment, updates: list[Update],
                 timeout: float) -> InstallResult:
    with connect(host, base_dir=base_dir) as conn:
        result = install_on_host(conn, enrollment, updates, timeout)
    log.info("installed", host=host.name, installed=sum(o.state is not ComplianceState.FAILED for o in result.outcomes),
             failed=sum(o.state is ComplianceState.FAILED for o in result.outcomes), reboot_required=result.reboot_required)
    return result


def _after_reboot(outcomes: list[UpdateOutcome], pending: bool) -> list[UpdateOutcome]:
    if pending:
        return outcomes
    return [o.model_copy(update={"state": ComplianceState.INSTALLED})
            if o.state is ComplianceState.INSTALLED_PENDING_REBOOT else o for o in outcomes]


class GateResult(BaseModel):
    rebooted: bool
    reason: str
    boot_id_before: str | None = None
    boot_id_after: str | None = None
    still_pending: bool = False
    error: str = ""


@task(name="reboot-gate", task_run_name="reboot gate {enrollment.host}")
def reboot_gate_task(host: HostConfig, ctx: PatchContext, enrollment: Enrollment, plan: HostPlan, pending: bool,
                     record: HostPatchRecord) -> GateResult:
    """Decide, record, reboot, and prove the host came back as a new boot. Never retried."""
    window_ok = ctx.reboot_outside_window or windows.is_open(host, datetime.now(timezone.utc))
    decision = decide(ctx.policy.reboot, pending=pending, calendar_allows=plan.reboot_allowed_by_calendar,
                      window_allows=window_ok)
    if not decision.reboot:
        log.info("reboot not needed" if not decision.deferred else "reboot held back", host=host.name, reason=decision.reason)
        return GateResult(rebooted=False, reason=decision.reason, still_pending=pending)
    store = ctx.records.open()
    requested_on: list[str] = []

    def record_going_down(before: BootIdentity) -> None:
        requested_on.append(before.boot_id)
        # Written before the restart: a run that dies now still says this host was rebooting.
        history.write_record(store, record.model_copy(update={
            "status": "rebooting", "boot_id_before": before.boot_id,
            "reason": f"reboot requested on boot {before.boot_id}; no result was recorded after the reboot"}))
        log.info("rebooting", host=host.name, boot_id=before.boot_id, reason=decision.reason)

    try:
        with connect(host, base_dir=ctx.base_dir) as conn:
            outcome = reboot_and_wait(conn, timeout=ctx.policy.reboot_timeout_minutes * 60,
                                      before_reboot=record_going_down)
            pending_after = still_pending(conn, enrollment)
    except (RebootFailed, ConnectorError) as exc:
        log.error("reboot failed", host=host.name, error=error_text(exc))
        return GateResult(rebooted=False, reason=decision.reason, error=error_text(exc), still_pending=pending,
                          boot_id_before=requested_on[0] if requested_on else None)
    finally:
        store.close()
    log.info("rebooted", host=host.name, boot_id=outcome.after.boot_id, seconds=round(outcome.seconds, 1))
    return GateResult(rebooted=True, reason=decision.reason, boot_id_before=outcome.before.boot_id,
                      boot_id_after=outcome.after.boot_id, still_pending=pending_after)


@task(name="health-check", task_run_name="health {host.name}")
def health_task(host: HostConfig, base_dir: Path, policy: PatchPolicy) -> str | None:
    """None when every probe passed; otherwise what failed."""
    if not policy.health_probes:
        return None
    with connect(host, base_dir=base_dir) as conn:
        results = check_health(host, conn, policy.health_probes, base_dir=base_dir)
    failed = failure_summary(results)
    if failed:
        log.error("health check failed", host=host.name, failed=failed)
        return failed
    log.info("healthy", host=host.name, probes=len(results))
    return None


@task(name="patch-host", task_run_name="patch {host.name}")
def patch_host_task(host: HostConfig, ctx: PatchContext, enrollment: Enrollment, plan: HostPlan) -> HostPatchRecord:
    """Pre-hooks, install, reboot gate, health probes, post-hooks: one host, start to finish.

    Always returns the host's record (and writes it to the store), whatever failed.
    """
    record = HostPatchRecord(run_id=ctx.run_id, host=host.name, started_at=datetime.now(timezone.utc),
                             month_kind=plan.month_kind, status="failed", updates=list(plan.held))
    try:
        with host_slots([host.name], ctx.host_slot_timeout_seconds):
            record = _patch_host(host, ctx, enrollment, plan, record)
    except TimeoutError:
        log.error("host busy", host=host.name, reason=host_busy(host.name))
        record = record.model_copy(update={"reason": host_busy(host.name),
                                           "updates": unpatched_updates(plan, host_busy(host.name))})
    except Exception as exc:  # noqa: BLE001 - a host's failure is its record, never the run's crash
        log.error("patching failed", host=host.name, error=error_text(exc))
        record = record.model_copy(update={"status": "failed", "reason": error_text(exc)})
    record = record.model_copy(update={"finished_at": datetime.now(timezone.utc)})
    store = ctx.records.open()
    try:
        history.write_record(store, record)
    finally:
        store.close()
    return record


def _patch_host(host: HostConfig, ctx: PatchContext, enrollment: Enrollment, plan: HostPlan,
                record: HostPatchRecord) -> HostPatchRecord:
    policy = ctx.policy
    record, skipped = gate_host(host, ctx, plan, record)
    if skipped:
        return record
    if policy.pre_hooks:
        with connect(host, base_dir=ctx.base_dir) as conn:
            refused = _run_hooks(conn, policy.pre_hooks, policy.hook_timeout_seconds, "pre")
        if refused:
            return record.model_copy(update={"status": "skipped", "reason": refused,
                                             "updates": unpatched_updates(plan, refused)})
    with meter_for(host, ctx.base_dir, policy.unavailability, policy.health_probes, plan.update_domain) as meter:
        installed = install_task(host, ctx.base_dir, enrollment, plan.install, policy.max_duration_minutes * 60.0)
        outcomes = list(installed.outcomes)
        gate = reboot_gate_task(host, ctx, enrollment, plan, installed.reboot_required or plan.reboot_pending,
                                record.model_copy(update={"updates": [*plan.held, *outcomes]}))
        unavailability = meter.finish(policy.unavailability.settle_seconds)
    log.info("unavailability measured", host=host.name, seconds=round(unavailability.seconds, 2),
             resolution=unavailability.resolution_seconds, probe=unavailability.probe)
    outcomes = _after_reboot(outcomes, gate.still_pending) if gate.rebooted else outcomes
    problems = [f"{o.update_id}: {o.reason}" for o in outcomes if o.state is ComplianceState.FAILED]
    if gate.error:
        problems.append(f"reboot: {gate.error}")
    unhealthy = health_task(host, ctx.base_dir, policy)
    if unhealthy:
        problems.append(f"health: {unhealthy}")
        record, rolled_back = after_failed_health(host, ctx, record)
        problems += rolled_back
    clock = clock_task(host, ctx.base_dir, policy.clock, after_what(gate.rebooted, unavailability)) if policy.clock else None
    if clock is not None and clock.failure:
        problems.append(f"health: {clock.failure}")
    if policy.post_hooks and not gate.error:
        with connect(host, base_dir=ctx.base_dir) as conn:
            post = _run_hooks(conn, policy.post_hooks, policy.hook_timeout_seconds, "post")
        if post:
            problems.append(post)
    reason = "; ".join(problems) if problems else gate.reason
    return record.model_copy(update={
        "status": "failed" if problems else "succeeded", "reason": reason, "rebooted": gate.rebooted,
        "boot_id_before": gate.boot_id_before, "boot_id_after": gate.boot_id_after,
        "updates": [*plan.held, *outcomes], "unavailability": unavailability, "clock": clock,
    })
