"""Enrollment and assessment of hosts (the survey), as Prefect tasks and the per-host work behind them.

A survey task run holds many hosts, so it retries a host's transient fault itself (tenacity)
rather than have Prefect re-survey every host of the task.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import structlog
from prefect import task
from pydantic import BaseModel
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from configs.models import HostConfig
from configs.secrets import SecretError
from connectors import connect
from connectors.base import Connector, ConnectorError
from connectors.stores import BlobStore
from tasks.patching import history, linux_host, windows_host
from tasks.patching.errors import error_text
from tasks.patching.fleet import RecordStore
from tasks.patching.models import Enrollment
from tasks.patching.plan.host import HostAssessment
from tasks.patching.slots import HOST_SLOT_TIMEOUT_SECONDS, host_busy, host_slots
from tasks.retry import is_transient

log = structlog.stdlib.get_logger("patchdrill.patch")


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
        log.warning("enrollment failed", host=host.name, error=error_text(exc))
        return row.model_copy(update={"error": error_text(exc)})
    if store is not None:
        history.write_enrollment(store, enrollment)
    log.info("enrolled", host=host.name, os=enrollment.os_name, package_manager=enrollment.package_manager,
             hotpatch_eligible=enrollment.hotpatch_eligible)
    return row.model_copy(update={"reachable": True, "enrollment": enrollment})


@task(name="enroll-host", task_run_name="enroll {host.name}")
def enroll_task(host: HostConfig, base_dir: Path, records: RecordStore | None) -> EnrollmentRow:
    """Enroll one host; with `records`, store its enrollment there."""
    store = records.open() if records is not None else None
    try:
        return enroll_host(host, base_dir, store)
    finally:
        if store is not None:
            store.close()


def failed_assessment(host: str, exc: BaseException) -> HostAssessment:
    log.warning("assessment failed", host=host, error=error_text(exc))
    return HostAssessment(host=host, ok=False, error=error_text(exc))


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


class TransientAssessment(Exception):
    def __init__(self, cause: ConnectorError) -> None:
        super().__init__(cause.message)
        self.cause = cause


def _assessment_error(host: HostConfig, exc: Exception) -> HostAssessment:
    if isinstance(exc, ConnectorError) and is_transient(exc):
        raise TransientAssessment(exc) from exc
    return failed_assessment(host.name, exc)


def _survey_once(host: HostConfig, base_dir: Path, refresh: bool) -> tuple[Enrollment, HostAssessment]:
    with connect(host, base_dir=base_dir) as conn:
        return _survey_connected(host, conn, refresh)


def _transient_cause(state: RetryCallState) -> ConnectorError:
    error = state.outcome.exception() if state.outcome is not None else None
    assert isinstance(error, TransientAssessment)  # the only exception `retry` lets through
    return error.cause


def _delays(state: RetryCallState) -> tuple[float, ...]:
    """The schedule of the fault at hand; attempts count across faults of either kind."""
    busy = isinstance(_transient_cause(state), linux_host.PackageManagerBusy)
    return LOCK_RETRY_DELAYS if busy else SURVEY_RETRY_DELAYS


def _out_of_delays(state: RetryCallState) -> bool:
    return state.attempt_number > len(_delays(state))


def _next_delay(state: RetryCallState) -> float:
    # tenacity asks for the wait before it asks whether to stop: past the schedule's end the
    # wait is never slept, so any value does.
    delays = _delays(state)
    return delays[min(state.attempt_number, len(delays)) - 1]


def survey_retrying(host_name: str) -> Retrying:
    """Retry a host's survey while a transient fault fails its assessment: on the package-lock
    schedule while the package manager is busy, else on the short one; attempts count across
    faults of either kind, and the last fault is raised when the schedule runs out."""

    def log_retry(state: RetryCallState) -> None:
        log.warning("assessment retried", host=host_name, attempt=state.attempt_number,
                    error=error_text(_transient_cause(state)))

    return Retrying(retry=retry_if_exception_type(TransientAssessment), stop=_out_of_delays, wait=_next_delay,
                    before_sleep=log_retry, reraise=True)


def survey_host(host: HostConfig, base_dir: Path, store: BlobStore | None, *, refresh: bool = True) -> HostSurvey:
    """Enroll and assess one host over one connection (one SSH session on an apt host).

    An unreachable host or unreadable facts make an unreachable row, as enrollment alone does;
    a failed assessment of a reachable host is its assessment's error. Changes nothing on the
    host but, with `refresh`, its package lists."""
    row = EnrollmentRow(host=host.name, os_family=host.os_family, update_domain=host.update_domain, reachable=False)
    try:
        enrollment, assessment = survey_retrying(host.name)(_survey_once, host, base_dir, refresh)
    except TransientAssessment as exc:
        return HostSurvey(enrolled=row.model_copy(update={"reachable": True}),
                          assessment=failed_assessment(host.name, exc.cause))
    except (ConnectorError, SecretError, ValueError, OSError) as exc:
        log.warning("enrollment failed", host=host.name, error=error_text(exc))
        return HostSurvey(enrolled=row.model_copy(update={"error": error_text(exc)}))
    if store is not None:
        history.write_enrollment(store, enrollment)
    log.info("enrolled", host=host.name, os=enrollment.os_name, package_manager=enrollment.package_manager,
             hotpatch_eligible=enrollment.hotpatch_eligible)
    if assessment.ok:
        log.info("assessed", host=host.name, missing=len(assessment.updates), reboot_pending=assessment.reboot_pending)
    return HostSurvey(enrolled=row.model_copy(update={"reachable": True, "enrollment": enrollment}),
                      assessment=assessment)


@task(name="survey-hosts", task_run_name="survey {hosts[0].name}… ({count} host(s))")
def survey_task(hosts: list[HostConfig], base_dir: Path, records: RecordStore | None, refresh: bool,
                parallel: int, count: int) -> list[HostSurvey]:
    """Enroll and assess these hosts, `parallel` at a time; every host is a result, never a raise.
    With `records`, each enrollment is stored there.

    Refreshing package lists changes a host, so a refreshing survey holds its hosts' slots: it
    waits while another run works on any of them.
    """
    store = records.open() if records is not None else None
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
