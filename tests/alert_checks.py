"""What the alert tests check on the Prefect server: the events read back through the API's
events filter, and that a webhook's token reached none of a run's parameters, logs or artifacts."""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

WEBHOOK_ENV = "PATCHDRILL_TEST_WEBHOOK"


def alerts_section(url: str = f"env:{WEBHOOK_ENV}", attempts: int = 2) -> dict[str, Any]:
    """A config's `alerts:` with the test receiver's URL behind a reference."""
    return {"webhook": {"url": url, "attempts": attempts, "timeout_seconds": 5}}


def events(name: str, resource_id: str, deadline: float = 60.0) -> list[Any]:
    """The events of this name about this resource the Prefect API holds, once there is one
    (events reach the API through a background worker; the deadline only guards against a hang)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]))
    end = time.monotonic() + deadline
    while True:
        with get_client(sync_client=True) as client:
            found = client.read_events(filter=wanted, limit=50).events
        if found or time.monotonic() > end:
            return found
        time.sleep(0.2)


def run_record(run_id: str, logged: str, deadline: float = 60.0) -> dict[str, str]:
    """A flow run's parameters, logs and artifacts as the Prefect API serves them, as text, once
    its logs hold `logged` (logs reach the API in batches: an absence is only worth checking
    once the lines that could have held it are there)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    end = time.monotonic() + deadline
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
            text = "\n".join(log.message for log in logs)
            if logged in text or time.monotonic() > end:
                break
            time.sleep(0.2)
        run = client.read_flow_run(UUID(run_id))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)])))
    assert logged in text, f"the run's logs never showed {logged!r}:\n{text}"
    return {"parameters": json.dumps(run.parameters), "logs": text,
            "artifacts": "\n".join(json.dumps(a.data) + (a.description or "") for a in artifacts)}
