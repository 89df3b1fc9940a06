"""Update-domain and host concurrency slots: Prefect global concurrency limits of one slot,
shared by every run and worker of a server."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator
from uuid import UUID

import structlog
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

log = structlog.stdlib.get_logger("patchdrill.patch")

REBOOT_LIMIT_PREFIX = "patchdrill-reboot-ud-"
HOST_LIMIT_PREFIX = "patchdrill-host-"
# How long a run waits for a host that another run is working on (refreshing its lists or
# patching it) before it gives the host up for this run.
HOST_SLOT_TIMEOUT_SECONDS = 3600.0
# How long the server keeps a slot whose holder stops renewing its lease (a thread renews it at
# three quarters of this): a run killed with SIGKILL gives its slots back this long after its
# last renewal, on any server patchdrill starts (cli/server_leases.py). Prefect's default.
LEASE_SECONDS = 300.0
_ACQUIRED = "prefect.concurrency-limit.acquired"


def reboot_limit_name(update_domain: int) -> str:
    return f"{REBOOT_LIMIT_PREFIX}{update_domain}"


def host_limit_name(host: str) -> str:
    return f"{HOST_LIMIT_PREFIX}{host}"


def host_busy(host: str) -> str:
    return (f"host {host} is being worked on by another run "
            f"(concurrency limit {host_limit_name(host)} stayed busy)")


def _lease_holder() -> ConcurrencyLeaseHolder | None:
    """The run taking the slot, recorded in its lease: the task run, else the flow run."""
    task_run = TaskRunContext.get()
    if task_run is not None:
        return ConcurrencyLeaseHolder(type="task_run", id=task_run.task_run.id)
    flow_run = FlowRunContext.get()
    if flow_run is not None and flow_run.flow_run is not None:
        return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.flow_run.id)
    return None


def _held_by(client: Any, limit_id: UUID) -> dict[str, str]:
    """Who holds the limit's slot and for how long, as log fields, or {} when Prefect cannot say.

    The server keeps the holder in the lease, which no API reads; the run that took the slot
    sent an event when it did (`prefect.concurrency-limit.acquired`, naming its flow and task
    run), which every server stores. The newest event on the limit is that one while the slot
    stays taken; a `released` one, or none, says nothing about the holder."""
    try:
        page = client.read_events(EventFilter(event=EventNameFilter(prefix=["prefect.concurrency-limit."]),
                                              resource=EventResourceFilter(id=[f"prefect.concurrency-limit.{limit_id}"])),
                                  limit=1)
    except Exception:  # noqa: BLE001 - who holds the slot is for the log line; waiting for it goes on regardless
        return {}
    if not page.events or page.events[0].event != _ACQUIRED:
        return {}
    event = page.events[0]
    runs = event.resource_in_role
    fields: dict[str, str] = {}
    for role in ("flow-run", "task-run"):
        run = runs.get(role)
        if run is not None:
            name = f" ({run.name})" if run.name else ""
            fields[role.replace("-", "_")] = f"{run.id.rsplit('.', 1)[-1]}{name}"
    held = (datetime.now(timezone.utc) - event.occurred).total_seconds()
    fields["held_for"] = f"{held / 60:.0f} min" if held >= 60 else f"{held:.0f} s"
    return fields


@contextmanager
def exclusive(names: list[str], timeout_seconds: float, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the one slot of each of these Prefect global concurrency limits, all at once (the
    server grants all or none, so two holders never deadlock), shared by every worker of the
    server; TimeoutError when they stay busy. Each limit is (re)set to 1 first: a missing limit
    would let Prefect grant every request. The slots are held under a lease naming this run,
    renewed while it runs; a run that dies stops renewing, and its slots come back
    `lease_seconds` later (at least 60: the server refuses less)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except ObjectAlreadyExists:
                    pass  # another run created it between the read and the create: it has one slot too
                continue
            if limit.limit != 1:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1))
            if limit.active_slots:
                log.info("waiting for a concurrency slot", limit=name, reason="another run holds it",
                         **_held_by(client, limit.id))
    with concurrency(names, occupy=1, timeout_seconds=timeout_seconds, strict=True, lease_duration=lease_seconds,
                     holder=_lease_holder()):
        yield


def update_domain_slot(update_domain: int, timeout_seconds: float) -> AbstractContextManager[None]:
    """Hold the update domain's one slot while its batch installs and reboots.

    The slot spans the whole batch, not each reboot: hosts of one batch reboot together by
    design, and what must never happen is a second run rebooting the same domain meanwhile.
    """
    return exclusive([reboot_limit_name(update_domain)], timeout_seconds)


def host_slots(hosts: list[str], timeout_seconds: float) -> AbstractContextManager[None]:
    """Hold the hosts' slots while a run changes them (refreshes their package lists, patches
    them): two runs never work on one host at once, whatever update domain their configs give
    it. A survey takes its hosts' slots together: one acquisition per task run, not per host,
    costs the server and the run a fraction of the CPU."""
    return exclusive([host_limit_name(host) for host in hosts], timeout_seconds)
