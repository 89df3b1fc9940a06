"""The steps of a real failover and of its failback: stop an application, take a final
incremental, restore a point delta-aware onto the other side, start it, probe it.

A failover moves each member of a plan from its *primary* side (the host and disks the config
names) to its *copy* side (the DR target: another host reached over its connector, or a path on
the controller). A failback is the same move in reverse, from the copy to the primary. Both are
described by a `Side`: a host and where each disk lives on it, so one set of steps serves both
directions and both kinds of target.

The application's start, stop and probe steps are command templates run on the side's host;
`{path}` is the member's first disk on that side, `{paths[NAME]}` any of its disks, `{address}`
the side's host address and `{host}` its name. The same templates serve the primary and the
copy: a copy is the same application on other disks at another address.

Plans are read here from the config's `recovery_plans` (see `FailoverPlan`) until the shared
recovery-plan models carry the same facts; everything below them takes explicit arguments.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from configs.models import DiskConfig, HostConfig, PatchdrillConfig
from configs.policies import BackupPolicy
from configs.secrets import redact
from connectors import connect
from connectors.stores.base import BlobStore
from tasks.backup.errors import PointNotFound
from tasks.backup.repository import RecoveryPoint, Repository
from tasks.backup.run import DiskReport, back_up_disk
from tasks.drill.evidence import DrillEvidence, ProbeRecord, Step, evidence_key, utcnow

#: How long one start, stop or probe command may run on its host.
STEP_TIMEOUT_SECONDS = 600.0
#: Where a run's copy of a disk is backed up from the DR host: points/<dr-host>/<host>.<disk>/…
COPY_DISK_SEPARATOR = "."


class FailoverError(Exception):
    """A failover or failback could not be set up or a step of it failed; one line, naming the
    plan, member, host or command at fault."""


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeCommand(_Plain):
    """A probe run on the side's host: passes when the command exits 0 (and prints `expect`)."""

    name: str
    command: str = Field(description="Command template ({path}, {paths[DISK]}, {address}, {host}).")
    expect: str | None = Field(default=None, description="Text the command's output must contain.")


class FailoverMember(_Plain):
    host: str = Field(description="The primary host (a host of the config).")
    disks: list[str] = Field(min_length=1, description="The primary host's disks the member's application lives on.")
    target_host: str | None = Field(default=None, description="The DR host (a host of the config); none: the controller.")
    target_paths: dict[str, str] = Field(description="Disk name → where its copy lives on the DR target.")
    start: str = Field(description="Command template that starts the application and returns once it runs.")
    stop: str = Field(description="Command template that stops the application cleanly and returns once it stopped.")
    probes: list[ProbeCommand] = Field(default_factory=list)

    @property
    def name(self) -> str:
        return self.host


class FailoverGroup(_Plain):
    name: str
    members: list[FailoverMember] = Field(min_length=1)


class FailoverPlan(_Plain):
    """What a failover needs of a recovery plan (read from the config's `recovery_plans`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    rto_seconds: float = Field(gt=0)
    rpo_seconds: float = Field(gt=0)
    groups: list[FailoverGroup] = Field(min_length=1)

    def members(self) -> list[tuple[FailoverGroup, FailoverMember]]:
        return [(group, member) for group in self.groups for member in group.members]


def load_failover_plan(config: PatchdrillConfig, name: str, *, source: str = "config") -> FailoverPlan:
    """The named plan, checked against the hosts and disks of the config; one line on error."""
    if name not in config.recovery_plans:
        known = ", ".join(sorted(config.recovery_plans)) or "none"
        raise FailoverError(f"{source}: no recovery plan {name!r} (known: {known})")
    body = config.recovery_plans[name].model_dump(mode="json")
    try:
        plan = FailoverPlan.model_validate({"name": name, **body})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FailoverError(f"{source}: recovery_plans.{name}.{where}: {first['msg']}") from None
    hosts = {h.name: h for h in config.hosts}
    for group, member in plan.members():
        at = f"{source}: recovery_plans.{name} group {group.name!r} member {member.host!r}"
        if member.host not in hosts:
            raise FailoverError(f"{at}: no host {member.host!r} in the config")
        known_disks = {d.name for d in hosts[member.host].disks}
        for disk in member.disks:
            if disk not in known_disks:
                raise FailoverError(f"{at}: host {member.host!r} has no disk {disk!r}")
            if disk not in member.target_paths:
                raise FailoverError(f"{at}: no target path for disk {disk!r} (target_paths)")
        if member.target_host is not None and member.target_host not in hosts:
            raise FailoverError(f"{at}: no DR host {member.target_host!r} in the config")
        if member.target_host == member.host:
            raise FailoverError(f"{at}: the DR target is the primary itself")
    return plan


# --------------------------------------------------------------------------- sides


#: The controller as a DR target (a member without target_host): restores land on this machine.
CONTROLLER = HostConfig(name="controller", transport="local")


@dataclass(frozen=True)
class Side:
    """One end of a failover: a host and where each of the member's disks lives on it."""

    host: HostConfig
    paths: dict[str, str]
    role: Literal["primary", "copy"]

    def render(self, template: str) -> str:
        first = next(iter(self.paths.values()))
        try:
            return template.format(path=first, paths=self.paths, address=self.host.address, host=self.host.name)
        except (KeyError, IndexError, ValueError) as exc:
            raise FailoverError(f"command template {template!r}: unknown or malformed placeholder {exc}") from None


def primary_side(config: PatchdrillConfig, base_dir: Path, member: FailoverMember) -> Side:
    host = next(h for h in config.hosts if h.name == member.host)
    disks = {d.name: d for d in host.disks}
    paths = {}
    for name in member.disks:
        path = disks[name].path
        if host.transport == "local" and not Path(path).is_absolute():
            path = os.path.normpath(base_dir / path)  # the lab's paths are relative to the config
        paths[name] = path
    return Side(host=host, paths=paths, role="primary")


def copy_side(config: PatchdrillConfig, member: FailoverMember) -> Side:
    host = CONTROLLER if member.target_host is None else next(h for h in config.hosts if h.name == member.target_host)
    return Side(host=host, paths={d: member.target_paths[d] for d in member.disks}, role="copy")


def copy_disk_name(member: FailoverMember, disk: str) -> str:
    """The name under which the DR copy of a disk is backed up as a disk of the DR host."""
    return f"{member.host}{COPY_DISK_SEPARATOR}{disk}"


# --------------------------------------------------------------------------- points


PointSelector = str  # "latest" | "latest-app-consistent" | "before:<ISO time>"


def parse_selector(selector: str) -> tuple[str, datetime | None]:
    """('latest'|'app'|'before', time) from a selector; one clear line for anything else."""
    if selector in ("latest", ""):
        return "latest", None
    if selector in ("latest-app-consistent", "app-consistent"):
        return "app", None
    if selector.startswith("before:"):
        text = selector.removeprefix("before:")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise FailoverError(f"--point {selector!r}: {text!r} is not an ISO time such as 2026-12-02T01:30:00Z") from None
        return "before", moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    raise FailoverError(f"--point {selector!r}: use latest, latest-app-consistent or before:<ISO time>")


def choose_point(repo: Repository, host: str, disk: str, selector: str) -> RecoveryPoint:
    kind, moment = parse_selector(selector)
    points = repo.points(host, disk)
    if kind == "app":
        points = [p for p in points if p.consistency == "application-consistent"]
    elif kind == "before":
        points = [p for p in points if moment is not None and p.time <= moment]
    if not points:
        raise PointNotFound(f"{repo.name}: no recovery point of host {host!r} disk {disk!r} matches {selector!r}")
    return points[-1]


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


def run_on(side: Side, template: str, base_dir: Path, what: str) -> str:
    """Run a rendered template on the side's host; its output, or FailoverError naming the
    host, the step and the command's last line."""
    command = side.render(template)
    with connect(side.host, base_dir=base_dir) as connector:
        result = connector.run(command, timeout=STEP_TIMEOUT_SECONDS)
    if not result.ok:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [f"exit {result.exit_code}"]
        raise FailoverError(redact(f"{side.host.name}: {what} failed (exit {result.exit_code}): {last[0]}"))
    return result.stdout


def make_parent(side: Side, disk: str, base_dir: Path) -> None:
    """Create the directory a disk's copy goes into on a fresh DR target. A restore on the
    controller makes it itself; one over a connector expects it there."""
    parent = shlex.quote(str(PurePosixPath(side.paths[disk]).parent))
    with connect(side.host, base_dir=base_dir) as connector:
        result = connector.run(f"mkdir -p -- {parent}", timeout=60)
    if not result.ok:
        raise FailoverError(f"{side.host.name}: cannot create {parent} for the copy of disk {disk}: "
                            f"{result.stderr.strip() or f'exit {result.exit_code}'}")


@task(name="stop-application", task_run_name="stop {member.host} on {side.host.name}", cache_policy=NO_CACHE)
def stop_task(member: FailoverMember, side: Side, base_dir: Path) -> None:
    run_on(side, member.stop, base_dir, f"stopping {member.host}'s application")


@task(name="start-application", task_run_name="start {member.host} on {side.host.name}", cache_policy=NO_CACHE)
def start_task(member: FailoverMember, side: Side, base_dir: Path) -> None:
    run_on(side, member.start, base_dir, f"starting {member.host}'s application")


@task(name="probe-application", task_run_name="probe {member.host} on {side.host.name}", cache_policy=NO_CACHE)
def probe_task(member: FailoverMember, side: Side, base_dir: Path,
               phase: Literal["copy", "primary-after"]) -> list[ProbeRecord]:
    """Every probe of the member, each a record (a failed probe is a record, not an exception)."""
    records = []
    for probe in member.probes:
        started, at = time.monotonic(), utcnow()
        try:
            output = run_on(side, probe.command, base_dir, f"probe {probe.name}")
            ok = probe.expect is None or probe.expect in output
            detail = "passed" if ok else f"output lacks {probe.expect!r}"
            observed = output.strip()[-200:]
        except Exception as exc:  # noqa: BLE001 - a probe that cannot run has failed
            ok, detail, observed = False, redact(str(exc)), None
        records.append(ProbeRecord(member=member.host, phase=phase, probe=probe.name, ok=ok, detail=detail,
                                   seconds=round(time.monotonic() - started, 3), at=at, observed=observed))
    return records


@task(name="backup-copy", task_run_name="back up the copy of {member.host}/{disk} on {side.host.name}",
      cache_policy=NO_CACHE)
def backup_side_task(config: PatchdrillConfig, base_dir: Path, member: FailoverMember, side: Side, disk: str,
                     policy: BackupPolicy) -> DiskReport:
    """Back up a member's disk as it lies on a side: on the copy side it is a disk of the DR host
    named <host>.<disk>, so the copy is protected while it serves (ASR's re-protect)."""
    name = disk if side.role == "primary" else copy_disk_name(member, disk)
    disk_config = DiskConfig(name=name, path=side.paths[disk], kind="auto")
    return back_up_disk(config, base_dir, side.host, disk_config, policy)


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
