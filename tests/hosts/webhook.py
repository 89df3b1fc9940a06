"""A webhook receiver: a real HTTP server on a free loopback port that records each JSON post,
as Slack's or Teams' incoming webhook would receive it.

Its URL carries a random token in its path, as theirs do, so tests can check the token leaks
nowhere. It can answer the next posts with an error status, to exercise retries.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest


@dataclass
class WebhookReceiver:
    server: ThreadingHTTPServer
    token: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: What a post is answered with (a JSON body) when it is accepted; None: "ok".
    reply: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks/{self.token}"

    def fail_next(self, *statuses: int) -> None:
        """Answer the next posts with these statuses, in order, before accepting again."""
        with self.lock:
            self.failures.extend(statuses)

    def reset(self) -> None:
        with self.lock:
            self.posts.clear()
            self.failures.clear()
            self.reply = None

    def received(self, event: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if event is None or p.get("event") == event]

    def wait_for(self, event: str, count: int = 1, deadline: float = 60.0) -> list[dict[str, Any]]:
        """The posts of `event` once `count` arrived (a guard against a hang, not a timing)."""
        end = time.monotonic() + deadline
        while len(found := self.received(event)) < count and time.monotonic() < end:
            time.sleep(0.05)
        return found


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            answer = b"ok"
            with receiver.lock:
                status = receiver.failures.pop(0) if receiver.failures else 200
                if status == 200 and self.path == f"/hooks/{receiver.token}":
                    receiver.posts.append(json.loads(body))
                    if receiver.reply is not None:
                        answer = json.dumps(receiver.reply(receiver.posts[-1])).encode()
                elif status == 200:
                    status = 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="session")
def webhook_server() -> Iterator[WebhookReceiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    receiver = WebhookReceiver(server=server, token=secrets.token_urlsafe(24))
    server.RequestHandlerClass = _handler(receiver)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def webhook(webhook_server: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> WebhookReceiver:
    """The receiver, emptied, with its URL in PATCHDRILL_TEST_WEBHOOK (configs name it `env:`)."""
    webhook_server.reset()
    monkeypatch.setenv("PATCHDRILL_TEST_WEBHOOK", webhook_server.url)
    return webhook_server


def closed_port_url() -> str:
    """A loopback URL nothing listens on: a connect is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/{secrets.token_urlsafe(16)}"
