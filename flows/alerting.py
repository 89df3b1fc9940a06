"""The hooks every flow declares (`@flow(on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)`):
a run that ends Failed or Crashed raises a `patchdrill.run.failed` alert (tasks/alerts.py).

Hooks, not a server-side automation: they run in the flow's own process, so an ad-hoc
`patchdrill …` with no Prefect server alerts exactly as a deployment's run on a worker does, and
the webhook's URL stays in the config's secret reference instead of a block on the server.
Cancelled runs call no failure hook; a crash that is an operator's Ctrl-C or SIGTERM is not
alerted either.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
from prefect import Flow
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import TerminationSignal
from prefect.states import State

from configs.alerts import AlertsConfig
from configs.loader import ConfigError, load_alerts
from configs.secrets import redact
from tasks.alerts import LOGGER_NAME as ALERTS_LOGGER, raise_alert, run_failed

log = structlog.stdlib.get_logger(ALERTS_LOGGER)

# What a crash carries when a person or the runtime stopped the run: not a failure to report.
_STOPPED = (KeyboardInterrupt, SystemExit, TerminationSignal, asyncio.CancelledError)


def alert_failed_run(flow: Flow[Any, Any], flow_run: FlowRun, state: State) -> None:
    """Raise `patchdrill.run.failed` for a run that ended Failed or Crashed."""
    if state.is_crashed() and isinstance(state.data, _STOPPED):
        return
    try:
        _alert(flow, flow_run, state)
    except Exception as exc:  # noqa: BLE001 - an alert must never fail what it reports on
        log.warning("alert.not_raised", run=str(flow_run.id), error=f"{type(exc).__name__}: {redact(str(exc))}")


def _alert(flow: Flow[Any, Any], flow_run: FlowRun, state: State) -> None:
    settings, base_dir = alert_settings(flow_run.parameters.get("config_path"))
    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
                "prefect.resource.name": flow_run.name},
               {"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow.name}]
    if flow_run.deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                        "prefect.resource.role": "deployment"})
    raise_alert(run_failed(flow.name, str(flow_run.id), flow_run.name, state.name or state.type.value, state.message,
                           _plain(flow_run.parameters), related), settings, base_dir)


def alert_settings(config_path: Any) -> tuple[AlertsConfig | None, Path | None]:
    """The `alerts:` section of the run's config, read on its own: a run that failed because the
    rest of the file is wrong still reaches the webhook. None (events only) when unreadable."""
    if not isinstance(config_path, str) or not config_path:
        return None, None
    # Info, not a warning: a file that cannot be read failed the run itself with the same
    # error, which the run's state (and the command's error line) already says.
    try:
        return load_alerts(config_path), Path(config_path).resolve().parent
    except ConfigError as exc:
        log.info("alert.config_unreadable", config=config_path, error=redact(str(exc)))
    except Exception as exc:  # noqa: BLE001 - an alert must never fail what it reports on
        log.info("alert.config_unreadable", config=config_path, error=f"{type(exc).__name__}: {redact(str(exc))}")
    return None, None


def _plain(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON values (a flow's parameters may hold models); they never hold secrets,
    which are references in the config, but each string passes redaction anyway."""
    import json

    return json.loads(redact(json.dumps(parameters, default=str)))


ALERT_ON_FAILURE = [alert_failed_run]
ALERT_ON_CRASH = [alert_failed_run]
