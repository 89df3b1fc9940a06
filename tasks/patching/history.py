"""Patch history and enrollment records in the store.

Layout (docs/repository.md lists it with the rest of the store):

    history/<host>/<started YYYYMMDDTHHMMSSZ>-<run id>.json   one HostPatchRecord per host per run
    enrollments/<host>.json                                  the host's latest Enrollment

A run writes a host's record before it reboots the host (status "rebooting", no finish time,
the reason naming the boot it left) and again once the reboot gate and the probes are done, so
a run that dies mid-reboot still leaves a record that says where it stopped. The
start time leads the key so a listing sorts by time and `history` can skip old records by
name alone, without reading them.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from connectors.stores import BlobNotFound, BlobStore
from tasks.patching.models import Enrollment, HostPatchRecord

HISTORY_PREFIX = "history/"
ENROLLMENT_PREFIX = "enrollments/"
KEEP_DAYS = 30
_STAMP = "%Y%m%dT%H%M%SZ"


class HistoryError(Exception):
    """A record in the store cannot be read; the message names its key."""


def record_key(record: HostPatchRecord) -> str:
    stamp = record.started_at.astimezone(timezone.utc).strftime(_STAMP)
    return f"{HISTORY_PREFIX}{record.host}/{stamp}-{record.run_id}.json"


def enrollment_key(host: str) -> str:
    return f"{ENROLLMENT_PREFIX}{host}.json"


def write_record(store: BlobStore, record: HostPatchRecord) -> str:
    """Write (or replace, for the same host and run) one record; returns its key."""
    key = record_key(record)
    store.put(key, record.model_dump_json(indent=2).encode("utf-8"), overwrite=True)
    return key


def _started(key: str) -> datetime | None:
    name = key.rsplit("/", 1)[-1]
    try:
        return datetime.strptime(name.split("-", 1)[0], _STAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _read_record(store: BlobStore, key: str) -> HostPatchRecord:
    try:
        return HostPatchRecord.model_validate_json(store.get(key))
    except ValidationError as exc:
        raise HistoryError(f"history record {key} is not a valid patch record: {exc.error_count()} problem(s), "
                           f"first: {exc.errors()[0]['msg']}") from None


def history(store: BlobStore, host: str, *, days: int = KEEP_DAYS, now: datetime | None = None) -> list[HostPatchRecord]:
    """The host's records of the last `days` days, newest first."""
    since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    keys = [info.key for info in store.list(f"{HISTORY_PREFIX}{host}/")]
    recent = [key for key in keys if (started := _started(key)) is not None and started >= since]
    return sorted((_read_record(store, key) for key in recent), key=lambda r: r.started_at, reverse=True)


def prune(store: BlobStore, *, keep_days: int = KEEP_DAYS, now: datetime | None = None) -> list[str]:
    """Delete records older than `keep_days`; returns the deleted keys."""
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=keep_days)
    old = [info.key for info in store.list(HISTORY_PREFIX) if (started := _started(info.key)) is not None and started < cutoff]
    for key in old:
        store.delete(key)
    return old


def write_enrollment(store: BlobStore, enrollment: Enrollment) -> str:
    key = enrollment_key(enrollment.host)
    store.put(key, enrollment.model_dump_json(indent=2).encode("utf-8"), overwrite=True)
    return key


def read_enrollment(store: BlobStore, host: str) -> Enrollment | None:
    key = enrollment_key(host)
    try:
        data = store.get(key)
    except BlobNotFound:
        return None
    try:
        return Enrollment.model_validate_json(data)
    except ValidationError as exc:
        raise HistoryError(f"enrollment record {key} is not valid: {exc.errors()[0]['msg']}") from None


__all__ = [
    "ENROLLMENT_PREFIX", "HISTORY_PREFIX", "HistoryError", "KEEP_DAYS", "enrollment_key", "history", "prune",
    "read_enrollment", "record_key", "write_enrollment", "write_record",
]
