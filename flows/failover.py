"""Failover and failback of a recovery plan: the real thing, not a drill.

Planned failover (the primary is healthy, the move is chosen — maintenance, a region move):
1. approval: `approved` (the CLI's --yes) or a pause whose Resume form approves or rejects;
2. stop the primary's applications, groups in reverse order (a front end stops before the
   database it writes to, so nothing writes into a database being shut down: how a recovery
   plan's shutdown runs in Azure Site Recovery and VMware SRM);
3. final incremental backup of every member's disks, taken after the stop: nothing written
   before the stop is left behind (ASR's "shut down, then final sync");
4. restore those points onto each DR target, delta-aware: only blocks that differ are written;
5. start the copies group by group (a group starts when the one before passed its probes),
   not isolated: they are production now; probe them.
Unplanned failover (the primary is presumed down): the same from step 4, from the chosen point
(latest, latest application-consistent, latest before a time), never touching the primary; the
data it loses (RPO = start − point time) is stated in the approval before anyone approves.

Either ends "failed over, not committed": `failover_commit` records the commit; until then
`failover_cancel` stops the copies and, after a planned failover, restarts the primary.

Failback (after a committed failover), a planned failover in reverse:
1. approval; 2. re-protect: back up each copy as a disk of its DR host (a recovery point of the
copy, taken while it serves); 3. stop the copies (reverse group order); 4. final incremental of
the copies (after the stop: no write made on the DR side is lost); 5. restore onto the primary's
disks delta-aware (only blocks changed since the failover travel; the bytes moved are
reported); 6. start and probe the primary, group by group.

Each step is timestamped into a DrillEvidence stored in the store (evidence/drills/PLAN/RUN.json).
The run ends Completed, Failed (a step or probe failed) or Cancelled (approval rejected).
"""


import getpass
import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Callable, Literal, TypeVar

import structlog
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.input import RunInput
from prefect.states import Cancelled, Completed, Failed, State
from pydantic import Field

from configs.loader import LoadedConfig, load_config
from configs.policies import BackupPolicy
from connectors.stores import open_store
from connectors.stores.base import BlobStore
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.pause import wait_for_answer
from flows.run_form import OptionalName, current_run_name
from tasks.backup import cancel
from tasks.backup.policy import policy_from_config
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.disk import DiskReport, find_disk, open_repository, policy_name
from tasks.backup.steps import backup_disk_task
from tasks.drill.evidence import DrillEvidence, DrillKind, GroupResult, PointUsed, Step, plan_version, utcnow
from tasks.drill.failover import (
    FailoverError, Side, backup_side_task, check_can_start, commit_failover, committed, copy_disk_name, copy_side,
    data_loss_seconds, describe_seconds, evidence_summary, find_evidence, load_plan, members_of, primary_side,
    probe_task, restore_side_task, start_task, stop_task, store_evidence, undone, unplanned_points,
)
from tasks.drill.members import Member
from tasks.rendering import artifact_key, human_size, markdown_text

log = structlog.stdlib.get_logger("patchdrill.drill")

APPROVAL_POLL_SECONDS = int(os.environ.get("PATCHDRILL_APPROVAL_POLL_SECONDS", "10"))
T = TypeVar("T")


class FailoverApproval(RunInput):
    """The Resume form of a paused failover or failback."""

    approve: bool = Field(description="Carry out the failover (or failback) described above.")
    comment: str = Field(default="", description="Recorded in the run's evidence.")


def operator() -> str:
    return os.environ.get("PATCHDRILL_OPERATOR") or getpass.getuser()


def _run_id() -> str:
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else uuid.uuid4().hex


class Journal:
    """The run's evidence, filled in step by step and stored after each step, so a run that
    dies leaves its record up to the step it reached."""

    def __init__(self, store: BlobStore, evidence: DrillEvidence) -> None:
        self.store = store
        self.evidence = evidence
        store_evidence(store, evidence)

    def step(self, name: str, action: Callable[[], T], *, group: str | None = None, member: str | None = None,
             detail: Callable[[T], str] = lambda _: "") -> T:
        cancel.check()  # a stop asked for during the step before ends the run here
        record = Step(name=name, group=group, member=member, started=utcnow())
        self.evidence.steps.append(record)
        try:
            value = action()
        except BaseException as exc:
            record.finished, record.ok, record.detail = utcnow(), False, str(exc)[:500]
            store_evidence(self.store, self.evidence)
            raise
        record.finished, record.ok, record.detail = utcnow(), True, detail(value)
        store_evidence(self.store, self.evidence)
        return value

    def end(self, outcome: Literal["passed", "failed", "cancelled"], note: str | None = None) -> None:
        self.evidence.outcome = outcome
        self.evidence.finished = utcnow()
        if note:
            self.evidence.notes.append(note)
        store_evidence(self.store, self.evidence)


def request_approval(description: str, timeout_minutes: float) -> FailoverApproval | None:
    """Pause until someone submits the Resume form; None when nobody did within the timeout."""
    log.info("waiting for approval", timeout_minutes=timeout_minutes)
    form = FailoverApproval.with_initial_data(description=description, comment="")
    return wait_for_answer(form, key="approval", timeout_seconds=timeout_minutes * 60, poll_seconds=APPROVAL_POLL_SECONDS)


def _approval_detail(answer: FailoverApproval | None) -> str:
    if answer is None:
        return "no answer"
    return ("approved" if answer.approve else "rejected") + (f": {answer.comment}" if answer.comment else "")


@dataclass(frozen=True)
class Refusal:
    """Why a failover or failback did not start: a person said no or cancelled the run while it
    waited (it ends Cancelled), or nobody answered in time (it ends Failed, which alerts); either
    way nothing changed."""

    reason: str
    by_person: bool


def _approve(journal: Journal, description: str, approved: bool, timeout_minutes: float) -> Refusal | None:
    """None when approved (on the CLI or in the Resume form), else the refusal."""
    if approved:
        journal.evidence.notes.append(f"approved on the command line by {journal.evidence.operator}")
        return None
    answer = journal.step("approval", lambda: request_approval(description, timeout_minutes), detail=_approval_detail)
    if answer is None and cancel.requested():
        return Refusal(f"stopped while waiting for approval: {cancel.requested()}", by_person=True)
    if answer is None:
        return Refusal(f"no approval within {timeout_minutes:g} min", by_person=False)
    if answer.approve:
        return None
    return Refusal("not approved" + (f": {answer.comment}" if answer.comment else ""), by_person=True)


def data_loss_text(points: dict[tuple[str, str], RecoveryPoint], now: datetime) -> str:
    """The approval's statement of what an unplanned failover loses."""
    lines = [f"DATA LOSS: writes after the recovery points are lost; RPO = {describe_seconds(data_loss_seconds(now, list(points.values())))} "
             f"as of {now.isoformat(timespec='seconds')} (it grows while this waits):"]
    lines += [f"- {p.host}/{p.disk}: point {p.time.isoformat(timespec='seconds')} ({p.consistency}), "
              f"{describe_seconds(data_loss_seconds(now, [p]))} before now" for p in points.values()]
    return "\n".join(lines)


def _targets(groups: list[list[Member]]) -> str:
    return "\n".join(f"- {m.id}: {m.primary.name} ({', '.join(m.disks)}) → {m.target.name}:{m.root}"
                     for m in members_of(groups))


def _use(journal: Journal, member: Member, host: str, disk: str, point: RecoveryPoint,
         bytes_written: int | None, seconds: float | None) -> None:
    journal.evidence.points.append(PointUsed(member=member.id, host=host, disk=disk, point_id=point.key,
                                             taken_at=point.time, consistency=point.consistency,
                                             bytes_written=bytes_written, restore_seconds=seconds))


def _made_point(repo: Repository, report: DiskReport) -> RecoveryPoint:
    """The point a backup just made (its report names it by key)."""
    if report.point is None:
        raise FailoverError(f"{report.host}/{report.disk}: the backup made no recovery point: {report.error}")
    return repo.read_point(report.point)


def _start_and_probe(journal: Journal, groups: list[list[Member]], sides: Callable[[Member], Side], base_dir: Path,
                     phase: Literal["copy", "primary-after"]) -> str | None:
    """Start group by group, each after the one before passed its probes; the first failing
    probe stops there and is returned as the reason."""
    for group in groups:
        name = group[0].group
        result = GroupResult(name=name, started=utcnow())
        journal.evidence.groups.append(result)
        for member in group:
            side = sides(member)
            journal.step("start", lambda: start_task(side, base_dir), group=name, member=member.id, detail=str)
        records = [r for member in group
                   for r in journal.step("probe", lambda: probe_task(sides(member), base_dir, phase),
                                         group=name, member=member.id,
                                         detail=lambda rs: ", ".join(f"{r.probe}: {r.detail}" for r in rs))]
        journal.evidence.probes.extend(records)
        failed = [r for r in records if not r.ok]
        if failed:
            result.detail = "; ".join(f"{r.member} {r.probe}: {r.detail}" for r in failed)
            store_evidence(journal.store, journal.evidence)
            return f"group {name}: probe failed: {result.detail}"
        result.ok, result.probes_passed_at, result.detail = True, utcnow(), f"{len(records)} probe(s) passed"
        store_evidence(journal.store, journal.evidence)
    return None


def _stop_all(journal: Journal, groups: list[list[Member]], sides: Callable[[Member], Side], base_dir: Path,
              name: str) -> None:
    for group in reversed(groups):
        for member in reversed(group):
            side = sides(member)
            journal.step(name, lambda: stop_task(side, base_dir), group=member.group, member=member.id, detail=str)


def _publish(journal: Journal, title: str) -> None:
    ev = journal.evidence
    summary = evidence_summary(ev)
    lines = [f"# {markdown_text(title)}", "",
             f"**{markdown_text(summary['state'])}** — RTO {summary['rto_seconds']} s (target {ev.rto_target_seconds:g} s), "
             f"RPO {summary['rpo_seconds']} s (target {ev.rpo_target_seconds:g} s), "
             f"bytes moved {human_size(int(summary['bytes_moved']))}", "",
             "| step | group | member | started | seconds | ok | detail |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s.name} | {markdown_text(s.group or '')} | {markdown_text(s.member or '')} | "
              f"{s.started.isoformat(timespec='seconds')} | {'' if s.seconds is None else f'{s.seconds:.1f}'} | "
              f"{s.ok} | {markdown_text(s.detail)} |" for s in ev.steps]
    lines += ["", *[f"- {markdown_text(n)}" for n in ev.notes]]
    create_markdown_artifact(key=artifact_key(ev.kind, ev.plan), markdown="\n".join(lines), description=title)


def _conclude(journal: Journal, title: str, problem: str | None, *, outcome: str, note: str = "",
              rejected: bool = False, stopped: bool = False, unchanged: bool = False) -> State:
    """The run's end: evidence closed and stored, the artifact, and the state the CLI exits by
    (Cancelled when not approved or stopped by a signal or the UI, Failed when a step or probe
    failed, else Completed)."""
    if rejected or stopped:
        journal.end("cancelled", problem)
    elif problem:
        journal.end("failed", problem)
    else:
        journal.end("passed", note)
    _publish(journal, title)
    data = evidence_summary(journal.evidence)
    if rejected:
        return Cancelled(message=f"{title}: {problem}; nothing was changed", data=data)
    if stopped:
        return Cancelled(message=f"{title}: stopped part-way: {problem}", data=data)
    if problem:
        return Failed(message=f"{title}: {problem}" + ("; nothing was changed" if unchanged else ""), data=data)
    return Completed(message=f"{title}: {outcome}", data=data)


@dataclass
class _Run:
    loaded: LoadedConfig
    groups: list[list[Member]]
    policy: BackupPolicy
    journal: Journal

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir

    @cached_property
    def repo(self) -> Repository:
        # Opened when first needed: a planned failover of a disk never backed up creates the
        # repository with its final backup.
        return open_repository(self.loaded.config.storage, self.base_dir, self.policy)


def _prepare(config_path: str, plan: str, policy: str | None, kind: DrillKind) -> _Run:
    """The config, plan and policy read (the plan's backup_policy unless `policy` names
    another), the plan's state checked (check_can_start), and the run's evidence begun."""
    configure()
    loaded = load_config(Path(config_path))
    chosen, groups = load_plan(loaded.config, loaded.base_dir, plan, source=config_path)
    backup_policy = policy_from_config(loaded.config.backup_policies, policy or chosen.backup_policy, source=config_path)
    store = open_store(loaded.config.storage, loaded.base_dir)
    undoes = check_can_start(store, plan, kind)
    evidence = DrillEvidence(run_id=_run_id(), kind=kind, plan=plan, plan_version=plan_version(chosen),
                             operator=operator(), started=utcnow(),
                             rto_target_seconds=chosen.rto_target.total_seconds(),
                             rpo_target_seconds=chosen.rpo_target.total_seconds(),
                             notes=[f"fails back failover {undoes.run_id}"] if undoes else [])
    return _Run(loaded, groups, backup_policy, Journal(store, evidence))


# --------------------------------------------------------------------------- flows


@flow(name="failover", flow_run_name="failover {plan} {mode}",
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def failover_run(config_path: str = "configs/lab.yaml", plan: str = "", mode: Literal["planned", "unplanned"] = "planned",
                 point: OptionalName = "", policy: OptionalName = "", approved: bool = False,
                 approval_timeout_minutes: float = 240) -> State:
    """Fail a recovery plan over to its DR targets (not a drill: the copies become production).

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        plan: The recovery plan (a key of recovery_plans in the config).
        mode: planned: stop the primary, final backup, zero data loss; unplanned: the primary is down, restore from `point`.
        point: Unplanned only: latest, latest-application-consistent, or before:<ISO time>; empty for each member's own point selector.
        policy: Backup policy whose repository settings (key, block size) apply; empty for the plan's.
        approved: Skip the approval pause (the CLI's --yes).
        approval_timeout_minutes: How long the run waits for approval before it fails, having changed nothing.
    """
    with cancel.stop_on_signals():
        return _fail_over(config_path, plan, mode, point, policy, approved, approval_timeout_minutes)


def _fail_over(config_path: str, plan: str, mode: Literal["planned", "unplanned"], point: str | None, policy: str | None,
               approved: bool, approval_timeout_minutes: float) -> State:
    kind: DrillKind = "planned-failover" if mode == "planned" else "unplanned-failover"
    run = _prepare(config_path, plan, policy, kind)
    groups, base_dir, journal = run.groups, run.base_dir, run.journal
    title = f"{mode.capitalize()} failover of plan {plan} ({current_run_name(journal.evidence.run_id)})"

    points: dict[tuple[str, str], RecoveryPoint] = {}
    if mode == "unplanned":
        points = journal.step("choose-points", lambda: unplanned_points(run.repo, groups, point),
                              detail=lambda found: ", ".join(p.key for p in found.values()))
        impact = data_loss_text(points, utcnow())
        journal.evidence.notes.append(impact.splitlines()[0])
    else:
        impact = ("The primary's applications are stopped and backed up once more after the stop: no data is lost; "
                  "the primary stays stopped until failback (or a cancel).")
    description = f"{title}\n\n{impact}\n\nMembers and their DR targets:\n{_targets(groups)}"
    refusal = _approve(journal, description, approved, approval_timeout_minutes)
    if refusal:
        return _conclude(journal, title, refusal.reason, outcome="not approved", rejected=refusal.by_person,
                         unchanged=True)

    journal.evidence.started = utcnow()  # the failover itself starts now: RTO and RPO count from here
    primary = {m.id: primary_side(m, base_dir) for m in members_of(groups)}
    copy = {m.id: copy_side(m) for m in members_of(groups)}
    stopped = False
    try:
        if mode == "planned":
            _stop_all(journal, groups, lambda m: primary[m.id], base_dir, "stop-primary")
            for member in members_of(groups):
                for disk in member.disks:
                    report = journal.step("final-backup", lambda: backup_disk_task(
                        run.loaded.config.storage, base_dir, *find_disk(run.loaded.config, member.primary.name, disk),
                        run.policy, policy_name(run.loaded.config, run.policy)),
                                          member=member.id, detail=lambda r: f"{disk}: point {r.point}, "
                                          f"{human_size(r.changed_bytes)} changed since the last backup")
                    points[(member.id, disk)] = _made_point(run.repo, report)
        for member in members_of(groups):
            for disk in member.disks:
                chosen = points[(member.id, disk)]
                result = journal.step("restore", lambda: restore_side_task(run.repo, chosen, copy[member.id], disk, base_dir),
                                      member=member.id, detail=lambda r: f"{disk} → {r.target}: {r.blocks_written}/{r.blocks} "
                                      f"blocks written ({human_size(r.bytes_written)})")
                _use(journal, member, member.primary.name, disk, chosen, result.bytes_written, result.seconds)
        problem = _start_and_probe(journal, groups, lambda m: copy[m.id], base_dir, "copy")
    except cancel.Interrupted as exc:
        problem, stopped = str(exc), True
    except Exception as exc:  # noqa: BLE001 - the evidence records the failure, the state carries it
        problem = str(exc)
    hint = " (the primary stays stopped: `patchdrill failover cancel` restarts it)" if mode == "planned" else ""
    return _conclude(journal, title, problem and problem + hint, outcome="failed over, not committed", stopped=stopped,
                     note=f"failed over, not committed: `patchdrill failover commit {journal.evidence.run_id}` makes "
                          "the copies production, `failover cancel` undoes it")


@flow(name="failback", flow_run_name="failback {plan}",
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def failback_run(config_path: str = "configs/lab.yaml", plan: str = "", policy: OptionalName = "",
                 approved: bool = False, approval_timeout_minutes: float = 240) -> State:
    """Bring a committed failover home: re-protect the copies, stop them, final sync, restore onto
    the primary delta-aware (only changed blocks travel), start and probe the primary.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        plan: The recovery plan (a key of recovery_plans in the config) whose failover is undone.
        policy: Backup policy whose repository settings (key, block size) apply; empty for the plan's.
        approved: Skip the approval pause (the CLI's --yes).
        approval_timeout_minutes: How long the run waits for approval before it fails, having changed nothing.
    """
    with cancel.stop_on_signals():
        return _fail_back(config_path, plan, policy, approved, approval_timeout_minutes)


def _fail_back(config_path: str, plan: str, policy: str | None, approved: bool, approval_timeout_minutes: float) -> State:
    run = _prepare(config_path, plan, policy, "failback")
    groups, base_dir, journal = run.groups, run.base_dir, run.journal
    title = f"Failback of plan {plan} ({current_run_name(journal.evidence.run_id)})"
    description = (f"{title}\n\nThe copies are backed up, stopped, backed up once more after the stop (no data is "
                   f"lost) and restored onto the primaries (only changed blocks travel); then the primaries start.\n\n"
                   f"Members (primary ← copy):\n{_targets(groups)}")
    refusal = _approve(journal, description, approved, approval_timeout_minutes)
    if refusal:
        return _conclude(journal, title, refusal.reason, outcome="not approved", rejected=refusal.by_person,
                         unchanged=True)

    journal.evidence.started = utcnow()
    primary = {m.id: primary_side(m, base_dir) for m in members_of(groups)}
    copy = {m.id: copy_side(m) for m in members_of(groups)}
    stopped = False
    try:
        for member in members_of(groups):
            for disk in member.disks:
                journal.step("re-protect", lambda: backup_side_task(run.loaded.config, base_dir, copy[member.id], disk,
                                                                    run.policy),
                             member=member.id, detail=lambda r: f"{r.host}/{r.disk}: point {r.point}")
        _stop_all(journal, groups, lambda m: copy[m.id], base_dir, "stop-copy")
        for member in members_of(groups):
            for disk in member.disks:
                report = journal.step("final-backup", lambda: backup_side_task(run.loaded.config, base_dir, copy[member.id],
                                                                               disk, run.policy),
                                      member=member.id, detail=lambda r: f"{r.host}/{r.disk}: point {r.point}, "
                                      f"{human_size(r.changed_bytes)} changed since the re-protect")
                chosen = _made_point(run.repo, report)
                result = journal.step("restore", lambda: restore_side_task(run.repo, chosen, primary[member.id], disk,
                                                                           base_dir),
                                      member=member.id, detail=lambda r: f"{disk} → {r.target}: {r.blocks_written}/"
                                      f"{r.blocks} blocks written ({human_size(r.bytes_written)} moved)")
                _use(journal, member, member.target.name, copy_disk_name(member, disk), chosen, result.bytes_written,
                     result.seconds)
        problem = _start_and_probe(journal, groups, lambda m: primary[m.id], base_dir, "primary-after")
    except cancel.Interrupted as exc:
        problem, stopped = str(exc), True
    except Exception as exc:  # noqa: BLE001 - the evidence records the failure, the state carries it
        problem = str(exc)
    moved = human_size(sum(p.bytes_written or 0 for p in journal.evidence.points))
    return _conclude(journal, title, problem, outcome="failed back", stopped=stopped,
                     note=f"failed back: the primaries serve again; {moved} moved")


@flow(name="failover-cancel", flow_run_name="failover-cancel {run_id}",
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def failover_cancel(config_path: str = "configs/lab.yaml", run_id: str = "") -> State:
    """Undo an uncommitted failover: stop the copies and, after a planned failover, start the
    primary again (it was only stopped; its disks are as they were).

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        run_id: The failover run to undo (its id, or a unique prefix of it).
    """
    configure()
    loaded = load_config(Path(config_path))
    store = open_store(loaded.config.storage, loaded.base_dir)
    evidence = find_evidence(store, run_id)
    if evidence.kind not in ("planned-failover", "unplanned-failover"):
        raise FailoverError(f"run {evidence.run_id} is a {evidence.kind}, not a failover: nothing to cancel")
    if committed(evidence):
        raise FailoverError(f"failover {evidence.run_id} is committed: fail back instead (`patchdrill failback {evidence.plan}`)")
    if undone(evidence):
        raise FailoverError(f"failover {evidence.run_id} is already cancelled")
    _, groups = load_plan(loaded.config, loaded.base_dir, evidence.plan, source=config_path)
    journal = Journal(store, evidence)
    base_dir = loaded.base_dir
    started = {s.member for s in evidence.steps if s.name == "start" and s.ok}
    problems = []
    for group in reversed(groups):
        for member in reversed(group):
            if member.id not in started:
                continue  # never started on its copy: nothing to stop
            side = copy_side(member)
            try:
                journal.step("cancel-stop-copy", lambda: stop_task(side, base_dir), group=member.group,
                             member=member.id, detail=str)
            except Exception as exc:  # noqa: BLE001 - stop every copy, then report
                problems.append(str(exc))
    # The primary is started again only if this failover stopped it (not after a rejected approval).
    stopped_primary = any(s.name == "stop-primary" for s in evidence.steps)
    if evidence.kind == "planned-failover" and stopped_primary and not problems:
        failover_groups = list(evidence.groups)
        problem = _start_and_probe(journal, groups, lambda m: primary_side(m, base_dir), base_dir, "primary-after")
        # The groups measure the failover's RTO: the primary's restart is in the steps and probes.
        evidence.groups = failover_groups
        if problem:
            problems.append(problem)
    now = utcnow()
    evidence.steps.append(Step(name="cancel", started=now, finished=now, ok=not problems, detail="; ".join(problems)))
    if problems:
        store_evidence(store, evidence)
        return Failed(message=f"cancel of failover {evidence.run_id}: " + "; ".join(problems),
                      data=evidence_summary(evidence))
    journal.end("cancelled", f"cancelled by {operator()}: copies stopped"
                + ("; the primary serves again" if evidence.kind == "planned-failover" and stopped_primary else ""))
    return Completed(message=f"failover {evidence.run_id} cancelled", data=evidence_summary(evidence))


def failover_commit(config_path: str, run_id: str, comment: str = "") -> DrillEvidence:
    """Record the commit of a failover (no host is touched: a plain function, not a flow)."""
    loaded = load_config(Path(config_path))
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        return commit_failover(store, run_id, operator(), comment)
