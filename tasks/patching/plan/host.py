"""One host's plan for a run: what it installs, what it holds back and why, whether it expects a
reboot and whether its window is open. Pure: no connection, no orchestrator."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from configs.models import HostConfig
from configs.policies import PatchPolicy
from tasks.patching.models import ComplianceState, Enrollment, HostPatchRecord, MonthKind, Update, UpdateOutcome
from tasks.patching.plan import windows
from tasks.patching.plan.calendar import month_kind, next_baseline, reboot_allowed
from tasks.patching.plan.rollout import RolloutHost
from tasks.patching.plan.selection import Decision, select


class HostAssessment(BaseModel):
    host: str
    ok: bool
    updates: list[Update] = []
    reboot_pending: bool = False
    error: str = ""


class HostPlan(BaseModel):
    """What one host installs this run, and why each other update stays."""

    host: str
    update_domain: int
    month_kind: MonthKind
    install: list[Update]
    held: list[UpdateOutcome]
    reboot_pending: bool
    reboot_allowed_by_calendar: bool
    expects_reboot: bool
    in_window: bool
    window: str

    @property
    def has_work(self) -> bool:
        return bool(self.install) or self.reboot_pending or self.expects_reboot


def _local_today(host: HostConfig, now: datetime) -> tuple[int, int, date]:
    local = now.astimezone(ZoneInfo(host.timezone))
    return local.year, local.month, local.date()


def plan_host(host: HostConfig, enrollment: Enrollment, assessment: HostAssessment, policy: PatchPolicy,
              now: datetime, *, ignore_windows: bool) -> HostPlan:
    year, month, today = _local_today(host, now)
    kind = month_kind(year, month, policy)
    waits_for = "the baseline of {:04d}-{:02d}".format(*next_baseline(year, month, policy))
    decisions: list[Decision] = select(assessment.updates, policy, enrollment, kind, today, waits_for=waits_for)
    chosen = [d.update for d in decisions if d.install]
    held = [UpdateOutcome(update_id=d.update.id, title=d.update.title, classification=d.update.classification,
                          state=d.state, reason=d.reason) for d in decisions if not d.install]
    calendar_ok = reboot_allowed(enrollment, kind, policy)
    expects = policy.reboot != "Never" and calendar_ok and (
        policy.reboot == "Always" or assessment.reboot_pending or any(u.reboot_behaviour == "always" for u in chosen))
    window = windows.describe(host, now)
    open_now = windows.is_open(host, now)
    return HostPlan(
        host=host.name, update_domain=host.update_domain, month_kind=kind, install=chosen, held=held,
        reboot_pending=assessment.reboot_pending, reboot_allowed_by_calendar=calendar_ok, expects_reboot=expects,
        in_window=open_now or ignore_windows,
        window=window if open_now or not ignore_windows else f"{window}; installing anyway (window override)",
    )


def rollout_host(plan: HostPlan) -> RolloutHost:
    return RolloutHost(name=plan.host, update_domain=plan.update_domain, in_window=plan.in_window,
                       window=plan.window, expects_reboot=plan.expects_reboot)


def unpatched_updates(plan: HostPlan, reason: str) -> list[UpdateOutcome]:
    """A host left unpatched still misses everything it was to install, beside what it held back."""
    waiting = [UpdateOutcome(update_id=u.id, title=u.title, classification=u.classification,
                             state=ComplianceState.MISSING, reason=f"not installed: {reason}") for u in plan.install]
    return [*plan.held, *waiting]


def record_for_unpatched(run_id: str, host: str, started: datetime, plan: HostPlan | None,
                         status: str, reason: str) -> HostPatchRecord:
    """The record of a host the rollout did not patch: everything it needs is still Missing."""
    updates = unpatched_updates(plan, reason) if plan is not None else []
    return HostPatchRecord(run_id=run_id, host=host, started_at=started, finished_at=started,
                           month_kind=plan.month_kind if plan else "baseline", status=status,  # type: ignore[arg-type]
                           reason=reason, updates=updates)
