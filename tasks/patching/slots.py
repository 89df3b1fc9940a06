"""Update-domain and host concurrency slots: Prefect global concurrency limits of one slot,
shared by every run and worker of a server."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import structlog
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

log = structlog.stdlib.get_logger("patchdrill.patch")

REBOOT_LIMIT_PREFIX = "patchdrill-reboot-ud-"
HOST_LIMIT_PREFIX = "patchdrill-host-"
# How long a run waits for a host that another run is working on (refreshing its lists or
# patching it) before it gives the host up for this run.
HOST_SLOT_TIMEOUT_SECONDS = 3600.0


def reboot_limit_name(update_domain: int) -> str:
    return f"{REBOOT_LIMIT_PREFIX}{update_domain}"


def host_limit_name(host: str) -> str:
    return f"{HOST_LIMIT_PREFIX}{host}"


def host_busy(host: str) -> str:
    return (f"host {host} is being worked on by another run "
            f"(concurrency limit {host_limit_name(host)} stayed busy)")


@contextmanager
def exclusive(names: list[str], timeout_seconds: float) -> Iterator[None]:
    """Hold the one slot of each of these Prefect global concurrency limits, all at once (the
    server grants all or none, so two holders never deadlock), shared by every worker of the
    server; TimeoutError when they stay busy. Each limit is (re)set to 1 first: a missing limit
    would let Prefect grant every request."""
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
                log.info("waiting for a concurrency slot", limit=name, reason="another run holds it")
    with concurrency(names, occupy=1, timeout_seconds=timeout_seconds, strict=True):
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
