"""Patch runs: enroll the hosts, assess them, (approve,) roll updates out by update domain.

The runbook, step by step:
1. enroll every selected host (an unreachable host is a row, not a crash);
2. assess what each one misses (read-only);
3. select what installs this month (policy, hotpatch calendar) and plan the rollout: one
   update domain at a time, at most `max_concurrency` hosts per batch, only hosts inside their
   maintenance window (in their own time zone) unless the run overrides windows;
4. with `dry_run`, publish the plan and stop: nothing installed, rebooted or recorded (the
   package lists were refreshed unless `refresh` is off: then no host changed at all);
5. if the policy asks for approval, pause until someone approves in the UI (or the CLI said --yes);
6. patch batch after batch, each holding its update domain's concurrency slot: pre-hooks,
   install, reboot gate, health probes, post-hooks; a rollback a person must approve pauses
   the run once the batch's hosts are done (flows/rollback_approval.py); once failures exceed
   the budget no new batch starts, while the hosts in flight finish;
7. record a history entry per host, publish the compliance table and the summary.

The config is read once, when the run starts; its tasks receive the hosts, the policy and the
store it describes (a RecordStore), never the path to read again.
"""


import os
import uuid
from datetime import datetime, timezone

import structlog
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.input import RunInput
from prefect.states import Cancelled, Completed, Failed, State
from pydantic import BaseModel, Field

from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.pause import wait_for_answer
from flows.rollback_approval import settle_rollbacks
from flows.run_form import Names, OptionalName, current_run_name, run_name, selection
from tasks.backup import cancel
from tasks.patching.models import HostPatchRecord
from tasks.patching.fleet import PatchFleet, load_fleet
from tasks.patching.install import PatchContext, patch_host_task
from tasks.patching.plan.host import HostAssessment, HostPlan, plan_host, record_for_unpatched, rollout_host
from tasks.patching.plan.report import compliance_rows, summary_markdown
from tasks.patching.plan.rollout import Batch, Rollout, RolloutPlan, plan
from tasks.patching.report import write_records_task
from tasks.patching.safety.recovery_gate import point_policy
from tasks.patching.safety.notice import announce, conclude, held_back, stops
from tasks.patching.safety.report import unavailability_rows
from tasks.patching.slots import reboot_limit_name, update_domain_slot
from tasks.patching.survey import EnrollmentRow, enroll_task, survey_batches, survey_task
from tasks.rendering import artifact_key, markdown_text

log = structlog.stdlib.get_logger("patchdrill.patch")

# Hosts enrolled and assessed at once unless a run says otherwise (Ansible's default is 5; an
# assessment mostly waits on its hosts, so the controller can hold many more).
DEFAULT_FORKS = 25
# Prefect polls a paused run for its input at this interval (its own default is 10 s).
APPROVAL_POLL_SECONDS = int(os.environ.get("PATCHDRILL_APPROVAL_POLL_SECONDS", "10"))


class PatchApproval(RunInput):
    """The Resume form of a paused patch run."""

    approve: bool = Field(description="Install the updates listed in the assessment summary.")
    reboot_outside_window: bool = Field(default=False, description="Also allow reboots outside maintenance windows.")
    comment: str = Field(default="", description="Recorded in the run's logs.")


class AssessmentReport(BaseModel):
    enrollments: list[EnrollmentRow]
    plans: list[HostPlan]
    errors: dict[str, str] = Field(description="Host → why it could not be assessed.")
    refreshed: list[str] = Field(default_factory=list,
                                 description="Hosts whose package lists were refreshed: the one change an assessment makes.")


class PatchRunReport(BaseModel):
    run_id: str
    run_name: str = ""
    scope: str = "all"
    policy: str
    dry_run: bool
    plan: RolloutPlan
    assessment: AssessmentReport
    records: list[HostPatchRecord] = Field(default_factory=list)
    stopped: str | None = None


# --------------------------------------------------------------------------- shared steps


def _run_id() -> str:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else uuid.uuid4().hex


def enroll_hosts(fleet: PatchFleet, *, record: bool) -> list[EnrollmentRow]:
    records = fleet.records if record else None
    futures = [enroll_task.submit(host, fleet.base_dir, records) for host in fleet.hosts]
    return [future.result() for future in futures]


def survey_hosts(fleet: PatchFleet, now: datetime, *, record: bool, refresh: bool, forks: int,
                 ignore_windows: bool = False) -> AssessmentReport:
    """Enroll and assess every host over one connection each, `forks` hosts at a time, in a few
    task runs (survey.survey_batches) rather than two per host."""
    records = fleet.records if record else None
    futures = [survey_task.submit(batch, fleet.base_dir, records, refresh, parallel, len(batch))
               for batch, parallel in survey_batches(fleet.hosts, forks)]
    surveys = {s.enrolled.host: s for future in futures for s in future.result()}
    enrolled = [surveys[h.name].enrolled for h in fleet.hosts]
    assessments = {name: s.assessment for name, s in surveys.items() if s.assessment is not None}
    report = assessment_report(fleet, enrolled, assessments, now, ignore_windows=ignore_windows)
    # Windows Update has no local list to refresh: its search asks the update service.
    refreshed = [row.host for row in enrolled if refresh and row.reachable and row.os_family == "linux"]
    return report.model_copy(update={"refreshed": refreshed})


def assessment_report(fleet: PatchFleet, enrolled: list[EnrollmentRow], assessments: dict[str, HostAssessment],
                      now: datetime, *, ignore_windows: bool) -> AssessmentReport:
    hosts = {h.name: h for h in fleet.hosts}
    reachable = [row for row in enrolled if row.reachable and row.enrollment is not None]
    errors = {name: a.error for name, a in assessments.items() if not a.ok}
    errors.update({row.host: f"unreachable: {row.error}" for row in enrolled if not row.reachable})
    plans = [plan_host(hosts[row.host], row.enrollment, assessments[row.host], fleet.policy, now,
                       ignore_windows=ignore_windows)
             for row in reachable if assessments[row.host].ok and row.enrollment is not None]
    return AssessmentReport(enrollments=enrolled, plans=plans, errors=errors)


def assessment_markdown(report: AssessmentReport, rollout_plan: RolloutPlan) -> str:
    lines = ["Updates selected for this run:", ""]
    for host_plan in report.plans:
        chosen = ", ".join(markdown_text(u.id) for u in host_plan.install) or "nothing"
        lines.append(f"- **{markdown_text(host_plan.host)}** (update domain {host_plan.update_domain}, "
                     f"{host_plan.month_kind} month): {chosen}" + (" — reboot expected" if host_plan.expects_reboot else ""))
    lines += [f"- **{markdown_text(host)}**: {markdown_text(error)}" for host, error in report.errors.items()]
    lines += ["", "```", rollout_plan.as_text(), "```"]
    return "\n".join(lines)


def request_approval(summary: str, timeout_minutes: float) -> PatchApproval | None:
    """Pause until someone submits the Resume form; None when nobody did within the timeout."""
    log.info("waiting for approval", timeout_minutes=timeout_minutes)
    form = PatchApproval.with_initial_data(description=summary, reboot_outside_window=False, comment="")
    return wait_for_answer(form, key="approval", timeout_seconds=timeout_minutes * 60, poll_seconds=APPROVAL_POLL_SECONDS)


def patch_batch(batch: Batch, fleet: PatchFleet, ctx: PatchContext, report: AssessmentReport,
                slot_timeout_seconds: float) -> list[HostPatchRecord]:
    hosts = {h.name: h for h in fleet.hosts}
    plans = {p.host: p for p in report.plans}
    enrollments = {row.host: row.enrollment for row in report.enrollments if row.enrollment is not None}
    log.info("batch starting", batch=batch.index, update_domain=batch.update_domain, hosts=batch.hosts)
    try:
        with update_domain_slot(batch.update_domain, slot_timeout_seconds):
            told = announce(ctx, batch, hosts, plans)
            futures = [patch_host_task.submit(hosts[name], ctx, enrollments[name], plans[name])
                       for name in batch.hosts if not stops(told.get(name))]
            patched = settle_rollbacks(ctx, batch, hosts, [future.result() for future in futures],
                                       fleet.loaded.config.alerts, APPROVAL_POLL_SECONDS)
            return conclude(ctx, batch, hosts, told, patched + held_back(ctx, told, plans))
    except TimeoutError:
        reason = (f"update domain {batch.update_domain} is being patched by another run "
                  f"(concurrency limit {reboot_limit_name(batch.update_domain)} stayed busy)")
        log.error("batch not started", batch=batch.index, reason=reason)
        return [record_for_unpatched(ctx.run_id, name, datetime.now(timezone.utc), plans[name], "failed", reason)
                for name in batch.hosts]


def publish_report(report: PatchRunReport) -> None:
    """Artifacts keyed by the hosts the run covered (`patch-web-summary`), so each group keeps its
    own history, and titled with the run's name and policy."""
    title = f"Patch run {report.run_name or report.run_id}, policy {report.policy}" + (" (dry run)" if report.dry_run else "")
    if report.dry_run:
        create_markdown_artifact(key=artifact_key("patch", report.scope, "plan"), description=title,
                                 markdown=f"# {markdown_text(title)}\n\n" + assessment_markdown(report.assessment, report.plan))
        return
    create_table_artifact(key=artifact_key("patch", report.scope, "compliance"), table=compliance_rows(report.records),
                          description=f"{title}: compliance per host and update")
    if measured := unavailability_rows(report.records):
        create_table_artifact(key=artifact_key("patch", report.scope, "unavailability"), table=measured,
                              description=f"{title}: measured unavailability per host, update domain and run")
    create_markdown_artifact(key=artifact_key("patch", report.scope, "summary"), description=title,
                             markdown=summary_markdown(title, report.records, plan_text=report.plan.as_text(),
                                                       stopped=report.stopped))


# --------------------------------------------------------------------------- flows


@flow(name="patch-enroll", flow_run_name=run_name("patch-enroll"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def patch_enroll(config_path: str = "configs/lab.yaml", groups: Names = [], hosts: Names = []) -> list[EnrollmentRow]:
    """Enroll hosts: OS, build, package manager, hotpatch eligibility; store the records.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        groups: Only hosts in these groups; empty for every group.
        hosts: Only these hosts; empty for every host (of the groups, if given).
    """
    configure()
    fleet = load_fleet(config_path, groups, hosts, None)
    rows = enroll_hosts(fleet, record=True)
    create_table_artifact(key=artifact_key("patch", selection({"groups": groups, "hosts": hosts}), "enrollment"),
                          description=f"{current_run_name('patch-enroll')}: {sum(r.reachable for r in rows)}/{len(rows)} enrolled",
                          table=[{"host": r.host, "reachable": r.reachable, "os": r.enrollment.os_name if r.enrollment else "",
                                  "package_manager": r.enrollment.package_manager if r.enrollment else "",
                                  "hotpatch": bool(r.enrollment and r.enrollment.hotpatch_eligible), "error": r.error}
                                 for r in rows])
    return rows


@flow(name="patch-assess", flow_run_name=run_name("patch-assess", "policy"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def patch_assess(config_path: str = "configs/lab.yaml", groups: Names = [], hosts: Names = [],
                 policy: OptionalName = "", refresh: bool = True, forks: int = DEFAULT_FORKS) -> AssessmentReport:
    """What each host misses and what a run would install now. Installs nothing; it refreshes
    each Linux host's package lists unless refresh is off (then the host changes not at all).

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        groups: Only hosts in these groups; empty for every group.
        hosts: Only these hosts; empty for every host (of the groups, if given).
        policy: Patch policy by name; empty for the one named after the single selected group, else 'default'.
        refresh: Refresh each host's package lists first; off reads the lists the host has cached.
        forks: Hosts enrolled and assessed at once (the rollout's batches follow the policy).
    """
    configure()
    fleet = load_fleet(config_path, groups, hosts, policy)
    report = survey_hosts(fleet, datetime.now(timezone.utc), record=False, refresh=refresh, forks=forks)
    rows = [{"host": p.host, "update": u.id, "classification": u.classification.value,
             "state": "Missing", "reason": "selected for the next run"} for p in report.plans for u in p.install]
    rows += [{"host": p.host, "update": o.update_id, "classification": o.classification.value,
              "state": o.state.value, "reason": o.reason} for p in report.plans for o in p.held]
    rows += [{"host": host, "update": "", "classification": "", "state": "", "reason": error}
             for host, error in report.errors.items()]
    create_table_artifact(key=artifact_key("patch", selection({"groups": groups, "hosts": hosts}), "assessment"),
                          table=rows, description=f"{current_run_name('patch-assess')}: {len(report.plans)} host(s) assessed")
    return report


@flow(name="patch-run", flow_run_name=run_name("patch-run", "policy"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def patch_run(
    config_path: str = "configs/lab.yaml",
    groups: Names = [],
    hosts: Names = [],
    policy: OptionalName = "",
    dry_run: bool = False,
    ignore_windows: bool = False,
    reboot_outside_window: bool = False,
    approved: bool = False,
    approval_timeout_minutes: float = 240,
    domain_slot_timeout_minutes: float = 60.0,
    forks: int = DEFAULT_FORKS,
    refresh: bool = True,
) -> State[PatchRunReport]:
    """Patch the selected hosts by update domain, inside their maintenance windows.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        groups: Only hosts in these groups; empty for every group.
        hosts: Only these hosts; empty for every host (of the groups, if given).
        policy: Patch policy by name; empty for the one named after the single selected group, else 'default'.
        dry_run: Assess and publish the rollout plan only; install nothing.
        ignore_windows: Install on hosts outside their maintenance window too (reboots there still need reboot_outside_window or an approval that allows them).
        reboot_outside_window: Allow reboots outside maintenance windows.
        approved: Skip the approval pause of policies that require one.
        approval_timeout_minutes: How long a run waits for approval before it fails, installing nothing.
        domain_slot_timeout_minutes: How long a batch waits for its update domain while another run patches it.
        forks: Hosts enrolled and assessed at once (the rollout's batches follow the policy).
        refresh: Refresh each host's package lists before assessing; off reads the lists the host has cached.
    """
    configure()
    # A signal (Ctrl-C, a worker's SIGTERM) or a cancellation noticed in a pause lets the running
    # batch finish and record its hosts, then starts no other: never a host left mid-install or
    # mid-reboot without a record. A second signal exits at once.
    with cancel.stop_on_signals():
        fleet = load_fleet(config_path, groups, hosts, policy)
        run_id, now = _run_id(), datetime.now(timezone.utc)
        log.info("patch run", run_id=run_id, hosts=len(fleet.hosts), policy=fleet.policy_name, dry_run=dry_run)

        assessment = survey_hosts(fleet, now, record=not dry_run, refresh=refresh, forks=forks,
                                  ignore_windows=ignore_windows)
        with_work = [p for p in assessment.plans if p.has_work]
        rollout_plan = plan([rollout_host(p) for p in with_work], fleet.policy.max_concurrency, fleet.policy.max_errors)
        report = PatchRunReport(run_id=run_id, run_name=current_run_name(run_id), scope=selection({"groups": groups, "hosts": hosts}),
                                policy=fleet.policy_name, dry_run=dry_run, plan=rollout_plan, assessment=assessment)
        if dry_run:
            publish_report(report)
            return Completed(message="dry run: nothing installed", data=report)

        unpatched = records_outside_rollout(run_id, now, assessment, rollout_plan)
        if fleet.policy.approval_required and not approved and rollout_plan.batches:
            answer = request_approval(assessment_markdown(assessment, rollout_plan), approval_timeout_minutes)
            if answer is None or not answer.approve:
                stopped = cancel.requested() if answer is None else None
                refused = (f"stopped while waiting for approval: {stopped}" if stopped
                           else f"no approval within {approval_timeout_minutes:g} min" if answer is None
                           else f"not approved{': ' + answer.comment if answer.comment else ''}")
                log.info("not approved", reason=refused)
                unpatched += [record_for_unpatched(run_id, p.host, now, p, "skipped", refused)
                              for p in with_work if p.host in rollout_plan.scheduled]
                report = _finish(report, fleet, unpatched, stopped=refused)
                if stopped:
                    return Cancelled(message=f"{refused}: nothing installed", data=report)
                if answer is None:
                    return Failed(message=f"{refused}: nothing installed", data=report)
                return Cancelled(message=answer.comment or "not approved", data=report)
            log.info("approval answered", approve=answer.approve, comment=answer.comment)
            reboot_outside_window = reboot_outside_window or answer.reboot_outside_window

        ctx = PatchContext(run_id=run_id, records=fleet.records, base_dir=fleet.base_dir, policy=fleet.policy,
                           reboot_outside_window=reboot_outside_window, point_policy=point_policy(fleet))
        rollout, patched = roll_out(rollout_plan, fleet, ctx, assessment, domain_slot_timeout_minutes * 60)
        if rollout.stop_reason:
            plans = {p.host: p for p in with_work}
            unpatched += [record_for_unpatched(run_id, name, now, plans[name], "skipped", rollout.stop_reason)
                          for name in rollout.not_started]
        report = _finish(report, fleet, unpatched, stopped=rollout.stop_reason, patched=patched)
        if stop := cancel.requested():
            # Cancelling runs may only become Cancelled; the report says what was done before the stop.
            return Cancelled(message=f"stopped: {stop}; {run_state(report, failed_hosts(patched, unpatched)).message}",
                             data=report)
        return run_state(report, failed_hosts(patched, unpatched))


def roll_out(rollout_plan: RolloutPlan, fleet: PatchFleet, ctx: PatchContext, assessment: AssessmentReport,
             slot_timeout_seconds: float) -> tuple[Rollout, list[HostPatchRecord]]:
    """Batch after batch, one update domain at a time, until done or the budget is spent."""
    rollout, records = Rollout(rollout_plan), []
    while True:
        if stop := cancel.requested():  # a signal, or a cancellation noticed in a pause
            rollout.stop(stop)
        if (batch := rollout.next_batch()) is None:
            break
        for record in patch_batch(batch, fleet, ctx, assessment, slot_timeout_seconds):
            rollout.record(record.host, record.status == "succeeded", record.reason)
            records.append(record)
    if rollout.stop_reason:
        log.error("rollout stopped", reason=rollout.stop_reason, not_started=rollout.not_started)
    return rollout, records


def records_outside_rollout(run_id: str, now: datetime, assessment: AssessmentReport,
                            rollout_plan: RolloutPlan) -> list[HostPatchRecord]:
    """Records of hosts the rollout will not touch: unreachable, unassessable, outside their
    window, or with nothing to do."""
    unreachable = {row.host for row in assessment.enrollments if not row.reachable}
    records = [record_for_unpatched(run_id, host, now, None, "unreachable" if host in unreachable else "failed", error)
               for host, error in assessment.errors.items()]
    for host_plan in assessment.plans:
        if host_plan.host in rollout_plan.skipped:
            records.append(record_for_unpatched(run_id, host_plan.host, now, host_plan, "skipped",
                                                rollout_plan.skipped[host_plan.host]))
        elif not host_plan.has_work:
            held = len(host_plan.held)
            records.append(record_for_unpatched(run_id, host_plan.host, now, host_plan, "succeeded",
                                                f"nothing to install this run ({held} update(s) not selected)"
                                                if held else "up to date"))
    return records


# A record in one of these states means the host is not where the run was to leave it.
UNFINISHED_STATUSES = ("failed", "unreachable", "rebooting")


def failed_hosts(patched: list[HostPatchRecord], unpatched: list[HostPatchRecord]) -> list[str]:
    """Hosts that make the run Failed: every host the rollout worked on and did not succeed
    (the failure budget counts the same ones), and hosts that could not be reached or assessed."""
    return sorted({r.host for r in patched if r.status != "succeeded"}
                  | {r.host for r in unpatched if r.status in UNFINISHED_STATUSES})


def run_state(report: PatchRunReport, failed: list[str]) -> State[PatchRunReport]:
    """The run's final state: Failed when a host failed or the rollout stopped, so the runs list
    and "on Failed" automations tell the outcome; the report (and its artifacts) either way."""
    problems = ([f"rollout stopped: {report.stopped}"] if report.stopped else []) + (
        [f"{len(failed)} host(s) not patched: {', '.join(failed)}"] if failed else []) + [
        f"{r.host}: {r.recovery.rollback.describe()}" for r in report.records
        if r.recovery is not None and r.recovery.rollback is not None and r.recovery.rollback.status != "restored"]
    if problems:
        return Failed(message="; ".join(problems), data=report)
    counts: dict[str, int] = {}
    for record in report.records:
        counts[record.status] = counts.get(record.status, 0) + 1
    return Completed(message=", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no hosts",
                     data=report)


def _finish(report: PatchRunReport, fleet: PatchFleet, unpatched: list[HostPatchRecord], *,
            stopped: str | None, patched: list[HostPatchRecord] | None = None) -> PatchRunReport:
    if unpatched:
        write_records_task(fleet.records, unpatched, len(unpatched))
    report = report.model_copy(update={"records": [*(patched or []), *unpatched], "stopped": stopped})
    publish_report(report)
    log.info("patch run finished", run_id=report.run_id, stopped=stopped,
             succeeded=sum(r.status == "succeeded" for r in report.records),
             failed=sum(r.status == "failed" for r in report.records))
    return report
