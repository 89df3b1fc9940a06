"""Patch tasks are retried by Prefect only for transient connector faults (on a real Prefect
test server): a timeout is retried, a refused login or a bad report is not."""

from __future__ import annotations

import pytest
from prefect import flow, task

from connectors.base import AuthenticationFailed, HostTimeout, HostUnreachable
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
