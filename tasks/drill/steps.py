"""The steps of a test failover drill, as Prefect tasks, and the context they share.

Everything a step creates on a DR target is recorded in the run's ledger (tasks/drill/ledger.py)
before it is created, so `cleanup_step` (and `patchdrill drill cleanup RUN` after a controller
crash) removes exactly that and verifies each item gone. A member's failover never raises for
an ordinary failure: it returns what it did, timestamped, with the reason it stopped, so the
evidence keeps the whole picture and cleanup always follows.

Reusable beyond the test failover (planned/unplanned failover and failback build on them):
`open_drill`, `primary_digests`, `isolate_members` (each member's test network, before the
RTO clock), `failover_member` (restore + start + probe one member onto its target),
`run_actions`, `cleanup_step`, `write_evidence`.
"""

from __future__ import annotations

import contextlib
import shlex
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.loader import load_config
from configs.models import HostConfig, PatchdrillConfig
from configs.plans import CONTROLLER, Action, RecoveryPlan
from configs.probes import ChecksumProbe
from configs.secrets import redact
from connectors import connect
from connectors.agent import ScriptAgent
from connectors.base import Connector, ConnectorError
from connectors.stores import BlobStore, open_store
from tasks.backup import cancel
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.drill.cleanup import CleanupReport, cleanup_run
from tasks.drill.control import ControlSpec, CopyContext, control_spec, start_copy
from tasks.drill.copies import claim_copy_root, record_path
from tasks.backup.steps import restore_on
from tasks.drill.copy import disk_digest, point_file_digests, repository
from tasks.drill.evidence import (
    Checksum, CleanupItem, DrillEvidence, PointUsed, ProbeRecord, Step, evidence_key, utcnow,
)
from tasks.drill.isolation import create_namespace, prove_isolation, require_isolation
from tasks.drill.ledger import Ledger
from tasks.drill.members import CONTROLLER_HOST, Member, find_plan, primary_disk_path, resolve
from tasks.drill.probing import checksum_paths, copy_probes
from tasks.drill.readiness import Readiness, check_readiness
from tasks.drill.target import HOST_SCRIPT, namespace_prefix
from tasks.probes import LINUX_SCRIPT as PROBE_SCRIPT

log = structlog.stdlib.get_logger("patchdrill.drill")


@dataclass
class DrillContext:
    """One run's config, plan, store, repository and ledger (plain objects: tasks take it with
    caching off, so Prefect never hashes or persists it)."""

    config_path: str
    config: PatchdrillConfig
    base_dir: Path
    plan_name: str
    plan: RecoveryPlan
    run_id: str
    store: BlobStore
    repo: Repository
    ledger: Ledger
    groups: list[list[Member]] = field(default_factory=list)

    def host(self, name: str) -> HostConfig:
        if name == CONTROLLER:
            return CONTROLLER_HOST
        for host in self.config.hosts:
            if host.name == name:
                return host
        raise KeyError(f"{self.config_path}: no host {name!r} (named in drill {self.run_id}'s ledger)")

    def connect(self, host: HostConfig) -> Connector:
        return connect(host, base_dir=self.base_dir)

    def connect_name(self, name: str) -> Connector:
        return self.connect(self.host(name))

    @property
    def members(self) -> list[Member]:
        return [m for group in self.groups for m in group]


def open_drill(config_path: str, plan_name: str, run_id: str) -> DrillContext:
    loaded = load_config(config_path)
    plan = find_plan(loaded.config, plan_name, config_path)
    store = open_store(loaded.config.storage, loaded.base_dir)
    repo = repository(loaded.config, loaded.base_dir, plan.backup_policy)
    ctx = DrillContext(config_path=config_path, config=loaded.config, base_dir=loaded.base_dir, plan_name=plan_name,
                       plan=plan, run_id=run_id, store=store, repo=repo, ledger=Ledger(store, run_id))
    ctx.groups = resolve(loaded.config, loaded.base_dir, plan)
    return ctx


class Timeline:
    """Timestamped steps of one member (or of the run), appended as they finish."""

    def __init__(self, group: str | None = None, member: str | None = None) -> None:
        self.group = group
        self.member = member
        self.steps: list[Step] = []

    @contextlib.contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[Step]:
        record = Step(name=name, group=self.group, member=self.member, started=utcnow(), detail=detail)
        self.steps.append(record)
        try:
            yield record
        except BaseException as exc:
            record.finished, record.ok = utcnow(), False
            record.detail = redact(f"{record.detail}; {exc}" if record.detail else str(exc))
            raise
        record.finished = utcnow()
        if record.ok is None:
            record.ok = True


# --------------------------------------------------------------------------- readiness


@task(name="drill-readiness", cache_policy=NO_CACHE)
def readiness_step(ctx: DrillContext) -> Readiness:
    """Checks only: points within the RPO, targets reachable with room, primaries healthy."""
    return check_readiness(ctx.members, ctx.repo, ctx.connect, now=utcnow(),
                           rpo_seconds=ctx.plan.rpo_target.total_seconds())


# --------------------------------------------------------------------------- primary checksums


@task(name="drill-primary-checksums", task_run_name="primary checksums {phase}", cache_policy=NO_CACHE)
def primary_digests(ctx: DrillContext, phase: str) -> dict[tuple[str, str], str]:
    """(host, disk) -> a read-only digest of each primary disk the plan restores."""
    found: dict[tuple[str, str], str] = {}
    for member in ctx.members:
        with ctx.connect(member.primary) as primary:
            for disk in member.disks:
                if (member.primary.name, disk) not in found:
                    path = primary_disk_path(member, disk, ctx.base_dir)
                    found[(member.primary.name, disk)] = disk_digest(primary, path).digest
    log.info("drill.primary_checksums", phase=phase, disks=len(found))
    return found


# --------------------------------------------------------------------------- one member


@dataclass
class MemberOutcome:
    member: str
    group: str
    steps: list[Step] = field(default_factory=list)
    points: list[PointUsed] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and all(p.ok for p in self.probes)


def _run_on(connector: Connector, command: str, namespace: str | None, timeout: float) -> None:
    if namespace:
        command = f"ip netns exec {shlex.quote(namespace)} sh -c {shlex.quote(command)}"
    connector.run(command, timeout=timeout, check=True)


def _fill(command: str, values: dict[str, str]) -> str:
    for key, text in values.items():
        command = command.replace("{" + key + "}", shlex.quote(text))
    return command


def template_values(member: Member, namespace: str | None) -> dict[str, str]:
    values = {"root": member.root, "name": member.id}
    values |= {f"disk:{disk}": path for disk, path in member.restored.items()}
    if namespace:
        values["namespace"] = namespace
    return values


def run_actions(ctx: DrillContext, member: Member, actions: list[Action], connector: Connector,
                namespace: str | None, timeline: Timeline, phase: str) -> None:
    """A member's pre or post script actions: on the target (inside the namespace) or on the
    controller. Manual actions are not here: the flow pauses for them at the group's boundary
    (a task cannot pause its flow run)."""
    values = template_values(member, namespace)
    for index, action in enumerate(actions):
        if action.kind == "manual":
            continue
        with timeline.step(f"{phase} action {index + 1}", action.command or ""):
            command = _fill(action.command or "", values)
            if action.where == "controller":
                with ctx.connect(CONTROLLER_HOST) as local:
                    local.run(command, timeout=action.timeout_seconds, check=True)
            else:
                _run_on(connector, command, namespace, action.timeout_seconds)


def _control_spec(member: Member) -> ControlSpec | None:
    return None if member.spec.app is None else control_spec(member.spec.app)


def namespace_agent(connector: Connector, namespace: str) -> ScriptAgent:
    """A script agent inside namespace on the target, with the drill's and the probes' host
    scripts loaded: the copy's start, wait and probes in one interpreter rather than one each."""
    agent = ScriptAgent.start(connector, namespace_prefix(namespace))
    try:
        agent.load(HOST_SCRIPT, PROBE_SCRIPT)
    except ConnectorError:
        agent.close()  # each call then runs afresh, as without an agent
    return agent


@dataclass
class Isolated:
    """A member's test network, made before the failover's clock starts: its namespace, the
    proof that it cannot reach the primary, and a script agent inside it (on a connection of
    its own, held until the drill ends) through which the copy's start, wait and probes go."""

    namespace: str
    agent: ScriptAgent
    connection: Connector
    step: Step

    def close(self) -> None:
        """Ends the agent and its connection (again is harmless): before cleanup counts the
        namespace's processes."""
        self.agent.close()
        self.connection.close()


def isolate(ctx: DrillContext, member: Member, timeline: Timeline) -> Isolated:
    """Create the member's network namespace on its target (recorded in the ledger first),
    start a script agent inside it and prove the namespace cannot reach the primary."""
    production = [(member.primary.address, member.primary.effective_port)]
    connection = ctx.connect(member.target)
    agent: ScriptAgent | None = None
    try:
        with timeline.step("isolate") as step:
            require_isolation(connection, member.id, "netns")
            space = create_namespace(connection, ctx.ledger, member=member.id)
            # Inside the ledgered namespace: its removal stops the agent too, should it outlive us.
            agent = namespace_agent(connection, space.name)
            proof = prove_isolation(connection, space, production, agent=agent)
            step.detail = proof.evidence
            if not proof.ok:
                raise RuntimeError(f"namespace {space.name} is not isolated: {'; '.join(proof.problems)}")
            return Isolated(space.name, agent, connection, step)
    except BaseException:
        if agent is not None:
            agent.close()
        connection.close()
        raise


def isolate_members(ctx: DrillContext) -> tuple[dict[str, Isolated], list[MemberOutcome]]:
    """Every member's test network, before the failover's clock starts.

    The namespace is the drill's own apparatus, as Azure Site Recovery's isolated test network
    is made before a test failover: a real failover has none, so timing it would make a drill's
    RTO promise less than the failover it rehearses. Members isolate side by side; each one's
    failure (a member that cannot be isolated stops the drill before anything is restored) or
    cancellation comes back as that member's outcome. What was made is in the ledger either way.
    """
    wanted = [m for m in ctx.members if m.isolation == "netns"]
    isolated: dict[str, Isolated] = {}
    failed: list[MemberOutcome] = []

    def one(member: Member) -> None:
        timeline = Timeline(member.group, member.id)
        try:
            cancel.check()
            isolated[member.id] = isolate(ctx, member, timeline)
        except cancel.Interrupted as exc:
            failed.append(MemberOutcome(member.id, member.group, timeline.steps, error=str(exc), cancelled=True))
        except Exception as exc:  # noqa: BLE001 - a member's failure is evidence; cleanup follows either way
            failed.append(MemberOutcome(member.id, member.group, timeline.steps, error=_member_error(member, exc)))

    if wanted:
        with ThreadPoolExecutor(max_workers=min(len(wanted), 8), thread_name_prefix="isolate") as pool:
            list(pool.map(one, wanted))
    return isolated, failed


def _member_error(member: Member, exc: Exception) -> str:
    """What stopped a member, redacted and logged (an exception without a message by its type)."""
    error = redact(str(exc) or type(exc).__name__)
    log.error("drill.member_failed", member=member.id, error=error)
    return error


def failover_member(ctx: DrillContext, member: Member, points: dict[str, RecoveryPoint],
                    isolated: Isolated | None = None) -> MemberOutcome:
    """Restore the member's points onto its target, start the copy (inside its test network
    when isolated) and probe it.

    Stops at the first failing step (its reason in `error`); what it created is in the ledger.
    """
    outcome = MemberOutcome(member=member.id, group=member.group)
    timeline = Timeline(member.group, member.id)
    outcome.steps = timeline.steps
    namespace, agent = (isolated.namespace, isolated.agent) if isolated else (None, None)
    try:
        with ctx.connect(member.target) as target:
            with timeline.step("copy root", f"{member.target.name}:{member.root}"):
                claim_copy_root(target, ctx.ledger, member=member.id, root=member.root)
            for disk in member.disks:
                cancel.check()
                point, path = points[disk], member.disk_path(disk)
                with timeline.step(f"restore {disk}", f"{point.key} -> {member.target.name}:{path}") as step:
                    record_path(target, ctx.ledger, member=member.id, root=member.root, path=path)
                    result = restore_on(ctx.repo, point, target, path)
                    step.detail += f" ({result.blocks_written}/{result.blocks} blocks written, {result.seconds:.1f} s)"
                outcome.points.append(PointUsed(member=member.id, host=member.primary.name, disk=disk,
                                                point_id=point.key, taken_at=point.time,
                                                consistency=point.consistency, bytes_written=result.bytes_written,
                                                restore_seconds=result.seconds))
            cancel.check()
            run_actions(ctx, member, member.spec.pre_actions, target, namespace, timeline, "pre")
            spec = _control_spec(member)
            if spec is not None:
                cancel.check()
                app = member.spec.app
                assert app is not None
                with timeline.step("start", f"{app.preset}: {app.template}"):
                    copy = CopyContext(member=member.id, root=member.root, name=app.name or "", port=app.port,
                                       namespace=namespace, disks=member.restored)
                    started = start_copy(target, ctx.ledger, spec, copy, ready_wait=app.ready_wait_seconds,
                                         agent=agent)
                    problem = started.not_ready(app.port or 0, app.ready_wait_seconds)
                    if problem:
                        raise RuntimeError(problem)
            cancel.check()
            with timeline.step("probes") as step:
                wait = member.spec.app.ready_wait_seconds if member.spec.app else 0
                prefix = f"ip netns exec {shlex.quote(namespace)}" if namespace else ""
                outcome.probes = copy_probes(
                    member.id, member.target, target, member.spec.probes, prefix=prefix,
                    values=template_values(member, namespace), expected=_expected(ctx, member, points),
                    wait_seconds=wait, base_dir=ctx.base_dir, stopped=lambda: cancel.requested() is not None,
                    agent=agent)
                failed = [f"{p.probe}: {p.detail}" for p in outcome.probes if not p.ok]
                step.ok = not failed
                step.detail = "; ".join(failed) or f"{len(outcome.probes)} probe(s) passed"
            if failed:
                outcome.error = f"probes failed: {'; '.join(failed)}"
                return outcome
            run_actions(ctx, member, member.spec.post_actions, target, namespace, timeline, "post")
    except cancel.Interrupted as exc:
        outcome.error, outcome.cancelled = str(exc), True
    except Exception as exc:  # noqa: BLE001 - a member's failure is evidence; cleanup follows either way
        outcome.error = _member_error(member, exc)
    finally:
        if isolated is not None:
            isolated.close()  # its work is done; the copy it started runs on without it
    return outcome


def _expected(ctx: DrillContext, member: Member, points: dict[str, RecoveryPoint]):  # type: ignore[no-untyped-def]
    def digests(probe: ChecksumProbe) -> dict[str, str]:
        disk, pairs = checksum_paths(probe, member.restored)
        found = point_file_digests(ctx.repo, points[disk], [inside for inside, _ in pairs])
        return {on_target: found[inside] or "missing-from-point" for inside, on_target in pairs}
    return digests


@task(name="drill-failover-member", task_run_name="failover {member.id}", cache_policy=NO_CACHE)
def failover_member_task(ctx: DrillContext, member: Member, points: dict[str, RecoveryPoint],
                         isolated: Isolated | None = None) -> MemberOutcome:
    return failover_member(ctx, member, points, isolated)


# --------------------------------------------------------------------------- cleanup


def extra_cleanup(ctx: DrillContext, timeline: Timeline) -> list[str]:
    """The plan's own cleanup commands, on each target before the ledger's items go; returns
    the failures (a failed extra step makes the cleanup unverified)."""
    problems = []
    for member in ctx.members:
        for command in member.spec.cleanup:
            try:
                with timeline.step("cleanup command", f"{member.id}: {command}"), ctx.connect(member.target) as target:
                    target.run(_fill(command, template_values(member, None)), timeout=300, check=True)
            except (ConnectorError, OSError) as exc:
                problems.append(f"{member.id}: {command}: {exc}")
    return problems


@task(name="drill-cleanup", cache_policy=NO_CACHE)
def cleanup_step(ctx: DrillContext) -> CleanupReport:
    """Remove everything the ledger names, verify each item gone, close the ledger when all are."""
    return cleanup_run(ctx.store, ctx.run_id, ctx.connect_name)


def cleanup_items(report: CleanupReport) -> list[CleanupItem]:
    return [CleanupItem.model_validate(i.record()) for i in report.items]


# --------------------------------------------------------------------------- evidence


def write_evidence(store: BlobStore, evidence: DrillEvidence) -> str:
    key = evidence_key(evidence.plan, evidence.run_id)
    store.put(key, redact(evidence.model_dump_json(indent=2)).encode(), overwrite=True)
    return key


def read_evidence(store: BlobStore, plan: str | None = None) -> list[DrillEvidence]:
    """Every drill's evidence record (of one plan, when given), oldest first."""
    prefix = "evidence/drills/" + (f"{plan}/" if plan else "")
    found = [DrillEvidence.model_validate_json(store.get(info.key)) for info in store.list(prefix)
             if info.key.endswith(".json")]
    return sorted(found, key=lambda e: e.started)


def checksums(before: dict[tuple[str, str], str], after: dict[tuple[str, str], str] | None) -> list[Checksum]:
    return [Checksum(host=host, disk=disk, before=digest, after=(after or {}).get((host, disk)))
            for (host, disk), digest in sorted(before.items())]


def find_evidence(store: BlobStore, run_id: str) -> DrillEvidence | None:
    """The evidence record of one run, whatever its plan."""
    for info in store.list("evidence/drills/"):
        if info.key.endswith(f"/{run_id}.json"):
            return DrillEvidence.model_validate_json(store.get(info.key))
    return None


def record_cleanup(store: BlobStore, run_id: str, report: CleanupReport) -> DrillEvidence | None:
    """After `drill cleanup RUN`: the run's evidence gets the cleanup's proof, and a run that
    never finished (its controller died) is marked crashed, so its record tells the truth."""
    evidence = find_evidence(store, run_id)
    if evidence is None:
        return None
    evidence.cleanup = cleanup_items(report)
    evidence.cleanup_verified = report.ok
    evidence.notes.append(f"{utcnow().isoformat(timespec='seconds')}: `drill cleanup`: {report.summary()}")
    if evidence.outcome == "running":
        evidence.outcome, evidence.finished = "crashed", utcnow()
    write_evidence(store, evidence)
    return evidence
