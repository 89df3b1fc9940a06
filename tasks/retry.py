"""The one retry condition of both pipelines: a fault is worth retrying only when it says it is
transient (a dropped or timed-out host, a store that was briefly unavailable); a refused login,
a parse error or a failed install is not, since a retry cannot fix it."""

from __future__ import annotations

from typing import Any


def is_transient(error: BaseException | None) -> bool:
    """ConnectorError and StoreError carry a `transient` flag; any other exception is permanent."""
    return bool(getattr(error, "transient", False))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition (`retry_condition_fn`): retry a task run only when the exception
    that failed it is transient."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception, inspected not handled
        return is_transient(exc)
    return False
