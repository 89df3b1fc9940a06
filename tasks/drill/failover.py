"""The steps of a real failover and of its failback: stop an application, take a final
incremental, restore a point delta-aware onto the other side, start it, probe it.

A failover moves each member of a plan from its *primary* side (the host and disks the config
names) to its *copy* side (the DR target: another host reached over its connector, or a path on
the controller). A failback is the same move in reverse, from the copy to the primary. Both are
described by a `Side`: a host and where each disk lives on it, so one set of steps serves both
directions and both kinds of target.

The plan is the drill's (configs/plans.py, resolved by tasks/drill/members.py). A member's
application is started and stopped with its preset on both sides, rendered by
tasks/drill/control.py as a drill's are (`start_service`, `stop_service`), with the templates
filled for each side: `{root}` is the copy's target path on the copy and the directory holding
the primary's first disk on the primary, `{disk:NAME}` the disk's path on that side. What
differs on the primary (a unit or service name, a command line) is the app's `primary:`. The copy is checked with the
member's `probes`, the primary (on failback) with its `steady_state` probes; their text may also
use `{address}`, the side's host address. The same templates serve both sides: a copy is the
same application on other disks at another address. A failover's copy is production: it runs on
its host's network, never in the drill's namespace.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.models import DiskConfig, HostConfig, PatchdrillConfig
from configs.plans import AppControl, PointSelector, RecoveryPlan
from configs.policies import BackupPolicy
from configs.secrets import redact
from connectors import connect
from connectors.stores.base import BlobStore
from tasks.backup import cancel
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.restore import RestoreResult
from tasks.backup.disk import DiskReport, back_up_disk, policy_name
from tasks.drill.control import CopyContext, TemplateError, check_preset, control_spec, start_service, stop_service
from tasks.backup.steps import restore_on
from tasks.drill.copy import PointMissing, choose_point
from tasks.drill.evidence import DrillEvidence, ProbeRecord, Step, evidence_key, utcnow
from tasks.drill.members import Member, PlanError, find_plan, primary_disk_path, resolve
from tasks.drill.probing import fill_templates
from tasks.drill.target import TargetError
from tasks.probes import ProbeContext, run_probes

#: How long one start, stop or probe command may run on its host.
STEP_TIMEOUT_SECONDS = 600.0
#: Where a run's copy of a disk is backed up from the DR host: points/<dr-host>/<host>.<disk>/…
COPY_DISK_SEPARATOR = "."
#: Seconds between two rounds of probes while an application starts.
PROBE_RETRY_SECONDS = 0.5


class FailoverError(Exception):
    """A failover or failback could not be set up or a step of it failed; one line, naming the
    plan, member, host or command at fault."""


def load_plan(config: PatchdrillConfig, base_dir: Path, name: str, *,
              source: str = "config") -> tuple[RecoveryPlan, list[list[Member]]]:
    """The named plan and its members group by group; refuses what a failover cannot run."""
    try:
        plan = find_plan(config, name, source)
        groups = resolve(config, base_dir, plan)
    except PlanError as exc:
        raise FailoverError(str(exc)) from None
    for member in (m for group in groups for m in group):
        if member.spec.app is None:
            continue
        for host in (member.primary, member.target):
            # config check proves the target suits the preset; a failover runs it on the primary too.
            try:
                check_preset(member.spec.app.preset, member=member.id, host=host.name, os_family=host.os_family)
            except TemplateError as exc:
                raise FailoverError(f"{source}: recovery_plans.{name}: {exc}") from None
    return plan, groups


def members_of(groups: list[list[Member]]) -> list[Member]:
    return [m for group in groups for m in group]


# --------------------------------------------------------------------------- sides


@dataclass(frozen=True)
class Side:
    """One end of a failover for one member: a host, the member's root there and where each
    of its disks lives. The copy's root is the plan's target path (disk NAME at <root>/NAME);
    the primary's is the directory holding its first disk."""

    member: Member
    host: HostConfig
    root: str
    paths: dict[str, str]
    role: Literal["primary", "copy"]

    @property
    def app(self) -> AppControl | None:
        """The member's application control as it applies on this side (the primary's overrides)."""
        app = self.member.spec.app
        return None if app is None else app.on(self.role)

    def context(self) -> CopyContext:
        app = self.app
        return CopyContext(member=self.member.id, root=self.root, name=(app.name if app else None) or "",
                           port=app.port if app else None, disks=self.paths)

    def values(self) -> dict[str, str]:
        """What a probe's text fields are filled with: the templates' placeholders and the side's
        {address}, so one probe checks the primary or the copy, wherever it runs."""
        return {"root": self.root, "name": self.member.id, "address": self.host.address,
                **{f"disk:{disk}": path for disk, path in self.paths.items()}}


def primary_side(member: Member, base_dir: Path) -> Side:
    paths = {disk: primary_disk_path(member, disk, base_dir) for disk in member.disks}
    return Side(member=member, host=member.primary, root=posixpath.dirname(next(iter(paths.values())).rstrip("/")),
                paths=paths, role="primary")


def copy_side(member: Member) -> Side:
    return Side(member=member, host=member.target, root=member.root, paths=member.restored, role="copy")


def copy_disk_name(member: Member, disk: str) -> str:
    """The name under which the DR copy of a disk is backed up as a disk of the DR host."""
    return f"{member.primary.name}{COPY_DISK_SEPARATOR}{disk}"


# --------------------------------------------------------------------------- points


def parse_selector(text: str) -> PointSelector:
    """latest | latest-application-consistent (or latest-app-consistent) | before:<ISO time>."""
    if text in ("latest", "latest-application-consistent", "latest-app-consistent"):
        return PointSelector(select="latest" if text == "latest" else "latest-application-consistent")
    if text.startswith("before:"):
        moment = text.removeprefix("before:")
        try:
            return PointSelector(select="before", before=datetime.fromisoformat(moment.replace("Z", "+00:00")))
        except ValueError:
            raise FailoverError(f"--point {text!r}: {moment!r} is not an ISO time such as 2026-12-02T01:30:00Z") from None
    raise FailoverError(f"--point {text!r}: use latest, latest-application-consistent or before:<ISO time>")


def unplanned_points(repo: Repository, groups: list[list[Member]],
                     override: str | None) -> dict[tuple[str, str], RecoveryPoint]:
    """The point each member's disk is restored from: the --point given, else the member's own."""
    chosen = parse_selector(override) if override else None
    found = {}
    for member in members_of(groups):
        for disk in member.disks:
            try:
                found[(member.id, disk)] = choose_point(repo, member.primary.name, disk, chosen or member.spec.point)
            except PointMissing as exc:
                raise FailoverError(f"member {member.id}: {exc}") from None
    return found


def data_loss_seconds(start: datetime, points: list[RecoveryPoint]) -> float:
    """Start − the oldest point: the most writes any member loses (never below zero: a point
    taken after the start, as a planned failover's final one, loses nothing)."""
    return max(0.0, (start - min(p.time for p in points)).total_seconds())


def describe_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


# --------------------------------------------------------------------------- steps on a host


def control(side: Side, action: Literal["start", "stop"], base_dir: Path) -> str:
    """Start or stop the member's application on the side with its preset (tasks/drill/control.py
    renders the commands, as for a drill): a stop is proven by the preset's stopped check."""
    app = side.app
    if app is None:
        return f"no application to {action} (files only)"
    spec = control_spec(app)
    try:
        with connect(side.host, base_dir=base_dir) as connector:
            if action == "start":
                done = start_service(connector, spec, side.context(), pidfile=app.pidfile, timeout=STEP_TIMEOUT_SECONDS)
            else:
                done = stop_service(connector, spec, side.context(), pidfile=app.pidfile, timeout=STEP_TIMEOUT_SECONDS)
    except (TargetError, TemplateError) as exc:
        raise FailoverError(redact(f"{action} of {side.member.id} on the {side.role}: {exc}")) from None
    return f"{done} on {side.host.name}"


@task(name="stop-application", task_run_name="stop {side.member.id} on {side.host.name}", cache_policy=NO_CACHE)
def stop_task(side: Side, base_dir: Path) -> str:
    return control(side, "stop", base_dir)


@task(name="start-application", task_run_name="start {side.member.id} on {side.host.name}", cache_policy=NO_CACHE)
def start_task(side: Side, base_dir: Path) -> str:
    return control(side, "start", base_dir)


@task(name="probe-application", task_run_name="probe {side.member.id} on {side.host.name}", cache_policy=NO_CACHE)
def probe_task(side: Side, base_dir: Path, phase: Literal["copy", "primary-after"]) -> list[ProbeRecord]:
    """The copy's probes (the plan's `probes`) or the primary's (its `steady_state`), against
    the side's host on its own network (a failover's copy is production, not isolated); retried
    as a round while the application starts, up to its ready_wait_seconds."""
    spec = side.member.spec
    probes = [fill_templates(p, side.values()) for p in (spec.probes if side.role == "copy" else spec.steady_state)]
    deadline = time.monotonic() + (spec.app.ready_wait_seconds if spec.app else 0)
    with connect(side.host, base_dir=base_dir) as connector:
        context = ProbeContext.for_host(side.host, connector, base_dir=base_dir)
        while True:
            results = run_probes(context, probes)
            if all(r.ok for r in results) or time.monotonic() >= deadline or cancel.requested():
                break
            time.sleep(PROBE_RETRY_SECONDS)
    return [ProbeRecord(member=side.member.id, phase=phase, probe=r.probe, ok=r.ok, detail=r.detail,
                        seconds=round(r.seconds, 3), at=utcnow(), observed=r.observed) for r in results]


@task(name="backup-side", task_run_name="back up {side.member.id}/{disk} on {side.host.name}", cache_policy=NO_CACHE)
def backup_side_task(config: PatchdrillConfig, base_dir: Path, side: Side, disk: str, policy: BackupPolicy) -> DiskReport:
    """Back up a member's disk as it lies on a side: on the primary under its own name, on the
    copy as a disk of the DR host named <host>.<disk>, so the copy is protected while it serves
    (ASR's re-protect)."""
    name = disk if side.role == "primary" else copy_disk_name(side.member, disk)
    disk_config = DiskConfig(name=name, path=side.paths[disk], kind="auto")
    return back_up_disk(config.storage, base_dir, side.host, disk_config, policy,
                        policy_name=policy_name(config, policy))


@task(name="restore-side", task_run_name="restore {side.member.id}/{disk} onto {side.host.name}", cache_policy=NO_CACHE)
def restore_side_task(repo: Repository, point: RecoveryPoint, side: Side, disk: str, base_dir: Path) -> RestoreResult:
    """Restore point onto the side's path for disk, delta-aware: what is there already (an
    earlier copy, the primary's own disk on failback) is rewritten only where it differs."""
    with connect(side.host, base_dir=base_dir) as connector:
        return restore_on(repo, point, connector, side.paths[disk])


# --------------------------------------------------------------------------- evidence


def store_evidence(store: BlobStore, evidence: DrillEvidence) -> str:
    key = evidence_key(evidence.plan, evidence.run_id)
    store.put(key, evidence.model_dump_json(indent=2).encode(), overwrite=True)
    return key


def find_evidence(store: BlobStore, run_id: str) -> DrillEvidence:
    """A run's evidence by its id (or a unique prefix of it), whatever its plan."""
    found = [i.key for i in store.list("evidence/drills/")
             if i.key.endswith(".json") and i.key.rsplit("/", 1)[1].startswith(run_id)]
    if not found:
        raise FailoverError(f"no failover or drill run {run_id!r} in the store")
    if len(found) > 1:
        raise FailoverError(f"{run_id!r} matches {len(found)} runs: give more of the run id")
    return DrillEvidence.model_validate_json(store.get(found[0]))


def plan_runs(store: BlobStore, plan: str) -> list[DrillEvidence]:
    """The plan's runs in the store, oldest first."""
    runs = [DrillEvidence.model_validate_json(store.get(i.key))
            for i in store.list(f"evidence/drills/{plan}/") if i.key.endswith(".json")]
    return sorted(runs, key=lambda e: e.started)


def committed(evidence: DrillEvidence) -> bool:
    return any(s.name == "commit" and s.ok for s in evidence.steps)


def undone(evidence: DrillEvidence) -> bool:
    """A failover `failover cancel` has undone."""
    return any(s.name == "cancel" and s.ok for s in evidence.steps)


#: Steps after which a failover has changed something a cancel must undo.
CHANGING_STEPS = ("stop-primary", "restore", "start")


def failover_state(evidence: DrillEvidence) -> str:
    """In words: where a failover run left the plan."""
    if undone(evidence):
        return "cancelled (undone)"
    changed = any(s.name in CHANGING_STEPS for s in evidence.steps)
    if evidence.outcome == "passed":
        return "committed" if committed(evidence) else "failed over, not committed"
    if evidence.outcome in ("failed", "cancelled", "crashed") and changed:
        return f"{evidence.outcome} part-way, not committed: cancel it"
    return evidence.outcome


def active_failover(store: BlobStore, plan: str) -> DrillEvidence | None:
    """The plan's latest failover when it still has to be dealt with: in effect (passed, not
    failed back since) or stopped part-way and not undone by a cancel. None otherwise."""
    current = None
    for evidence in plan_runs(store, plan):
        if evidence.kind in ("planned-failover", "unplanned-failover"):
            changed = any(s.name in CHANGING_STEPS for s in evidence.steps)
            if not undone(evidence) and (evidence.outcome == "passed" or changed):
                current = evidence
        elif evidence.kind == "failback" and evidence.outcome == "passed":
            current = None
    return current


def check_can_start(store: BlobStore, plan: str, kind: str) -> DrillEvidence | None:
    """Refuse what the plan's state forbids, before anything changes: a failover while the plan
    already serves from its copies, a failback without a committed failover. For a failback,
    the failover it undoes."""
    current = active_failover(store, plan)
    if kind != "failback":
        if current is not None and current.outcome == "passed":
            raise FailoverError(f"plan {plan} already serves from its copies (failover {current.run_id}): fail back "
                                "or cancel that one first")
        if current is not None:
            raise FailoverError(f"failover {current.run_id} of plan {plan} ended {current.outcome} part-way: cancel it "
                                f"first (`patchdrill failover cancel {current.run_id}`)")
        return None
    if current is None or current.outcome != "passed":
        hint = f" (failover {current.run_id} ended {current.outcome} part-way: cancel it)" if current else ""
        raise FailoverError(f"plan {plan} has no failover in effect: nothing to fail back{hint}")
    if not committed(current):
        raise FailoverError(f"failover {current.run_id} of plan {plan} is not committed: commit it "
                            f"(`patchdrill failover commit {current.run_id}`) or cancel it instead of failing back")
    return current


def commit_failover(store: BlobStore, run_id: str, operator: str, comment: str = "") -> DrillEvidence:
    """Record the commit of a failover: the copy is production from now on."""
    evidence = find_evidence(store, run_id)
    if evidence.kind not in ("planned-failover", "unplanned-failover"):
        raise FailoverError(f"run {evidence.run_id} is a {evidence.kind}, not a failover: nothing to commit")
    if evidence.outcome != "passed":
        raise FailoverError(f"failover {evidence.run_id} of plan {evidence.plan} ended {evidence.outcome}: "
                            "only a failover whose probes passed can be committed")
    if committed(evidence):
        raise FailoverError(f"failover {evidence.run_id} of plan {evidence.plan} is already committed")
    now = utcnow()
    evidence.steps.append(Step(name="commit", started=now, finished=now, ok=True,
                               detail=f"committed by {operator}" + (f": {comment}" if comment else "")))
    evidence.notes.append(f"committed by {operator} at {now.isoformat(timespec='seconds')}")
    store_evidence(store, evidence)
    return evidence


def evidence_summary(evidence: DrillEvidence) -> dict[str, object]:
    """The figures a person or a script reads first."""
    return {"run_id": evidence.run_id, "plan": evidence.plan, "kind": evidence.kind, "outcome": evidence.outcome,
            "state": failover_state(evidence) if evidence.kind != "failback" else evidence.outcome,
            "rto_seconds": evidence.rto_seconds,
            "rpo_seconds": None if evidence.rpo_seconds is None else max(0.0, evidence.rpo_seconds),
            "bytes_moved": sum(p.bytes_written or 0 for p in evidence.points),
            "points": [p.point_id for p in evidence.points], "notes": evidence.notes}


def evidence_json(evidence: DrillEvidence) -> str:
    return json.dumps(evidence_summary(evidence), indent=2, default=str)
