"""One drill per plan at a time, with or without a Prefect server: a lease in the store.

On a Prefect server the global concurrency limit `patchdrill-drill-<plan>` holds a plan's slot
for every worker. Two runs from the command line without a server each start a temporary API of
their own, which share nothing; the store is what every run of a plan shares, so the slot is also
a lease there: `slots/drill/<plan>/<uuid>.json` (docs/repository.md).

A lease records its holder as a repository lock does (tasks/backup/repo/locks.py: host, pid and
the process's identity; a heartbeat the holder rewrites), plus the drill's run id. A run writes
its lease, then looks for another live one: if there is one, it takes its own back, says who
holds the slot, and tries again after a jittered pause, so of two runs starting together at
least one backs off and never both proceed. A dead holder does not block: on its own machine a
lease whose process is gone (a controller killed with SIGKILL) is removed at once; a lease from
another machine expires when its heartbeat is older than the stale limit.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import structlog

from configs.secrets import redact
from connectors.stores.base import BlobNotFound, BlobStore, StoreError
from tasks.backup import cancel
from tasks.backup.repo import locks
from tasks.backup.repo.repository import LOCK_REFRESH, LOCK_STALE
from tasks.drill.evidence import utcnow

log = structlog.stdlib.get_logger("patchdrill.drill")

SLOT_PREFIX = "slots/drill/"
POLL_SECONDS = 2.0


class SlotBusy(TimeoutError):
    """Another drill of the plan held the slot for the whole wait; `holder` says who, in words."""

    def __init__(self, plan: str, holder: str) -> None:
        super().__init__(f"another drill of plan {plan} holds its slot: {holder}")
        self.holder = holder


def slot_prefix(plan: str) -> str:
    return f"{SLOT_PREFIX}{plan}/"


def _body(run_id: str, created: str | None = None) -> bytes:
    now = utcnow()
    body = locks.lock_body("drill", now, now) | {"run_id": run_id}
    if created:
        body["created"] = created
    return json.dumps(body).encode()


def _leases(store: BlobStore, prefix: str) -> list[tuple[str, dict[str, object]]]:
    """The leases under prefix (one plan's, or every plan's), as their key and body."""
    found = []
    for info in store.list(prefix):
        try:
            body = json.loads(store.get(info.key))
        except (BlobNotFound, ValueError):
            continue  # taken back while listing, or torn by a crash: holds nothing
        if isinstance(body, dict):
            found.append((info.key, body))
    return found


def _delete(store: BlobStore, key: str) -> None:
    try:
        store.delete(key)
    except BlobNotFound:
        pass


def live_holder(store: BlobStore, plan: str, mine: str, stale: timedelta = LOCK_STALE) -> str | None:
    """Who else holds the plan's slot, in words (the oldest live lease but `mine`), or None.
    Leases whose holder is dead or silent are removed on the way, and said so."""
    holders = []
    now = utcnow()
    for key, body in _leases(store, slot_prefix(plan)):
        if key == mine:
            continue
        state = locks.judge(key, body, now=now, stale_after=stale)
        who = f"drill run {body.get('run_id')}: {state.why}"
        if state.stale:
            _delete(store, key)
            log.warning("removed a stale drill slot lease", plan=plan, lease=redact(who))
            continue
        holders.append((str(body.get("created")), who))
    return min(holders)[1] if holders else None


@contextmanager
def drill_slot(store: BlobStore, plan: str, run_id: str, *, timeout_seconds: float,
               poll_seconds: float = POLL_SECONDS, stale: timedelta = LOCK_STALE,
               refresh: timedelta = LOCK_REFRESH) -> Iterator[None]:
    """Hold the plan's lease for the duration. While another run holds it, wait (saying so once
    per holder) up to timeout_seconds, then SlotBusy; a stop request ends the wait at once."""
    deadline = time.monotonic() + timeout_seconds
    told = None
    while True:
        key = f"{slot_prefix(plan)}{uuid.uuid4().hex}.json"
        store.put(key, _body(run_id), overwrite=False)
        holder = live_holder(store, plan, key, stale)
        if holder is None:
            break
        _delete(store, key)
        if holder != told:
            log.info("waiting for the plan's drill slot", plan=plan, held_by=holder)
            told = holder
        if time.monotonic() >= deadline:
            raise SlotBusy(plan, holder)
        if cancel.wait(poll_seconds * random.uniform(0.5, 1.5)):
            cancel.check()
    created = json.loads(store.get(key))["created"]
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(refresh.total_seconds()):
            try:
                store.put(key, _body(run_id, created), overwrite=True)
            except StoreError as exc:  # one missed refresh is harmless: the stale limit is several
                log.warning("drill slot refresh failed", plan=plan, error=str(exc))

    refresher = threading.Thread(target=heartbeat, name="patchdrill-drill-slot", daemon=True)
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        _delete(store, key)


__all__ = ["SLOT_PREFIX", "SlotBusy", "drill_slot", "live_holder", "slot_prefix"]


def running_runs(store: BlobStore, stale: timedelta = LOCK_STALE) -> dict[str, str]:
    """Drill runs whose slot lease is live (any plan): run id -> its holder in words. A drill
    holds its lease from before its first ledger entry until after its cleanup."""
    running: dict[str, str] = {}
    now = utcnow()
    for key, body in _leases(store, SLOT_PREFIX):
        state = locks.judge(key, body, now=now, stale_after=stale)
        if not state.stale:
            running[str(body.get("run_id"))] = state.why
    return running
