"""Concurrency slots that come back when their holder dies, on every Prefect server patchdrill starts.

A run holds a one-slot global concurrency limit (tasks/patching/slots.py) with a lease it renews
from a thread; the limit's `active_slots` is in the database, the lease in the server's lease
storage. Prefect keeps leases in memory by default, and gives back the slot of a lease nobody
renews (its repossessor service) only on a full server, not on the ephemeral app Prefect's
temporary API and patchdrill's background server run. So a holder killed with SIGKILL kept its
slot for good: on the background server nothing revoked its lease, and where the server ended
too (the temporary API, any restart) the lease was gone while `active_slots` stayed 1, and every
later run waited for the slot until its timeout.

Every server patchdrill starts therefore

- keeps leases in files (Prefect's filesystem lease storage, a directory per database:
  cli/lease_storage.py), unless the environment names another storage: a lease outlives the
  server, and the next server on the same database and PREFECT_HOME gives its slot back once it
  expires (the lease's duration after the holder's last renewal);
- runs Prefect's own lease revocation (`revoke_expired_lease`, the repossessor's step) on the
  ephemeral app too, every PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS;
- once per database, gives back the slots left busy from before (when leases were kept in memory):
  a patchdrill limit whose busy slots no lease names, seen so twice a few seconds apart (a run
  that has just taken a slot writes its lease a moment after), gets an already expired lease
  for them, which the revocation then returns through Prefect's usual path. Only once: from then
  on every slot taken has a lease that lasts, and a slot held through a server with leases in
  memory (a `prefect server start` of the user's own on the same database) is never taken away.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from fastapi import FastAPI

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
FILE_LEASES = "cli.lease_storage"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"
#: the limits the sweep looks at: patchdrill's own (tasks/patching/slots.py, flows/drill.py)
LIMIT_PREFIX = "patchdrill-"
#: between the two looks at a slot no lease names; far longer than a run takes from taking a
#: slot to writing its lease
SETTLE_SECONDS = 5.0


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """env for a Prefect server: leases in files unless env names a lease storage of its own."""
    return {LEASE_STORAGE_ENV: FILE_LEASES, **env}


def _logger() -> Any:
    from prefect.logging import get_logger

    return get_logger("patchdrill.slots")


async def _leased_slots(limit_ids: set[UUID]) -> dict[UUID, int]:
    """How many slots of each limit the leases in storage account for, expired ones included
    (the revocation returns those)."""
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage

    storage = get_concurrency_lease_storage()
    lease_ids: list[UUID] = []
    while batch := await storage.read_active_lease_ids(limit=100, offset=len(lease_ids)):
        lease_ids.extend(batch)
        if len(batch) < 100:
            break
    lease_ids.extend(await storage.read_expired_lease_ids(limit=1_000_000))
    leased: dict[UUID, int] = {}
    for lease_id in set(lease_ids):
        lease = await storage.read_lease(lease_id)
        if lease is None:
            continue
        slots = lease.metadata.slots if lease.metadata else 0
        for resource in limit_ids.intersection(lease.resource_ids):
            leased[resource] = leased.get(resource, 0) + slots
    return leased


async def _unleased_slots() -> dict[UUID, tuple[str, int]]:
    """Patchdrill limits with busy slots that no lease names: limit id -> (name, slots)."""
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    db = provide_database_interface()
    async with db.session_context() as session:
        rows = (await session.execute(
            sa.select(db.ConcurrencyLimitV2.id, db.ConcurrencyLimitV2.name, db.ConcurrencyLimitV2.active_slots)
            .where(db.ConcurrencyLimitV2.name.startswith(LIMIT_PREFIX), db.ConcurrencyLimitV2.active_slots > 0))).all()
    busy = {row.id: (str(row.name), int(row.active_slots)) for row in rows}
    leased = await _leased_slots(set(busy))
    return {limit_id: (name, active - leased.get(limit_id, 0))
            for limit_id, (name, active) in busy.items() if active > leased.get(limit_id, 0)}


def _sweep_record() -> Path:
    """The record that this database's slots from before were swept: one per database (a
    PREFECT_HOME can serve several), named as its lease directory is."""
    from prefect.settings import get_current_settings

    from cli.lease_storage import database_key

    return Path(get_current_settings().home).expanduser() / "patchdrill" / "slot-sweeps" / f"{database_key()}.json"


async def return_unleased_slots(settle_seconds: float = SETTLE_SECONDS) -> list[str]:
    """Once per database: give the busy slots of patchdrill limits that no lease names (left by a
    holder whose server kept leases in memory) an expired lease, which the revocation returns.
    The limits' names, or [] (nothing found, swept before, or leases kept in memory here)."""
    from prefect.server.concurrency.lease_storage import ConcurrencyLimitLeaseMetadata, get_concurrency_lease_storage
    from prefect.settings import get_current_settings

    if get_current_settings().server.concurrency.lease_storage == MEMORY_LEASES:
        return []  # this server's leases die with it: nothing here can tell a dead holder from a live one
    record = _sweep_record()
    if record.exists():
        return []
    first = await _unleased_slots()
    if first:
        await asyncio.sleep(settle_seconds)
    second = await _unleased_slots()
    storage = get_concurrency_lease_storage()
    returned: list[str] = []
    for limit_id, (name, slots) in second.items():
        if first.get(limit_id) != (name, slots):
            continue
        await storage.create_lease(resource_ids=[limit_id], ttl=timedelta(0),
                                   metadata=ConcurrencyLimitLeaseMetadata(slots=slots))
        returned.append(name)
    if returned:
        _logger().warning("returning concurrency slots that no lease names (their holders' leases were kept in "
                          "memory by a server that has ended): %s", ", ".join(sorted(returned)))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"swept": datetime.now(timezone.utc).isoformat(), "returned": sorted(returned)}))
    return returned


async def revoke_expired_leases() -> int:
    """One pass of Prefect's repossessor: give back the slots of every expired lease. How many."""
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.server.database import provide_database_interface
    from prefect.server.services.repossessor import revoke_expired_lease

    storage = get_concurrency_lease_storage()
    db = provide_database_interface()
    expired = await storage.read_expired_lease_ids()
    for lease_id in expired:
        await revoke_expired_lease(lease_id, db=db, lease_storage=storage)
    return len(expired)


async def _repossess_forever() -> None:
    from prefect.settings import get_current_settings

    settings = get_current_settings().server.services.repossessor
    if not settings.enabled:
        return
    while True:
        try:
            await revoke_expired_leases()
        except Exception:  # noqa: BLE001 - a database hiccup must not end the revocation for the server's life
            _logger().exception("revoking expired concurrency leases failed; trying again")
        await asyncio.sleep(settings.loop_seconds)


async def _sweep_quietly() -> None:
    try:
        await return_unleased_slots()
    except Exception:  # noqa: BLE001 - the server serves on; the next one sweeps again
        _logger().exception("returning concurrency slots that no lease names failed")


def keep_leases(app: "FastAPI", *, repossess: bool) -> "FastAPI":
    """app, whose lifespan also sweeps the slots from before and, with repossess (Prefect's
    ephemeral app, which runs no repossessor), revokes expired leases while it serves."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            jobs = [asyncio.create_task(_sweep_quietly())]
            if repossess:
                jobs.append(asyncio.create_task(_repossess_forever()))
            try:
                yield state
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)

    app.router.lifespan_context = lifespan
    return app


def create_app() -> "FastAPI":
    """The temporary API's app (uvicorn's --factory, cli/temporary_server.py): Prefect's, ephemeral."""
    from prefect.server.api.server import create_app as prefect_app

    return keep_leases(prefect_app(ephemeral=True, final=True), repossess=True)


def main() -> int:
    """`python -m cli.server_leases`: the sweep alone, for a full Prefect server (`make server`'s),
    whose own repossessor returns the slots."""
    returned = asyncio.run(return_unleased_slots())
    print(f"returned {len(returned)} concurrency slot(s) no lease named: {', '.join(returned) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
