"""Post a JSON document to a webhook (Slack, Teams or any HTTP receiver), with bounded retries.

A transport only: it knows nothing of what the document says. The URL is a credential (an
incoming webhook's token is in its path), so no message this module makes contains it.
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

# A receiver that is down or overloaded may answer soon; one that refuses the document will not.
_RETRIED_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookError(Exception):
    """A post that did not get a 2xx answer after every attempt; the message names the fault
    (an HTTP status or the kind of network error), never the URL."""


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code in _RETRIED_STATUS
    return isinstance(error, httpx.TransportError)


def post_json(url: str, document: dict[str, Any], *, timeout: float, attempts: int,
              max_wait: float = 8.0) -> int:
    """POST `document` as JSON; the answer's status code. Raises WebhookError once every attempt
    failed: network errors, timeouts, 408/425/429 and 5xx answers are retried with exponential
    backoff and jitter, other 4xx answers are not (the URL or the document is wrong)."""
    return post_json_reply(url, document, timeout=timeout, attempts=attempts, max_wait=max_wait)[0]


def post_json_reply(url: str, document: dict[str, Any], *, timeout: float, attempts: int,
                    max_wait: float = 8.0) -> tuple[int, Any]:
    """post_json, and the answer's body read as JSON (None when it is empty or not JSON)."""
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for attempt in Retrying(stop=stop_after_attempt(attempts), reraise=True,
                                    wait=wait_exponential_jitter(initial=0.5, max=max_wait),
                                    retry=retry_if_exception(_worth_retrying)):
                with attempt:
                    response = client.post(url, json=document)
                    response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise WebhookError(f"answered HTTP {exc.response.status_code}") from None
    except httpx.HTTPError as exc:
        # httpx's own messages may quote the request's URL; the kind of fault is enough.
        raise WebhookError(f"{type(exc).__name__} after {attempts} attempt(s)") from None
    try:
        reply = response.json() if response.content else None
    except ValueError:
        reply = None
    return response.status_code, reply
