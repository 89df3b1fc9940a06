"""Alerts: what went wrong, said twice — as a Prefect event users build their own automations on,
and as a post to the config's webhook (Slack/Teams-compatible JSON).

The events (their resource ids and payloads are listed in the README, *Alerts*):

- `patchdrill.run.failed`: a flow run ended Failed or Crashed (never when it was cancelled or
  stopped by Ctrl-C/SIGTERM); resource `patchdrill.run.<flow run id>`;
- `patchdrill.drill.rto-missed`, `patchdrill.drill.rpo-missed`: a drill measured an RTO or RPO
  above its plan's target; resource `patchdrill.plan.<plan>`;
- `patchdrill.backup.stale`: a disk's newest recovery point is older than its backup policy's
  `max_point_age`, or it has none; resource `patchdrill.disk.<host>/<disk>`.
- `patchdrill.patch.rollback-not-started`: a host failed its health probes after its patch and
  its policy's rollback was not started (too late for its window, or nobody approved it in
  time), so it is left as patched for a person; resource `patchdrill.host.<host>`.

Raising an alert never raises: a webhook that is down, a Prefect API that is away or a secret
that cannot be read costs a warning in the log, never the run's outcome or its original error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import structlog

from configs.alerts import AlertsConfig
from configs.secrets import SecretError, redact, resolve
from connectors.webhook import WebhookError, post_json

#: Its routine lines (raised, posted) go to the run's log only; on the console the command's own
#: outcome says what failed, and only a delivery problem (a warning) gets a line (flows/logs.py).
LOGGER_NAME = "patchdrill.alerts"
log = structlog.stdlib.get_logger(LOGGER_NAME)

RUN_FAILED = "patchdrill.run.failed"
RTO_MISSED = "patchdrill.drill.rto-missed"
RPO_MISSED = "patchdrill.drill.rpo-missed"
BACKUP_STALE = "patchdrill.backup.stale"
ROLLBACK_NOT_STARTED = "patchdrill.patch.rollback-not-started"
EVENTS = (RUN_FAILED, RTO_MISSED, RPO_MISSED, BACKUP_STALE, ROLLBACK_NOT_STARTED)


@dataclass(frozen=True)
class Alert:
    event: str
    resource: dict[str, str]
    payload: dict[str, Any]
    text: str
    related: list[dict[str, str]] = field(default_factory=list)

    def document(self, occurred: datetime) -> dict[str, Any]:
        """The webhook's JSON: `text` is what Slack and Teams show; the rest is for receivers
        that read fields (the same as the Prefect event's)."""
        return {"text": self.text, "event": self.event, "resource": self.resource, "payload": self.payload,
                "occurred": occurred.isoformat()}


def raise_alert(alert: Alert, settings: AlertsConfig | None, base_dir: Path | None) -> None:
    """Emit the alert's Prefect event and post it to the configured webhook, if any."""
    occurred = datetime.now(timezone.utc)
    log.info("alert.raised", alert=alert.event, resource=alert.resource["prefect.resource.id"], text=alert.text)
    _emit(alert, occurred)
    if settings is not None and settings.webhook is not None:
        _post(alert, occurred, settings, base_dir)


def _emit(alert: Alert, occurred: datetime) -> None:
    try:
        from prefect.events import emit_event

        emit_event(event=alert.event, resource=alert.resource, related=alert.related, payload=alert.payload,
                   occurred=occurred)
    except Exception as exc:  # noqa: BLE001 - an alert must never fail what it reports on
        log.warning("alert.event_not_emitted", alert=alert.event, error=f"{type(exc).__name__}: {redact(str(exc))}")


def _post(alert: Alert, occurred: datetime, settings: AlertsConfig, base_dir: Path | None) -> None:
    webhook = settings.webhook
    assert webhook is not None
    try:
        url = resolve(webhook.url, base_dir=base_dir)
        problem = webhook.url_problem(url)
        if problem:
            raise WebhookError(problem)
        post_json(url, alert.document(occurred), timeout=webhook.timeout_seconds, attempts=webhook.attempts)
    except (SecretError, WebhookError) as exc:
        log.warning("alert.webhook_failed", alert=alert.event, reference=webhook.url, error=redact(str(exc)))
    except Exception as exc:  # noqa: BLE001 - an alert must never fail what it reports on
        log.warning("alert.webhook_failed", alert=alert.event, reference=webhook.url,
                    error=f"{type(exc).__name__}: {redact(str(exc))}")
    else:
        log.info("alert.posted", alert=alert.event, reference=webhook.url)


# --------------------------------------------------------------------------- the alerts


def run_failed(flow_name: str, run_id: str, run_name: str, state_name: str, message: str | None,
               parameters: dict[str, Any], related: list[dict[str, str]]) -> Alert:
    """A flow run that ended Failed or Crashed."""
    said = redact(message or "no message")
    return Alert(
        event=RUN_FAILED,
        resource={"prefect.resource.id": f"patchdrill.run.{run_id}", "prefect.resource.name": run_name,
                  "patchdrill.flow": flow_name},
        payload={"flow": flow_name, "run_id": run_id, "run_name": run_name, "state": state_name, "message": said,
                 "parameters": parameters},
        text=f"patchdrill: {flow_name} run '{run_name}' {state_name.lower()}: {said}",
        related=related,
    )


def drill_objectives_missed(plan: str, run_id: str, outcome: str, measured: dict[str, float | None],
                            targets: dict[str, float], evidence_key: str) -> list[Alert]:
    """One alert per objective (rto, rpo) the drill measured above its target."""
    alerts = []
    for objective, event in (("rto", RTO_MISSED), ("rpo", RPO_MISSED)):
        value, target = measured[objective], targets[objective]
        if value is None or value <= target:
            continue
        alerts.append(Alert(
            event=event,
            resource={"prefect.resource.id": f"patchdrill.plan.{plan}", "prefect.resource.name": plan,
                      "patchdrill.plan": plan},
            payload={"plan": plan, "run_id": run_id, "outcome": outcome, "objective": objective,
                     "measured_seconds": round(value, 3), "target_seconds": target, "evidence": evidence_key},
            text=(f"patchdrill: drill of plan {plan} missed its {objective.upper()} target: "
                  f"{value:.1f} s measured, target {target:g} s (run {run_id}, drill {outcome})"),
        ))
    return alerts


def stale_point(host: str, disk: str, policy: str, newest: datetime | None, max_age: timedelta,
                now: datetime) -> Alert | None:
    """An alert when a disk's newest point is older than `max_age` (or it has none), else None."""
    age = None if newest is None else now - newest
    if age is not None and age <= max_age:
        return None
    said = "has no recovery point" if age is None else f"newest recovery point is {_hours(age)} old"
    return Alert(
        event=BACKUP_STALE,
        resource={"prefect.resource.id": f"patchdrill.disk.{host}/{disk}", "prefect.resource.name": f"{host}/{disk}",
                  "patchdrill.host": host, "patchdrill.disk": disk},
        payload={"host": host, "disk": disk, "policy": policy, "newest_point": newest.isoformat() if newest else None,
                 "age_seconds": None if age is None else round(age.total_seconds(), 1),
                 "max_age_seconds": max_age.total_seconds()},
        text=f"patchdrill: {host}/{disk} {said}; backup policy {policy} allows {_hours(max_age)}",
    )


def rollback_not_started(host: str, run_id: str, status: str, reason: str, points: list[str]) -> Alert:
    """A host left unhealthy and patched: its rollback was not started (too late, or unanswered)."""
    said = redact(reason)
    return Alert(
        event=ROLLBACK_NOT_STARTED,
        resource={"prefect.resource.id": f"patchdrill.host.{host}", "prefect.resource.name": host,
                  "patchdrill.host": host},
        payload={"host": host, "run_id": run_id, "status": status, "reason": said, "points": points},
        text=f"patchdrill: {host} failed its health probes after patching and was not rolled back: {said}",
    )


def _hours(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours:.1f} h" if hours >= 1 else f"{span.total_seconds():.0f} s"
