"""The background Prefect server of ad-hoc commands: Prefect's own API app, long-lived, private.

`patchdrill` starts this process (cli/api.py) when no server is configured or found, and every
later command reuses it, so only the first pays the seconds Prefect's temporary API takes to
start. It is the app Prefect's temporary server runs (`create_app(ephemeral=True)`: the API and
the services a temporary server runs, no UI, no scheduler), served by uvicorn on a socket this
process binds itself on 127.0.0.1 (port 0: no race for a port picked by someone else), with its
own PREFECT_HOME (its own SQLite database) under the user's.

Its state file (pid, port, URL) is written once the port is bound and removed on the way out;
a file whose pid is gone is what a killed server leaves, and the next command replaces it.
It stops by itself after `--idle-minutes` without a request (an open websocket, such as a
running flow's events stream, counts as busy), on SIGTERM/SIGINT, or on `patchdrill server stop`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, MutableMapping

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: how often the idle clock is looked at; an idle server lives at most this much past its limit
IDLE_CHECK_SECONDS = 1.0


class ActivityClock:
    """ASGI middleware that knows how long the server has had nothing to do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.last = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file in one step: a reader sees the old file or the new, never half."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(state))
    partial.replace(path)


def _remove_own_state(path: Path) -> None:
    """Remove the state file if it still names this process (a successor may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def serve(state_file: Path, idle_minutes: float) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    from cli.server_leases import keep_leases

    # Expired leases revoked here too (Prefect runs its repossessor only on a full server): a
    # command killed mid-run gives its slots back instead of keeping them for the server's life.
    clock = ActivityClock(keep_leases(create_app(ephemeral=True, final=True), repossess=True))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(clock, log_level="error", lifespan="on", timeout_graceful_shutdown=5))

    async def stop_when_idle() -> None:
        while not server.should_exit:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            if server.started and clock.idle_seconds() > idle_minutes * 60:
                print(f"idle for {idle_minutes:g} min: stopping", file=sys.stderr, flush=True)
                server.should_exit = True

    async def main() -> None:
        watchdog = asyncio.create_task(stop_when_idle())
        try:
            await server.serve(sockets=[listener])
        finally:
            watchdog.cancel()

    write_state(state_file, {"pid": os.getpid(), "port": port, "url": f"http://127.0.0.1:{port}/api",
                             "idle_minutes": idle_minutes, "started": time.time()})
    try:
        asyncio.run(main())
    finally:
        _remove_own_state(state_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--idle-minutes", type=float, required=True)
    args = parser.parse_args(argv)
    serve(args.state_file, args.idle_minutes)


if __name__ == "__main__":
    main()
