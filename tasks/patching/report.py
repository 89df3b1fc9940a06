"""Writing a run's host records to the store's history."""

from __future__ import annotations

import structlog
from prefect import task

from tasks.patching import history
from tasks.patching.fleet import RecordStore
from tasks.patching.models import HostPatchRecord

log = structlog.stdlib.get_logger("patchdrill.patch")


@task(name="record-history", task_run_name="record {count} host(s)")
def write_records_task(target: RecordStore, records: list[HostPatchRecord], count: int) -> list[str]:
    store = target.open()
    try:
        written = [history.write_record(store, record) for record in records]
        # The store keeps 30 days of history (docs/repository.md); each run trims what aged out.
        for key in history.prune(store):
            log.info("history record expired", key=key)
        return written
    finally:
        store.close()
