"""A run that takes one patchdrill concurrency slot through tasks/patching/slots.exclusive(), on
the Prefect API a `patchdrill` command would use (cli/api.using_api: PATCHDRILL_SERVER and
PREFECT_HOME choose it), for tests/e2e/test_slot_leases.py to kill or to keep waiting.

    python -m tests.hosts.slot_holder hold|take LIMIT --lease-seconds S --timeout-seconds T

`hold` takes the slot, waits until the server has stored the acquisition (the event the waiting
line names the holder from), prints {"step": "held", "flow_run", "server_pid"} and holds the
slot, renewing its lease, until it is killed. `take` prints {"step": "took"} once it has the slot,
or {"step": "timed out"}. Steps are JSON lines on stdout; the run's log lines JSON on stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from flows.logs import configure

HANG_GUARD = 120.0


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _server_pid(where: str) -> int | None:
    """The pid of the server this run reports to, when patchdrill started it."""
    if where == "temporary":
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer._instances.get(None)
        return server.server_process.pid if server is not None and server.server_process is not None else None
    if where == "background":
        from cli.api import BackgroundServer

        state = BackgroundServer.default().state()
        return int(state["pid"]) if state else None
    return None


def _wait_recorded(flow_run_id: str) -> None:
    """Until the server has stored this run's acquisition event (events are written in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    deadline = time.monotonic() + HANG_GUARD
    with get_client(sync_client=True) as client:
        while not client.read_events(EventFilter(
                event=EventNameFilter(name=["prefect.concurrency-limit.acquired"]),
                related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=1).events:
            if time.monotonic() > deadline:
                raise SystemExit("the server never stored the acquisition event")
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["hold", "take"])
    parser.add_argument("limit")
    parser.add_argument("--lease-seconds", type=float, required=True)
    parser.add_argument("--timeout-seconds", type=float, required=True)
    args = parser.parse_args()
    configure(json=True)

    from prefect import flow
    from prefect.context import FlowRunContext

    from cli.api import using_api
    from tasks.patching.slots import exclusive

    @flow(name="slot-holder", persist_result=False)
    def slot_run(where: str) -> None:
        run = FlowRunContext.get()
        assert run is not None and run.flow_run is not None
        try:
            with exclusive([args.limit], args.timeout_seconds, args.lease_seconds):
                if args.action == "take":
                    say(step="took")
                    return
                _wait_recorded(str(run.flow_run.id))
                say(step="held", flow_run=str(run.flow_run.id), server_pid=_server_pid(where))
                while True:
                    time.sleep(1)
        except TimeoutError:
            say(step="timed out")

    with using_api() as where:
        slot_run(where)


if __name__ == "__main__":
    main()
