"""Which assessed updates a run installs, and why each other one stays where it is.

The order of the rules is the order an operator reasons in: an exclusion always wins; an
explicit inclusion overrides the classification filter; then patch age; then the calendar.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from fnmatch import fnmatchcase

from configs.policies import PatchPolicy
from tasks.patching.models import ComplianceState, Enrollment, MonthKind, Update, normalise_kb
from tasks.patching.plan.calendar import updates_allowed


@dataclass(frozen=True)
class Decision:
    update: Update
    install: bool
    state: ComplianceState
    reason: str


def matches(entry: str, update: Update) -> bool:
    """A policy entry names an update by KB number, or by an fnmatch mask over its id and packages."""
    kb = normalise_kb(entry)
    if kb is not None and update.kb == kb:
        return True
    names = [update.id, *update.packages]
    return any(fnmatchcase(name, entry) for name in names)


def _first_match(entries: list[str], update: Update) -> str | None:
    return next((entry for entry in entries if matches(entry, update)), None)


def decide(update: Update, policy: PatchPolicy, enrollment: Enrollment, kind: MonthKind, today: date,
           *, waits_for: str = "the next baseline month") -> Decision:
    excluded_by = _first_match(policy.exclude, update)
    if excluded_by is not None:
        return Decision(update, False, ComplianceState.EXCLUDED, f"excluded by {excluded_by!r}")
    included_by = _first_match(policy.include, update)
    if included_by is None and update.classification not in policy.classifications:
        return Decision(update, False, ComplianceState.EXCLUDED,
                        f"classification {update.classification.value} is not selected by the policy")
    if policy.approve_after_days:
        if update.release_date is None:
            return Decision(update, False, ComplianceState.MISSING,
                            f"release date unknown, so its age cannot reach approve_after_days={policy.approve_after_days}")
        approved_on = update.release_date + timedelta(days=policy.approve_after_days)
        if today < approved_on:
            return Decision(update, False, ComplianceState.MISSING, f"too new: approved from {approved_on.isoformat()}")
    verdict = updates_allowed(update, enrollment, kind, policy, waits_for=waits_for)
    if not verdict.allowed:
        return Decision(update, False, ComplianceState.MISSING, verdict.reason)
    reason = f"included by {included_by!r}" if included_by is not None else verdict.reason
    return Decision(update, True, ComplianceState.MISSING, reason)


def select(updates: list[Update], policy: PatchPolicy, enrollment: Enrollment, kind: MonthKind, today: date,
           *, waits_for: str = "the next baseline month") -> list[Decision]:
    return [decide(update, policy, enrollment, kind, today, waits_for=waits_for) for update in updates]


__all__ = ["Decision", "decide", "matches", "select"]
