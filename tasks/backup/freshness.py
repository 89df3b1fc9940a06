"""How old each disk's newest recovery point is: the freshness check's one step, reading point
keys only (repository.newest_point_time), so it needs no encryption key."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from configs.models import StorageConfig
from connectors.stores import open_store
from tasks.backup.repo.repository import newest_point_time
from tasks.retry import retry_transient


class DiskFreshness(BaseModel):
    host: str
    disk: str
    newest_point: datetime | None
    age_seconds: float | None
    stale: bool


@task(name="newest-points", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=15,
      retry_condition_fn=retry_transient)
def newest_points_task(storage: StorageConfig, base_dir: Path,
                       disks: list[tuple[str, str]]) -> dict[tuple[str, str], datetime | None]:
    """Each (host, disk)'s newest point time, None for a disk that has none."""
    with open_store(storage, base_dir) as store:
        return {(host, disk): newest_point_time(store, host, disk) for host, disk in disks}
