"""The `alerts:` section of a config: the webhook that failed runs, missed RTO/RPO targets and
stale recovery points are posted to (Prefect events are emitted whether or not one is set).

The URL of a Slack or Teams incoming webhook is itself the credential (whoever holds it can
post to the channel), so the config holds a reference to it, never the URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from configs.errors import field_error
from configs.secrets import REFERENCES_FROM, SecretError, check_reference, is_loopback, parse_reference, resolve


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="Reference (env:NAME, file:PATH or prefect-secret:BLOCK) to the webhook's URL, "
                                 "e.g. a Slack or Teams incoming webhook. Never the URL itself: it is the credential.")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120,
                                   description="Seconds a post waits to connect, to send and for the answer.")
    attempts: int = Field(default=3, ge=1, le=10,
                          description="Posts tried before giving up (unreachable, timeouts, 429 and 5xx answers are "
                                      "retried with backoff and jitter); a post that still fails is logged as a "
                                      "warning and never changes the run's outcome.")
    allow_insecure_transport: bool = Field(
        default=False, description="Permit a plain http:// URL on another machine (labs only). Off by default: the "
                                   "URL's token would cross the network readable. Loopback URLs need no flag.")

    @field_validator("url")
    @classmethod
    def _reference_only(cls, value: str) -> str:
        return check_reference(value, "url") or value

    @model_validator(mode="after")
    def _usable_url(self, info: ValidationInfo) -> "WebhookConfig":
        # Checked when the loader passes the config's directory (config check, every run); a
        # Prefect Secret needs the API, so that one is checked when an alert is posted.
        if not isinstance(info.context, dict) or REFERENCES_FROM not in info.context:
            return self
        if parse_reference(self.url)[0] == "prefect-secret":
            return self
        try:
            url = resolve(self.url, base_dir=info.context[REFERENCES_FROM])
        except SecretError:
            # Not a fault of the file: the variable may be set only where runs happen (a worker),
            # and a missing one must not fail the run; posting an alert names it in a warning.
            return self
        problem = self.url_problem(url)
        if problem:
            raise field_error("url", "invalid_url", problem)
        return self

    def url_problem(self, url: str) -> str | None:
        """Why a resolved URL cannot be posted to, or None. Never repeats the URL."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            return "the webhook URL it names is not a URL"
        if parts.scheme not in ("https", "http") or not host:
            return "the webhook URL it names must be an http(s) URL such as https://hooks.slack.com/services/..."
        if parts.scheme == "http" and not self.allow_insecure_transport and not is_loopback(host):
            return ("the webhook URL it names is plain http, which would send its token readable: use https, or set "
                    "allow_insecure_transport: true for a lab")
        return None


class AlertsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: WebhookConfig | None = Field(
        default=None, description="Post each alert here as JSON: a `text` field (what Slack and Teams show) plus "
                                  "the event's name, resource and payload.")
