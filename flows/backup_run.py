"""Back up the selected hosts: snapshot, changed-block scan, delta upload, recovery point,
snapshot removal, then retention. Runbook order; the steps live in tasks/backup/."""

from __future__ import annotations

from pathlib import Path

import structlog
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed

from configs.loader import load_config
from configs.models import DiskConfig, HostConfig
from flows.logs import configure
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.run import DiskReport, failed_report
from tasks.backup.scheduling import Bounds, run_bounded
from tasks.backup.tasks import RetentionSummary, backup_disk_task, retention_task

log = structlog.stdlib.get_logger("patchdrill.backup")

REPORT_COLUMNS = ("host", "disk", "status", "consistency", "scanned_bytes", "changed_bytes", "uploaded_bytes",
                  "stored_bytes", "seconds", "point", "error")


class BackupRunFailed(BackupError):
    """Some disks were not backed up; the run's table artifact says which and why, and
    `reports` holds every disk's outcome, the successes included."""

    reports: list[DiskReport]


def select_work(config_path: str, hosts: list[str] | None, groups: list[str] | None,
                disks: list[str] | None) -> list[tuple[HostConfig, list[DiskConfig]]]:
    loaded = load_config(Path(config_path))
    try:
        chosen = loaded.config.select(groups, hosts)
    except KeyError as exc:
        raise BackupError(f"{config_path}: {exc.args[0]}") from None
    work = [(h, [d for d in h.disks if not disks or d.name in disks]) for h in chosen]
    return [(h, ds) for h, ds in work if ds]


def _first_done(futures: list[PrefectFuture[DiskReport]]) -> PrefectFuture[DiskReport]:
    return next(as_completed(futures))


@flow(name="backup-run", log_prints=True)
def backup_run(config_path: str = "configs/lab.yaml", hosts: list[str] | None = None, groups: list[str] | None = None,
               policy: str | None = None, disks: list[str] | None = None) -> list[DiskReport]:
    """Back up every disk of the selected hosts (all hosts when none are selected)."""
    configure()
    loaded = load_config(Path(config_path))
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    work = select_work(config_path, hosts, groups, disks)
    if not work:
        raise BackupError(f"{config_path}: no disks to back up for the selected hosts")
    log.info("backup.start", hosts=len(work), disks=sum(len(ds) for _, ds in work), policy=policy or "default")

    finished = run_bounded(
        [(h.name, [d.name for d in ds]) for h, ds in work],
        Bounds(chosen.max_parallel_hosts, chosen.max_parallel_disks, chosen.stagger_seconds),
        lambda host, disk: backup_disk_task.submit(config_path, host, disk, chosen),
        _first_done,
    )
    reports = [_report(host, disk, future) for host, disk, future in finished]
    reports.sort(key=lambda r: (r.host, r.disk))

    retention = retention_task(config_path, chosen, sorted({r.host for r in reports if r.status == "ok"}))
    _publish(reports, retention)
    failed = [r for r in reports if r.status != "ok"]
    if failed:
        failure = BackupRunFailed("; ".join(f"{r.host}/{r.disk}: {r.error}" for r in failed))
        # An attribute, not an __init__ argument: the exception still pickles with Prefect's results.
        failure.reports = reports
        raise failure
    return reports


def _report(host: str, disk: str, future: PrefectFuture[DiskReport]) -> DiskReport:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one disk's failure is reported, the others go on
        log.error("backup.failed", host=host, disk=disk, error=str(exc))
        return failed_report(host, disk, exc)


def _publish(reports: list[DiskReport], retention: RetentionSummary) -> None:
    ok = sum(r.status == "ok" for r in reports)
    create_table_artifact(
        key="backup-run",
        table=[{c: getattr(r, c) for c in REPORT_COLUMNS} for r in reports],
        description=f"{ok}/{len(reports)} disks backed up; retention forgot {len(retention.forgotten)} points",
    )
