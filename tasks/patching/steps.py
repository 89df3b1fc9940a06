"""The steps of a patch run as Prefect tasks, and the per-host work behind them.

Retries: connecting is retried by the connector itself (tenacity, backoff and jitter), so a
task is retried by Prefect only when a transient fault (a timeout, a dropped host) hit a
command; never for a refused login, a parse error or a failed install, which a retry cannot
fix. The reboot itself is never retried: asking twice could reboot a host twice. The survey
(enrollment and assessment together) is the exception in form, not in rule: one of its task
runs holds many hosts, so it retries a host's transient fault itself rather than have Prefect
re-survey every host of the task.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import structlog
from prefect import Task, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.client.schemas.objects import State, TaskRun
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel

from configs.loader import LoadedConfig, load_config
from configs.models import HostConfig
from configs.policies import PatchPolicy
from configs.secrets import SecretError, redact
from connectors import connect
from connectors.base import BootIdentity, Connector, ConnectorError
from connectors.stores import BlobStore, open_store
from tasks.patching import history, linux_host, maintenance_windows, windows_host
from tasks.patching.calendar import month_kind, next_baseline, reboot_allowed
from tasks.patching.health import check_health, failure_summary
from tasks.patching.linux_host import InstallResult
from tasks.patching.models import (
    ComplianceState,
    Enrollment,
    HostPatchRecord,
    MonthKind,
    Update,
    UpdateOutcome,
)
from tasks.patching.reboot_gate import RebootFailed, decide, reboot_and_wait
from tasks.patching.rollout import RolloutHost
from tasks.patching.selection import Decision, select
from tasks.rendering import markdown_text

log = structlog.stdlib.get_logger("patchdrill.patch")

REBOOT_LIMIT_PREFIX = "patchdrill-reboot-ud-"
HOST_LIMIT_PREFIX = "patchdrill-host-"
# How long a run waits for a host that another run is working on (refreshing its lists or
# patching it) before it gives the host up for this run.
HOST_SLOT_TIMEOUT_SECONDS = 3600.0
DEFAULT_POLICY = "default"


class RunSetupError(ValueError):
    """The run cannot start: the message names the config file, field or host at fault."""


# --------------------------------------------------------------------------- the run's inputs


@dataclass(frozen=True)
class PatchFleet:
    """The selected hosts, the policy they follow and where records go."""

    loaded: LoadedConfig
    hosts: list[HostConfig]
    policy: PatchPolicy
    policy_name: str

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir

    def store(self) -> BlobStore:
        return open_store(self.loaded.config.storage, self.base_dir)


def resolve_policy(loaded: LoadedConfig, name: str | None, groups: list[str] | None) -> tuple[str, PatchPolicy]:
    """The named policy, else the one named after the single selected group, else 'default',
    else the built-in defaults (the config loader has already validated every policy)."""
    policies = loaded.config.patch_policies
    if name is not None and name not in policies:
        known = ", ".join(sorted(policies)) or "none"
        raise RunSetupError(f"{loaded.path}: patch_policies: no policy named {name!r} (defined: {known})")
    if name is None:
        candidates = [*(groups if groups and len(groups) == 1 else []), DEFAULT_POLICY]
        name = next((c for c in candidates if c in policies), None)
    if name is None:
        return "built-in defaults", PatchPolicy()
    return name, policies[name]


def load_fleet(config_path: str, groups: list[str] | None, hosts: list[str] | None, policy: str | None) -> PatchFleet:
    loaded = load_config(Path(config_path))
    try:
        selected = loaded.config.select(groups, hosts)
    except KeyError as exc:
        raise RunSetupError(f"{config_path}: {exc.args[0]}") from None
    if not selected:
        raise RunSetupError(f"{config_path}: no host matches groups={groups or 'any'} hosts={hosts or 'any'}")
    name, resolved = resolve_policy(loaded, policy, groups)
    return PatchFleet(loaded=loaded, hosts=selected, policy=resolved, policy_name=name)


def only_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect retry condition: retry a task only when a transient connector fault failed it."""
    try:
        state.result()
    except ConnectorError as exc:
        return exc.transient
    except Exception:  # noqa: BLE001 - anything else is not worth retrying
        return False
    return False


def _error_text(exc: BaseException) -> str:
    """An error for a row or a record: the message without its type where the type says nothing."""
    if isinstance(exc, ConnectorError):
        return redact(exc.message)
    if isinstance(exc, (ValueError, SecretError, RebootFailed)):
        return redact(str(exc))
    return redact(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- enrollment


class EnrollmentRow(BaseModel):
    host: str
    os_family: str
    update_domain: int
    reachable: bool
    enrollment: Enrollment | None = None
    error: str = ""


def enroll_host(host: HostConfig, base_dir: Path, store: BlobStore | None) -> EnrollmentRow:
    """One host's enrollment; an unreachable or unreadable host is a row with its error."""
    row = EnrollmentRow(host=host.name, os_family=host.os_family, update_domain=host.update_domain, reachable=False)
    try:
        with connect(host, base_dir=base_dir) as conn:
            if host.os_family == "windows":
                enrollment = windows_host.enroll(conn, timezone_name=host.timezone)
            else:
                enrollment = linux_host.enroll(conn)
    except (ConnectorError, SecretError, ValueError, OSError) as exc:
        log.warning("enrollment failed", host=host.name, error=_error_text(exc))
        return row.model_copy(update={"error": _error_text(exc)})
    if store is not None:
        history.write_enrollment(store, enrollment)
    log.info("enrolled", host=host.name, os=enrollment.os_name, package_manager=enrollment.package_manager,
             hotpatch_eligible=enrollment.hotpatch_eligible)
    return row.model_copy(update={"reachable": True, "enrollment": enrollment})


@task(name="enroll-host", task_run_name="enroll {host.name}")
def enroll_task(host: HostConfig, base_dir: Path, config_path: str, record: bool) -> EnrollmentRow:
    store = open_store(load_config(config_path).config.storage, base_dir) if record else None
    try:
        return enroll_host(host, base_dir, store)
    finally:
        if store is not None:
            store.close()


# --------------------------------------------------------------------------- assessment


class HostAssessment(BaseModel):
    host: str
    ok: bool
    updates: list[Update] = []
    reboot_pending: bool = False
    error: str = ""


def failed_assessment(host: str, exc: BaseException) -> HostAssessment:
    log.warning("assessment failed", host=host, error=_error_text(exc))
    return HostAssessment(host=host, ok=False, error=_error_text(exc))


# --------------------------------------------------------------------------- survey: enroll + assess at once

# Transient faults of a survey's commands are retried here, per host, not by Prefect: a survey
# task holds many hosts and must not re-survey the healthy ones (one retry layer per fault).
SURVEY_RETRY_DELAYS = (2.0, 10.0)
# A package manager busy with another client (unattended-upgrades, an operator's apt-get) holds
# its lock for minutes, not seconds: waited out on a longer schedule (about 4 minutes in all).
LOCK_RETRY_DELAYS = (5.0, 15.0, 30.0, 60.0, 120.0)
# Task runs a survey is split into. Hosts run in threads inside each task, so more task runs
# add no speed, only API round trips (each costs the Prefect server and the run ~0.1 CPU-s);
# four keep a run's progress visible and fit every default task-runner pool.
SURVEY_TASKS = 4


class HostSurvey(BaseModel):
    """One host's enrollment row and, when it was reachable, its assessment."""

    enrolled: EnrollmentRow
    assessment: HostAssessment | None = None


def _survey_connected(host: HostConfig, conn: Connector, refresh: bool) -> tuple[Enrollment, HostAssessment]:
    if host.os_family == "windows":
        enrollment = windows_host.enroll(conn, timezone_name=host.timezone)
        try:
            updates, pending = windows_host.assess_with_reboot_state(conn)
        except (ConnectorError, ValueError) as exc:
            return enrollment, _assessment_error(host, exc)
        return enrollment, HostAssessment(host=host.name, ok=True, updates=updates, reboot_pending=pending)
    output = linux_host.survey_output(conn, refresh=refresh)
    enrollment = linux_host.survey_enrollment(conn, output)
    try:
        updates, pending = linux_host.survey_updates(conn, output, enrollment, refresh=refresh)
    except (ConnectorError, ValueError) as exc:
        return enrollment, _assessment_error(host, exc)
    return enrollment, HostAssessment(host=host.name, ok=True, updates=updates, reboot_pending=pending)


class _TransientAssessment(Exception):
    def __init__(self, cause: ConnectorError) -> None:
        super().__init__(cause.message)
        self.cause = cause


def _assessment_error(host: HostConfig, exc: Exception) -> HostAssessment:
    if isinstance(exc, ConnectorError) and exc.transient:
        raise _TransientAssessment(exc) from exc
    return failed_assessment(host.name, exc)


def survey_host(host: HostConfig, base_dir: Path, store: BlobStore | None, *, refresh: bool = True) -> HostSurvey:
    """Enroll and assess one host over one connection (one SSH session on an apt host).

    An unreachable host or unreadable facts make an unreachable row, as enrollment alone does;
    a failed assessment of a reachable host is its assessment's error. Changes nothing on the
    host but, with `refresh`, its package lists."""
    row = EnrollmentRow(host=host.name, os_family=host.os_family, update_domain=host.update_domain, reachable=False)
    attempt = 0
    while True:
        try:
            with connect(host, base_dir=base_dir) as conn:
                enrollment, assessment = _survey_connected(host, conn, refresh)
            break
        except _TransientAssessment as exc:
            delays = LOCK_RETRY_DELAYS if isinstance(exc.cause, linux_host.PackageManagerBusy) else SURVEY_RETRY_DELAYS
            if attempt >= len(delays):
                return HostSurvey(enrolled=row.model_copy(update={"reachable": True}),
                                  assessment=failed_assessment(host.name, exc.cause))
            log.warning("assessment retried", host=host.name, attempt=attempt + 1, error=_error_text(exc.cause))
            time.sleep(delays[attempt])
            attempt += 1
        except (ConnectorError, SecretError, ValueError, OSError) as exc:
            log.warning("enrollment failed", host=host.name, error=_error_text(exc))
            return HostSurvey(enrolled=row.model_copy(update={"error": _error_text(exc)}))
    if store is not None:
        history.write_enrollment(store, enrollment)
    log.info("enrolled", host=host.name, os=enrollment.os_name, package_manager=enrollment.package_manager,
             hotpatch_eligible=enrollment.hotpatch_eligible)
    if assessment.ok:
        log.info("assessed", host=host.name, missing=len(assessment.updates), reboot_pending=assessment.reboot_pending)
    return HostSurvey(enrolled=row.model_copy(update={"reachable": True, "enrollment": enrollment}),
                      assessment=assessment)


@task(name="survey-hosts", task_run_name="survey {hosts[0].name}… ({count} host(s))")
def survey_task(hosts: list[HostConfig], base_dir: Path, config_path: str, record: bool, refresh: bool,
                parallel: int, count: int) -> list[HostSurvey]:
    """Enroll and assess these hosts, `parallel` at a time; every host is a result, never a raise.

    Refreshing package lists changes a host, so a refreshing survey holds its hosts' slots: it
    waits while another run works on any of them.
    """
    store = open_store(load_config(config_path).config.storage, base_dir) if record else None
    try:
        with host_slots([h.name for h in hosts], HOST_SLOT_TIMEOUT_SECONDS) if refresh else nullcontext():
            with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts))),
                                    thread_name_prefix="survey") as pool:
                return list(pool.map(lambda h: survey_host(h, base_dir, store, refresh=refresh), hosts))
    except TimeoutError:
        return [HostSurvey(enrolled=EnrollmentRow(host=h.name, os_family=h.os_family, update_domain=h.update_domain,
                                                  reachable=True),
                           assessment=HostAssessment(host=h.name, ok=False, error=host_busy(h.name))) for h in hosts]
    finally:
        if store is not None:
            store.close()


def survey_batches(hosts: list[HostConfig], forks: int) -> list[tuple[list[HostConfig], int]]:
    """Split the hosts over at most SURVEY_TASKS task runs, with threads per run so that `forks`
    hosts are surveyed at once in all (the same meaning as Ansible's forks)."""
    if forks < 1:
        raise ValueError(f"forks must be at least 1, got {forks}")
    tasks = max(1, min(SURVEY_TASKS, len(hosts), forks))
    # Threads add up to exactly `forks`, never more: the first forks % tasks runs get one extra.
    threads = [forks // tasks + (1 if i < forks % tasks else 0) for i in range(tasks)]
    return [(hosts[i::tasks], threads[i]) for i in range(tasks) if hosts[i::tasks]]


# --------------------------------------------------------------------------- selection and plan


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
    window = maintenance_windows.describe(host, now)
    open_now = maintenance_windows.is_open(host, now)
    return HostPlan(
        host=host.name, update_domain=host.update_domain, month_kind=kind, install=chosen, held=held,
        reboot_pending=assessment.reboot_pending, reboot_allowed_by_calendar=calendar_ok, expects_reboot=expects,
        in_window=open_now or ignore_windows,
        window=window if open_now or not ignore_windows else f"{window}; installing anyway (window override)",
    )


def rollout_host(plan: HostPlan) -> RolloutHost:
    return RolloutHost(name=plan.host, update_domain=plan.update_domain, in_window=plan.in_window,
                       window=plan.window, expects_reboot=plan.expects_reboot)


# --------------------------------------------------------------------------- one host's patching


@dataclass(frozen=True)
class PatchContext:
    """What every host of a run shares."""

    run_id: str
    config_path: str
    base_dir: Path
    policy: PatchPolicy
    reboot_outside_window: bool
    host_slot_timeout_seconds: float = HOST_SLOT_TIMEOUT_SECONDS


def _run_hooks(conn: Connector, commands: list[str], timeout: float, stage: str) -> str | None:
    """None when every hook passed; otherwise why the first one failed."""
    for command in commands:
        result = conn.run(command, timeout=timeout)
        if not result.ok:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
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
      retry_condition_fn=only_transient)
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
    window_ok = ctx.reboot_outside_window or maintenance_windows.is_open(host, datetime.now(timezone.utc))
    decision = decide(ctx.policy.reboot, pending=pending, calendar_allows=plan.reboot_allowed_by_calendar,
                      window_allows=window_ok)
    if not decision.reboot:
        log.info("reboot not needed" if not decision.deferred else "reboot held back", host=host.name, reason=decision.reason)
        return GateResult(rebooted=False, reason=decision.reason, still_pending=pending)
    store = open_store(load_config(ctx.config_path).config.storage, ctx.base_dir)
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
        log.error("reboot failed", host=host.name, error=_error_text(exc))
        return GateResult(rebooted=False, reason=decision.reason, error=_error_text(exc), still_pending=pending,
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
        results = check_health(host, conn, policy.health_probes)
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
        log.error("patching failed", host=host.name, error=_error_text(exc))
        record = record.model_copy(update={"status": "failed", "reason": _error_text(exc)})
    record = record.model_copy(update={"finished_at": datetime.now(timezone.utc)})
    store = open_store(load_config(ctx.config_path).config.storage, ctx.base_dir)
    try:
        history.write_record(store, record)
    finally:
        store.close()
    return record


def _patch_host(host: HostConfig, ctx: PatchContext, enrollment: Enrollment, plan: HostPlan,
                record: HostPatchRecord) -> HostPatchRecord:
    policy = ctx.policy
    if policy.pre_hooks:
        with connect(host, base_dir=ctx.base_dir) as conn:
            refused = _run_hooks(conn, policy.pre_hooks, policy.hook_timeout_seconds, "pre")
        if refused:
            return record.model_copy(update={"status": "skipped", "reason": refused,
                                             "updates": unpatched_updates(plan, refused)})
    installed = install_task(host, ctx.base_dir, enrollment, plan.install, policy.max_duration_minutes * 60.0)
    outcomes = list(installed.outcomes)
    gate = reboot_gate_task(host, ctx, enrollment, plan, installed.reboot_required or plan.reboot_pending,
                            record.model_copy(update={"updates": [*plan.held, *outcomes]}))
    outcomes = _after_reboot(outcomes, gate.still_pending) if gate.rebooted else outcomes
    problems = [f"{o.update_id}: {o.reason}" for o in outcomes if o.state is ComplianceState.FAILED]
    if gate.error:
        problems.append(f"reboot: {gate.error}")
    unhealthy = health_task(host, ctx.base_dir, policy)
    if unhealthy:
        problems.append(f"health: {unhealthy}")
    if policy.post_hooks and not gate.error:
        with connect(host, base_dir=ctx.base_dir) as conn:
            post = _run_hooks(conn, policy.post_hooks, policy.hook_timeout_seconds, "post")
        if post:
            problems.append(post)
    reason = "; ".join(problems) if problems else gate.reason
    return record.model_copy(update={
        "status": "failed" if problems else "succeeded", "reason": reason, "rebooted": gate.rebooted,
        "boot_id_before": gate.boot_id_before, "boot_id_after": gate.boot_id_after,
        "updates": [*plan.held, *outcomes],
    })


# --------------------------------------------------------------------------- concurrency slots


def reboot_limit_name(update_domain: int) -> str:
    return f"{REBOOT_LIMIT_PREFIX}{update_domain}"


def host_limit_name(host: str) -> str:
    return f"{HOST_LIMIT_PREFIX}{host}"


def host_busy(host: str) -> str:
    return (f"host {host} is being worked on by another run "
            f"(concurrency limit {host_limit_name(host)} stayed busy)")


@contextmanager
def _exclusive(names: list[str], timeout_seconds: float) -> Iterator[None]:
    """Hold the one slot of each of these Prefect global concurrency limits, all at once (the
    server grants all or none, so two holders never deadlock), shared by every worker of the
    server; TimeoutError when they stay busy. Each limit is (re)set to 1 first: a missing limit
    would let Prefect grant every request."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except ObjectAlreadyExists:
                    pass  # another run created it between the read and the create: it has one slot too
                continue
            if limit.limit != 1:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1))
            if limit.active_slots:
                log.info("waiting for a concurrency slot", limit=name, reason="another run holds it")
    with concurrency(names, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


def update_domain_slot(update_domain: int, timeout_seconds: float) -> AbstractContextManager[None]:
    """Hold the update domain's one slot while its batch installs and reboots.

    The slot spans the whole batch, not each reboot: hosts of one batch reboot together by
    design, and what must never happen is a second run rebooting the same domain meanwhile.
    """
    return _exclusive([reboot_limit_name(update_domain)], timeout_seconds)


def host_slots(hosts: list[str], timeout_seconds: float) -> AbstractContextManager[None]:
    """Hold the hosts' slots while a run changes them (refreshes their package lists, patches
    them): two runs never work on one host at once, whatever update domain their configs give
    it. A survey takes its hosts' slots together: one acquisition per task run, not per host,
    costs the server and the run a fraction of the CPU."""
    return _exclusive([host_limit_name(host) for host in hosts], timeout_seconds)


__all__ = [
    "EnrollmentRow", "GateResult", "HostAssessment", "HostPlan", "HostSurvey", "PatchContext", "PatchFleet",
    "HOST_LIMIT_PREFIX", "REBOOT_LIMIT_PREFIX", "SURVEY_TASKS",
    "RunSetupError", "enroll_task", "failed_assessment", "load_fleet", "only_transient",
    "host_limit_name", "host_slots", "patch_host_task", "plan_host", "reboot_limit_name", "resolve_policy", "rollout_host", "survey_batches",
    "survey_host", "survey_task", "update_domain_slot",
]


# --------------------------------------------------------------------------- records and reports


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


@task(name="record-history", task_run_name="record {count} host(s)")
def write_records_task(config_path: str, base_dir: Path, records: list[HostPatchRecord], count: int) -> list[str]:
    store = open_store(load_config(config_path).config.storage, base_dir)
    try:
        written = [history.write_record(store, record) for record in records]
        # The store keeps 30 days of history (docs/repository.md); each run trims what aged out.
        for key in history.prune(store):
            log.info("history record expired", key=key)
        return written
    finally:
        store.close()


def compliance_rows(records: list[HostPatchRecord]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for record in sorted(records, key=lambda r: r.host):
        base = {"host": record.host, "status": record.status, "rebooted": "yes" if record.rebooted else "no"}
        if not record.updates:
            rows.append({**base, "update": "", "classification": "", "state": "", "reason": redact(record.reason)})
        for outcome in record.updates:
            rows.append({**base, "update": outcome.update_id, "classification": outcome.classification.value,
                         "state": outcome.state.value, "reason": redact(outcome.reason)})
    return rows


def summary_markdown(title: str, records: list[HostPatchRecord], *, plan_text: str, stopped: str | None) -> str:
    by_status: dict[str, int] = {}
    for record in records:
        by_status[record.status] = by_status.get(record.status, 0) + 1
    lines = [f"# {markdown_text(title)}", "", ", ".join(f"**{count}** {status}" for status, count in sorted(by_status.items())), ""]
    if stopped:
        lines += [f"**Rollout stopped:** {markdown_text(stopped)}", ""]
    lines += ["| host | status | rebooted | installed | pending reboot | missing | failed | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r.host):
        counts = [r.count(s) for s in (ComplianceState.INSTALLED, ComplianceState.INSTALLED_PENDING_REBOOT,
                                       ComplianceState.MISSING, ComplianceState.FAILED)]
        lines.append(f"| {markdown_text(r.host)} | {r.status} | {'yes' if r.rebooted else 'no'} | "
                     + " | ".join(str(c) for c in counts) + f" | {markdown_text(r.reason)} |")
    lines += ["", "## Plan", "", "```", plan_text, "```"]
    return redact("\n".join(lines))
