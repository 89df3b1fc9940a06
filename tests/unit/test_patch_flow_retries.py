"""Patch tasks are retried by Prefect only for transient connector faults (on a real Prefect
test server): a timeout is retried, a refused login or a bad report is not. Both pipelines
share the condition, and the survey retries a host itself on its own two schedules."""

from __future__ import annotations

import pytest
from prefect import flow, task

from connectors.base import AuthenticationFailed, HostTimeout, HostUnreachable
from tasks.patching import survey
from tasks.patching.linux_host import PackageManagerBusy
from tasks.retry import retry_transient


def _run_with(errors: list[Exception]) -> tuple[int, object]:
    calls: list[int] = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    @flow
    def run() -> object:
        try:
            return flaky()
        except Exception as exc:  # noqa: BLE001 - the test looks at what came out
            return exc

    outcome = run()
    return len(calls), outcome


def test_transient_faults_are_retried(prefect_server: None) -> None:
    calls, outcome = _run_with([HostTimeout("h1", "slow"), HostUnreachable("h1", "refused")])
    assert (calls, outcome) == (3, "done")


@pytest.mark.parametrize("error", [AuthenticationFailed("h1", "user 'ops' was refused"), ValueError("bad report")])
def test_permanent_faults_fail_at_once(prefect_server: None, error: Exception) -> None:
    calls, outcome = _run_with([error])
    assert calls == 1
    assert type(outcome) is type(error) and str(outcome) == str(error)


def test_both_pipelines_retry_on_the_one_condition() -> None:
    from tasks.backup.steps import backup_disk_task
    from tasks.patching.install import install_task

    assert install_task.retry_condition_fn is retry_transient
    assert backup_disk_task.retry_condition_fn is retry_transient


def _survey_sleeps(faults: list[Exception]) -> tuple[list[float], BaseException | None]:
    """Run the survey's retry schedule over these faults of successive attempts. The waits are
    recorded instead of slept: the schedule, not the clock, is under test."""
    slept: list[float] = []
    attempts = iter(faults)

    def attempt() -> str:
        fault = next(attempts, None)
        if fault is None:
            return "surveyed"
        raise survey.TransientAssessment(fault)

    try:
        assert survey.survey_retrying("h1").copy(sleep=slept.append)(attempt) == "surveyed"
    except survey.TransientAssessment as exc:
        return slept, exc.cause
    return slept, None


def test_a_transient_survey_fault_is_retried_on_the_short_schedule_then_given_up() -> None:
    timeouts = [HostTimeout("h1", f"slow {n}") for n in range(len(survey.SURVEY_RETRY_DELAYS) + 1)]
    assert _survey_sleeps(timeouts[:-1]) == (list(survey.SURVEY_RETRY_DELAYS), None)
    assert _survey_sleeps(timeouts) == (list(survey.SURVEY_RETRY_DELAYS), timeouts[-1])


def test_a_busy_package_manager_is_waited_out_on_the_long_schedule() -> None:
    busy = [PackageManagerBusy("h1", "apt-get update", 100, "Could not get lock") for _ in survey.LOCK_RETRY_DELAYS]
    assert _survey_sleeps(busy) == (list(survey.LOCK_RETRY_DELAYS), None)
    gave_up = _survey_sleeps([*busy, busy[0]])
    assert gave_up == (list(survey.LOCK_RETRY_DELAYS), busy[0])


def test_survey_attempts_count_across_both_kinds_of_fault() -> None:
    # A lock first, then timeouts: the second attempt is already past the short schedule's first delay.
    faults = [PackageManagerBusy("h1", "apt-get update", 100, "lock"), HostTimeout("h1", "slow"), HostTimeout("h1", "slow")]
    assert _survey_sleeps(faults) == ([survey.LOCK_RETRY_DELAYS[0], survey.SURVEY_RETRY_DELAYS[1]], faults[-1])
