"""A patch batch's rollbacks, once its hosts are done: the ones a person approves (`rollback:
ask`) and the alert for every host left unhealthy without one.

With `rollback: ask` a host whose health probes failed is recorded `awaiting-approval`
(tasks/patching/safety/rollback.py) and the batch's hosts all finish first; then the run pauses
once for the batch (flows/pause.py, as a patch approval does: the Resume form in the UI lists the
hosts, their failures and the points a rollback would restore) while the batch still holds its
update domain, so no other domain starts meanwhile.

How long it waits: `rollback_approval_minutes`, but never past the moment the rollback could
still finish inside the earliest window among the hosts (tasks/patching/safety/rollback.py says
how long a rollback may need). Then:
- approved: each host is rolled back (under its host slot), each still only if it can finish
  in its window;
- declined: no rollback, the person's comment in the record;
- nobody answered: no rollback; the record says so, the run ends Failed naming it, and an alert
  (`patchdrill.patch.rollback-not-started`) tells who must look at the host.

A rollback that was not started for want of window time alerts in the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone

import structlog
from prefect.input import RunInput
from pydantic import Field

from configs.alerts import AlertsConfig
from configs.models import HostConfig
from flows.pause import wait_for_answer
from tasks.backup import cancel
from tasks.alerts import raise_alert, rollback_not_started
from tasks.patching.install import PatchContext
from tasks.patching.models import HostPatchRecord
from tasks.patching.plan.rollout import Batch
from tasks.patching.report import write_records_task
from tasks.patching.safety.records import RollbackRecord
from tasks.patching.safety.rollback import awaiting_approval, rollback_task, seconds_to_spare, too_late, with_rollback
from tasks.patching.slots import host_slots
from tasks.rendering import markdown_text

log = structlog.stdlib.get_logger("patchdrill.patch")


class RollbackApproval(RunInput):
    """The Resume form of a run paused before a rollback."""

    roll_back: bool = Field(description="Restore the listed hosts' pre-patch recovery points now. Destructive: "
                                        "whatever was written on their disks since the points were taken is lost.")
    comment: str = Field(default="", description="Kept in the hosts' records and the run's logs.")


def _question(records: list[HostPatchRecord], timeout_seconds: float) -> str:
    lines = [f"These hosts failed their health checks after patching. Roll them back to their pre-patch points? "
             f"Unanswered within {timeout_seconds / 60:.3g} min, they are left as patched for a person.", ""]
    for record in records:
        assert record.recovery is not None
        points = ", ".join(f"{p.disk} from {p.point}" for p in record.recovery.points)
        lines.append(f"- **{markdown_text(record.host)}**: {markdown_text(record.reason)} (would restore {markdown_text(points)})")
    return "\n".join(lines)


def _roll_back(ctx: PatchContext, hosts: dict[str, HostConfig], records: list[HostPatchRecord]) -> list[RollbackRecord]:
    with host_slots([r.host for r in records], ctx.host_slot_timeout_seconds):
        futures = []
        for record in records:
            assert record.recovery is not None
            futures.append(rollback_task.submit(hosts[record.host], ctx, record.recovery, record.started_at))
        return [future.result() for future in futures]


def ask_and_roll_back(ctx: PatchContext, batch: Batch, hosts: dict[str, HostConfig], waiting: list[HostPatchRecord],
                      poll_seconds: float) -> dict[str, RollbackRecord]:
    """Each waiting host's rollback: too late already, declined, unanswered, or done once approved."""
    gate = ctx.policy.recovery_point
    assert gate is not None
    now = datetime.now(timezone.utc)
    decided: dict[str, RollbackRecord] = {}
    askable: list[HostPatchRecord] = []
    for record in waiting:
        assert record.recovery is not None
        late = too_late(hosts[record.host], gate, record.recovery, record.started_at, now)
        if late:
            decided[record.host] = RollbackRecord(status="too-late", error=late)
        else:
            askable.append(record)
    if not askable:
        return decided
    limit = gate.rollback_approval_minutes * 60
    spares = [spare for r in askable if r.recovery is not None
              and (spare := seconds_to_spare(hosts[r.host], gate, r.recovery, r.started_at, now)) is not None]
    timeout = min([limit, *spares])
    log.info("waiting for rollback approval", hosts=[r.host for r in askable], timeout_minutes=round(timeout / 60, 2))
    form = RollbackApproval.with_initial_data(description=_question(askable, timeout), comment="")
    answer = wait_for_answer(form, key=f"rollback-batch-{batch.index}", timeout_seconds=timeout,
                             poll_seconds=poll_seconds)
    if answer is None:
        why = "the time left in the maintenance window" if timeout < limit else "rollback_approval_minutes"
        error = (f"stopped while waiting for the rollback's approval ({cancel.requested()}); the host is left as "
                 f"patched for a person" if cancel.requested() else
                 f"nobody approved it within {timeout / 60:.3g} min ({why}); the host is left as patched for a person")
        log.error("rollback not approved in time", hosts=[r.host for r in askable], error=error)
        return decided | {r.host: RollbackRecord(status="unanswered", error=error) for r in askable}
    log.info("rollback answered", roll_back=answer.roll_back, comment=answer.comment)
    if not answer.roll_back:
        error = "declined in the approval" + (f": {answer.comment}" if answer.comment else "")
        return decided | {r.host: RollbackRecord(status="declined", error=error) for r in askable}
    return decided | dict(zip((r.host for r in askable), _roll_back(ctx, hosts, askable)))


def alert_unattended(ctx: PatchContext, records: list[HostPatchRecord], alerts: AlertsConfig | None) -> None:
    """Alert for every host left unhealthy without a rollback that no person chose."""
    for record in records:
        rollback = record.recovery.rollback if record.recovery is not None else None
        if rollback is not None and record.recovery is not None and rollback.left_for_a_person:
            raise_alert(rollback_not_started(record.host, ctx.run_id, rollback.status, rollback.error,
                                             [p.point for p in record.recovery.points]), alerts, ctx.base_dir)


def settle_rollbacks(ctx: PatchContext, batch: Batch, hosts: dict[str, HostConfig], records: list[HostPatchRecord],
                     alerts: AlertsConfig | None, poll_seconds: float) -> list[HostPatchRecord]:
    """The batch's records once every rollback awaiting approval is decided (and those written
    to the history again); alerts for the hosts left for a person."""
    waiting = [r for r in records if awaiting_approval(r)]
    if waiting:
        rolled = ask_and_roll_back(ctx, batch, hosts, waiting, poll_seconds)
        records = [with_rollback(r, rolled[r.host]) if r.host in rolled else r for r in records]
        changed = [r for r in records if r.host in rolled]
        write_records_task(ctx.records, changed, len(changed))
    alert_unattended(ctx, records, alerts)
    return records


__all__ = ["RollbackApproval", "settle_rollbacks"]
