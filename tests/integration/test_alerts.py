"""The alert's parts against a real webhook receiver (tests/hosts/webhook.py) and the Prefect test
server: the `alerts:` config as `config check` reads it, the post's retries, and which ends of a
run the failure hook reports."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import TerminationSignal
from prefect.states import Crashed, Failed
from typer.testing import CliRunner

from cli.app import app
from connectors.webhook import WebhookError, post_json
from flows.alerting import alert_failed_run
from tests.alert_checks import alerts_section
from tests.hosts.webhook import WebhookReceiver


def write(tmp_path: Path, alerts: dict[str, Any], **rest: Any) -> Path:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": [], **rest,
                                   "alerts": alerts}, sort_keys=False))
    return cfg


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://hooks.example.com/x", "must be an http(s) URL"),
    ("not a url at all", "must be an http(s) URL"),
    ("http://hooks.example.com/services/T0/B0/x", "plain http, which would send its token readable"),
])
def test_config_check_names_the_line_of_a_webhook_url_it_cannot_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  url: str, why: str) -> None:
    monkeypatch.setenv("PATCHDRILL_TEST_WEBHOOK", url)
    cfg = write(tmp_path, alerts_section())
    result = CliRunner().invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {cfg}:7: alerts.webhook.url: the webhook URL it names ")
    assert why in result.output and url not in result.output and "Traceback" not in result.output


def test_config_check_refuses_a_literal_webhook_url_and_accepts_references(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    literal = "https://hooks.slack.com/services/T0/B0/secret-token"
    result = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, {"webhook": {"url": literal}}))])
    assert result.exit_code == 1 and "alerts.webhook.url: url must be a reference, not a literal" in result.output
    assert "secret-token" not in result.output
    # A loopback receiver may be plain http; a variable set only on the workers is no error here.
    monkeypatch.setenv("PATCHDRILL_TEST_WEBHOOK", "http://127.0.0.1:9/hooks/x")
    assert CliRunner().invoke(app, ["config", "check", str(write(tmp_path, alerts_section()))]).exit_code == 0
    unset = {"webhook": {"url": "env:PATCHDRILL_UNSET_WEBHOOK"}}
    assert CliRunner().invoke(app, ["config", "check", str(write(tmp_path, unset))]).exit_code == 0


def test_freshness_refuses_a_policy_without_max_point_age_in_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, {}, backup_policies={"nightly": {"keep_last": 3}})
    result = CliRunner().invoke(app, ["freshness", "-c", str(cfg), "--policy", "nightly"])
    assert result.exit_code == 1
    assert result.output == f"error: {cfg}: backup policy nightly sets no max_point_age: nothing to check against\n"


def test_a_post_is_retried_after_a_server_error_but_not_after_a_refusal(webhook: WebhookReceiver) -> None:
    webhook.fail_next(503, 502)
    assert post_json(webhook.url, {"text": "hello"}, timeout=5, attempts=3, max_wait=0.1) == 200
    assert webhook.received() == [{"text": "hello"}]
    webhook.fail_next(400)
    with pytest.raises(WebhookError, match="^answered HTTP 400$"):
        post_json(webhook.url, {"text": "again"}, timeout=5, attempts=3, max_wait=0.1)
    # One attempt only: the second post of the document would have been accepted.
    assert webhook.received() == [{"text": "hello"}]


@flow(name="alerts-probe")
def _probe(config_path: str) -> None:
    """A flow object for the hook to name; never run."""


def _flow_run(cfg: Path) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="probe run", parameters={"config_path": str(cfg)})


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), TerminationSignal(15), SystemExit(130)],
                         ids=["ctrl-c", "sigterm", "exit"])
def test_a_run_an_operator_stopped_is_not_alerted_as_failed(prefect_server: None, tmp_path: Path,
                                                             webhook: WebhookReceiver, stop: BaseException) -> None:
    cfg = write(tmp_path, alerts_section())
    alert_failed_run(_probe, _flow_run(cfg), Crashed(message="Execution was aborted by an interrupt signal.", data=stop))
    # The same hook on a real crash and a failure posts each: the silence above is the stop's.
    alert_failed_run(_probe, _flow_run(cfg), Crashed(message="worker lost", data=RuntimeError("lost")))
    alert_failed_run(_probe, _flow_run(cfg), Failed(message="2 host(s) not patched"))
    assert [(p["payload"]["state"], p["payload"]["message"]) for p in webhook.received()] == [
        ("Crashed", "worker lost"), ("Failed", "2 host(s) not patched")]
