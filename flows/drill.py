"""DR drill: a test failover of a recovery plan, with proven cleanup and measured RTO/RPO.

The runbook, step by step:
1. wait for the plan's drill slot (one drill per plan at a time, with or without a server: the
   Prefect concurrency limit and a lease in the store; a second run waits and says so);
2. readiness, changing nothing: every member's point exists and is within the RPO target, its
   DR target answers with room for the restore, its primary's steady-state probes pass; a
   failure ends the run here, naming member and reason;
3. checksum the primaries' disks (read-only digests);
4. each member's test network: a network namespace of its own on its DR target, recorded in the
   ledger, proven unable to reach the primary; a member that cannot be isolated stops the drill
   here (cleanup still runs);
5. the failover, where the RTO clock starts: group after group, each starting only when the one
   before passed its probes: per member, record in the ledger, restore the point onto the DR
   target (delta-aware), start it inside its namespace, probe it there; a group's pass time is
   when its last probe passed;
6. cleanup, always (a failed probe, an error, a cancellation, Ctrl-C or SIGTERM): everything
   the ledger names is removed and each removal verified;
7. checksum the primaries again and probe their steady state: a test failover never touches them;
8. the evidence record (DrillEvidence) goes to the store, the report to the run's artifacts.

The run ends Completed only when every probe passed, cleanup was verified and the primaries are
unchanged; Failed otherwise; Cancelled when it was stopped (cleanup still ran).
"""


import getpass
import os
import re
import time
import uuid
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

import structlog
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.input import RunInput
from prefect.states import Cancelled, Completed, Failed, State
from pydantic import Field, WithJsonSchema

from configs.secrets import redact
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.pause import wait_for_answer
from flows.run_form import current_run_name
from tasks.alerts import drill_objectives_missed, raise_alert
from tasks.backup import cancel
from tasks.drill.evidence import DrillEvidence, GroupResult, ProbeRecord, plan_version, utcnow
from tasks.drill.probing import primary_probes
from tasks.drill.report import artifact_keys, drill_markdown, drill_title, member_rows
from tasks.drill.members import Member
from tasks.drill.steps import (
    DrillContext, Isolated, MemberOutcome, Timeline, checksums, cleanup_items, cleanup_step, extra_cleanup,
    failover_member_task, isolate_members, open_drill, primary_digests, readiness_step, write_evidence,
)
from tasks.patching.slots import exclusive
from tasks.drill.slot import SlotBusy, drill_slot

log = structlog.stdlib.get_logger("patchdrill.drill")

DRILL_LIMIT_PREFIX = "patchdrill-drill-"
# Prefect polls a paused run for its input at this interval (its own default is 10 s).
MANUAL_POLL_SECONDS = int(os.environ.get("PATCHDRILL_APPROVAL_POLL_SECONDS", "10"))


class ManualActionDone(RunInput):
    """The Resume form of a drill paused for a plan's manual actions."""

    done: bool = Field(description="The steps described are done: go on with the drill. Unticked: stop it (cleanup runs).")
    comment: str = Field(default="", description="Recorded in the drill's evidence.")
#: The config whose plans the run form offers (read when this module is imported, i.e. when
#: `prefect deploy` builds the form); deployments run with the config named in prefect.yaml.
FORM_CONFIG = Path(__file__).resolve().parents[1] / os.environ.get("PATCHDRILL_CONFIG", "configs/lab.yaml")


def _plan_names() -> list[str]:
    from configs.loader import ConfigError, load_config

    try:
        return sorted(load_config(FORM_CONFIG).config.recovery_plans)
    except ConfigError:
        return []


# The form shows the plans as choices; from Python or the CLI any name is accepted and checked.
_PLANS = _plan_names()
PlanChoice = Annotated[str, WithJsonSchema({"type": "string", "enum": _PLANS} if _PLANS else {"type": "string"})]


def drill_limit_name(plan: str) -> str:
    return f"{DRILL_LIMIT_PREFIX}{plan}"


def _run_name() -> str:
    from prefect.runtime import flow_run

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%MZ")
    return f"drill {flow_run.parameters.get('plan', '')} {stamp}"


def _run_id() -> str:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else uuid.uuid4().hex


def _operator(given: str | None) -> str:
    if given:
        return given
    try:
        return os.environ.get("PATCHDRILL_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@flow(name="drill-run", flow_run_name=_run_name,
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def drill_run(config_path: str = "configs/lab.yaml", plan: PlanChoice = _PLANS[0] if _PLANS else "",
              operator: str = "", manual_confirmed: bool = False, slot_timeout_minutes: float = 240.0,
              manual_timeout_minutes: float = 240.0) -> State:
    """Test failover of a recovery plan: restore each member into an isolated copy on its DR
    target, start and probe it, clean up with proof, and record RTO/RPO against the plan.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        plan: The recovery plan to drill.
        operator: Who runs the drill (recorded in the evidence); empty: PATCHDRILL_OPERATOR or the OS user.
        manual_confirmed: The plan's manual actions are confirmed in advance: do not pause for them.
        slot_timeout_minutes: How long to wait while another drill of the same plan runs.
        manual_timeout_minutes: How long a pause for the plan's manual actions waits for a person; then the drill fails (cleanup runs).
    """
    configure()
    run_id = _run_id()
    with cancel.stop_on_signals():
        ctx = open_drill(config_path, plan, run_id)
        evidence = DrillEvidence(run_id=run_id, kind="test-failover", plan=plan, plan_version=plan_version(ctx.plan),
                                 operator=_operator(operator or None), started=utcnow(),
                                 rto_target_seconds=ctx.plan.rto_target.total_seconds(),
                                 rpo_target_seconds=ctx.plan.rpo_target.total_seconds())
        waited = time.monotonic()
        try:
            # The server's limit for runs of one server; the lease in the store for every run,
            # those from the command line on a temporary API of their own included.
            with exclusive([drill_limit_name(plan)], slot_timeout_minutes * 60), \
                    drill_slot(ctx.store, plan, run_id,
                               timeout_seconds=max(0.0, slot_timeout_minutes * 60 - (time.monotonic() - waited))):
                try:
                    return _drill(ctx, evidence, None if manual_confirmed else manual_timeout_minutes)
                except Exception as exc:  # noqa: BLE001 - the evidence must not be left saying "running"
                    return _finish(ctx, evidence, "failed", _error_note(evidence, exc))
        except SlotBusy as exc:
            return _finish(ctx, evidence, "failed", f"another drill of plan {plan} held its slot for "
                                                    f"{slot_timeout_minutes:g} min: {exc.holder}; not started")
        except TimeoutError:
            message = (f"another drill of plan {plan} held its slot (concurrency limit {drill_limit_name(plan)}) for "
                       f"{slot_timeout_minutes:g} min: not started")
            return _finish(ctx, evidence, "failed", message)


def _error_note(evidence: DrillEvidence, exc: Exception) -> str:
    """An unexpected error's account, saying what it left: cleanup runs in the groups' finally,
    so it either ran (and says whether it was verified) or nothing had been created yet."""
    cleanup = {True: "cleanup verified", False: f"cleanup NOT verified: run `patchdrill drill cleanup {evidence.run_id}`",
               None: "nothing had been created"}[evidence.cleanup_verified]
    log.error("drill.error", run_id=evidence.run_id, error=redact(str(exc)))
    return f"drill stopped by an error: {type(exc).__name__}: {redact(str(exc))}; {cleanup}"


def _drill(ctx: DrillContext, evidence: DrillEvidence, manual_timeout_minutes: float | None) -> State:
    timeline = Timeline()
    evidence.steps = timeline.steps
    # Stamped once the slot is ours, and again when the failover itself begins (below).
    evidence.started = utcnow()
    write_evidence(ctx.store, evidence)
    log.info("drill.start", plan=ctx.plan_name, run_id=ctx.run_id, members=len(ctx.members))

    with timeline.step("readiness") as step:
        ready = readiness_step(ctx)
        evidence.probes += ready.probes
        step.ok, step.detail = ready.ok, ready.summary()
    if not ready.ok:
        evidence.notes.append("readiness failed: nothing was created, restored or started")
        # The RPO this drill would have had: a point beyond the target is a missed RPO even
        # though readiness stopped the drill before anything was restored.
        oldest = min((point.time for point in ready.points.values()), default=None)
        return _finish(ctx, evidence, "failed", f"not ready: {ready.summary()}",
                       rpo_at_readiness=None if oldest is None else (evidence.started - oldest).total_seconds())

    with timeline.step("primary checksums before"):
        before = primary_digests(ctx, "before")
    outcomes: list[MemberOutcome] = []
    stopped: Stop | None = None
    isolated: dict[str, Isolated] = {}
    try:
        isolated, unisolated = isolate_members(ctx)
        for outcome in unisolated:
            evidence.steps += outcome.steps
        evidence.steps += [i.step for i in isolated.values()]
        outcomes += unisolated
        # The RTO clock starts with the failover itself: readiness, the primary's checksums and
        # the test networks are about production or the drill's own apparatus, not part of
        # recovering (ASR measures from failover start too).
        evidence.started = utcnow()
        for group in ctx.groups if not unisolated else []:
            if cancel.requested():
                break
            result = GroupResult(name=group[0].group, started=utcnow())
            evidence.groups.append(result)
            stopped = _manual_gate(group, "pre", timeline, manual_timeout_minutes)
            if stopped:
                result.detail = stopped.reason
                break
            futures = [failover_member_task.submit(ctx, member, {d: ready.points[(member.id, d)] for d in member.disks},
                                                   isolated.get(member.id))
                       for member in group]
            done = [future.result() for future in futures]
            outcomes += done
            for outcome in done:
                evidence.steps += outcome.steps
                evidence.points += outcome.points
                evidence.probes += outcome.probes
            failed = [o for o in done if not o.ok]
            result.ok = not failed
            if failed:
                result.detail = "; ".join(f"{o.member}: {o.error}" for o in failed)
                break
            result.probes_passed_at = max((p.at for o in done for p in o.probes), default=utcnow())
            result.detail = f"{len(done)} member(s) up, every probe passed"
            stopped = _manual_gate(group, "post", timeline, manual_timeout_minutes)
            if stopped:
                result.ok, result.detail = False, f"{result.detail}; {stopped.reason}"
                break
    finally:
        for each in isolated.values():
            each.close()
        _clean_up(ctx, evidence, timeline)

    with timeline.step("primary checksums after") as step:
        after = primary_digests(ctx, "after")
        evidence.primary_checksums = checksums(before, after)
        live = {(m.primary.name, d) for m in ctx.members if m.spec.primary_writes for d in m.disks}
        moved = [c for c in evidence.primary_checksums if not c.unchanged]
        changed = [f"{c.host}/{c.disk}" for c in moved if (c.host, c.disk) not in live]
        expected = [f"{c.host}/{c.disk}" for c in moved if (c.host, c.disk) in live]
        if expected:
            evidence.notes.append(f"primary disks written by their own application during the drill (primary_writes): "
                                  f"{', '.join(expected)}")
        step.ok = not changed
        step.detail = (f"CHANGED: {', '.join(changed)}" if changed else "unchanged") + (
            f"; changed by the running primary, as the plan expects: {', '.join(expected)}" if expected else "")
    evidence.probes += _steady_state_after(ctx)
    return _verdict(ctx, evidence, outcomes, changed, stopped)


@dataclass(frozen=True)
class Stop:
    """Why a manual-action pause stopped the drill; rejected: a person said no (the run ends
    Cancelled), else nobody could be asked or nobody answered (Failed)."""

    reason: str
    rejected: bool = False


def _manual_gate(group: list[Member], phase: str, timeline: Timeline, timeout_minutes: float | None) -> Stop | None:
    """Pause for the group's manual actions of this phase (before its members start, after its
    probes passed, where recovery plans place them); why to stop, or None to go on. No timeout:
    the run's starter confirmed them in advance (`drill run --yes`)."""
    from prefect.settings import get_current_settings

    steps = [f"{m.id}: {a.instructions}" for m in group
             for a in (m.spec.pre_actions if phase == "pre" else m.spec.post_actions) if a.kind == "manual"]
    if not steps:
        return None
    with timeline.step(f"manual {phase} {group[0].group}", " | ".join(steps)) as step:
        if timeout_minutes is None:
            step.detail += "; confirmed in advance by whoever started the run (--yes)"
            return None
        # The CLI's private background server has no one watching it: as with no server at all.
        if not get_current_settings().api.url or os.environ.get("PATCHDRILL_PRIVATE_API") == "1":
            step.ok = False
            step.detail += ("; needs a person to resume the run, and this run has no Prefect server to pause on "
                            "(set PREFECT_API_URL, run the drill deployment, or confirm them with drill run --yes)")
            return Stop(f"manual actions of group {group[0].group} could not be asked for: no Prefect server")
        log.info("drill.waiting_for_manual_actions", group=group[0].group, phase=phase, steps=steps)
        form = ManualActionDone.with_initial_data(
            description="Do these steps, then resume (untick *done* to stop the drill):\n\n"
                        + "\n".join(f"- {line}" for line in steps), comment="")
        key = re.sub(r"[^A-Za-z0-9_-]", "-", f"manual-{group[0].group}-{phase}")  # a pause key is a URL path part
        answer = wait_for_answer(form, key=key, timeout_seconds=timeout_minutes * 60,
                                 poll_seconds=MANUAL_POLL_SECONDS)
        if answer is None and cancel.requested():
            step.ok = False
            step.detail += f"; stopped while waiting: {cancel.requested()}"
            return Stop(f"stopped while waiting for the manual actions of group {group[0].group}: {cancel.requested()}")
        if answer is None:
            step.ok = False
            step.detail += f"; nobody answered within {timeout_minutes:g} min"
            return Stop(f"manual actions of group {group[0].group} not confirmed within {timeout_minutes:g} min")
        step.ok = answer.done
        step.detail += f"; answered done={answer.done}" + (f": {answer.comment}" if answer.comment else "")
        if not answer.done:
            return Stop(f"manual actions of group {group[0].group} rejected"
                        + (f": {answer.comment}" if answer.comment else ""), rejected=True)
    return None


def _clean_up(ctx: DrillContext, evidence: DrillEvidence, timeline: Timeline) -> None:
    """Always runs, whatever stopped the groups; its failures are evidence, never an exception."""
    with timeline.step("cleanup") as step:
        problems = extra_cleanup(ctx, timeline)
        try:
            report = cleanup_step(ctx)
        except Exception as exc:  # noqa: BLE001 - an unverified cleanup is reported, never hidden
            evidence.cleanup_verified = False
            step.ok, step.detail = False, f"cleanup could not run: {exc}; run `patchdrill drill cleanup {ctx.run_id}`"
            return
        evidence.cleanup = cleanup_items(report)
        evidence.cleanup_verified = report.ok and not problems
        step.ok = evidence.cleanup_verified
        step.detail = "; ".join([report.summary(), *problems])


def _steady_state_after(ctx: DrillContext) -> list[ProbeRecord]:
    records: list[ProbeRecord] = []
    for member in ctx.members:
        if member.spec.steady_state:
            with ctx.connect(member.primary) as primary:
                records += primary_probes(member.id, "primary-after", member.primary, primary,
                                          member.spec.steady_state, ctx.base_dir)
    return records


def _verdict(ctx: DrillContext, evidence: DrillEvidence, outcomes: list[MemberOutcome], changed: list[str],
             stopped: Stop | None) -> State:
    if cancel.requested() or any(o.cancelled for o in outcomes) or (stopped and stopped.rejected):
        reason = stopped.reason if stopped else cancel.requested() or "cancelled"
        note = "cleanup verified" if evidence.cleanup_verified else "cleanup NOT verified"
        return _finish(ctx, evidence, "cancelled", f"drill {reason}: stopped; {note}")
    problems = [f"{o.member}: {o.error}" for o in outcomes if not o.ok] + ([stopped.reason] if stopped else [])
    if len(evidence.groups) < len(ctx.groups):
        problems.append(f"{len(ctx.groups) - len(evidence.groups)} group(s) not started")
    if not evidence.cleanup_verified:
        problems.append(f"cleanup NOT verified: run `patchdrill drill cleanup {ctx.run_id}`")
    if changed:
        problems.append(f"primary disks changed during the drill: {', '.join(changed)}")
    problems += [f"{p.member}: primary after the drill: {p.probe}: {p.detail}"
                 for p in evidence.probes if p.phase == "primary-after" and not p.ok]
    if problems:
        return _finish(ctx, evidence, "failed", "; ".join(problems))
    rto, rpo = evidence.rto_seconds, evidence.rpo_seconds
    return _finish(ctx, evidence, "passed", f"drill passed: RTO {rto:.1f} s, RPO {rpo:.0f} s; cleanup verified")


_STATES: dict[str, Callable[..., State]] = {"passed": Completed, "failed": Failed, "cancelled": Cancelled}


def _finish(ctx: DrillContext, evidence: DrillEvidence, outcome: str, message: str, *,
            rpo_at_readiness: float | None = None) -> State:
    evidence.finished, evidence.outcome = utcnow(), outcome  # type: ignore[assignment]
    evidence.notes.append(message)
    key = write_evidence(ctx.store, evidence)
    _publish(evidence)
    log.info("drill.finished", plan=ctx.plan_name, run_id=ctx.run_id, outcome=outcome, evidence=key)
    if outcome != "cancelled":  # a stopped drill's figures measure the stop, not the recovery
        rpo = evidence.rpo_seconds if evidence.rpo_seconds is not None else rpo_at_readiness
        for alert in drill_objectives_missed(
                ctx.plan_name, ctx.run_id, outcome, {"rto": evidence.rto_seconds, "rpo": rpo},
                {"rto": evidence.rto_target_seconds, "rpo": evidence.rpo_target_seconds}, key):
            raise_alert(alert, ctx.config.alerts, ctx.base_dir)
    return _STATES[outcome](message=message, data=evidence)


def _publish(evidence: DrillEvidence) -> None:
    keys, title = artifact_keys(evidence), f"{current_run_name('drill')}: {drill_title(evidence)}"
    create_markdown_artifact(key=keys["summary"], markdown=drill_markdown(evidence), description=title)
    create_table_artifact(key=keys["members"], table=member_rows(evidence),
                          description=f"{title}: per member, RTO and RPO against the plan's targets")
