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
from flows.run_form import Names, OptionalName, current_run_name, run_name, selection
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.run import DiskReport, failed_report
from tasks.backup.scheduling import Bounds, run_bounded
from tasks.backup.tasks import RetentionSummary, backup_disk_task, retention_task
from tasks.rendering import artifact_key, human_size

log = structlog.stdlib.get_logger("patchdrill.backup")

SIZE_COLUMNS = {"scanned": "scanned_bytes", "changed": "changed_bytes", "uploaded": "uploaded_bytes",
                "stored": "stored_bytes"}


class BackupRunFailed(BackupError):
    """Some disks were not backed up; the run's table artifact says which and why."""


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


@flow(name="backup-run", log_prints=True, flow_run_name=run_name("backup", "policy"))
def backup_run(config_path: str = "configs/lab.yaml", hosts: Names = None, groups: Names = None,
               policy: OptionalName = None, disks: Names = None) -> list[DiskReport]:
    """Back up every disk of the selected hosts (all hosts when none are selected).

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        hosts: Only these hosts; empty for every host (of the groups, if given).
        groups: Only hosts in these groups; empty for every group.
        policy: Backup policy (schedule-independent settings: retention, parallelism, key); empty for the default.
        disks: Only these disks (by name); empty for every disk of each host.
    """
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
    _publish(reports, retention, artifact_key("backup", selection({"groups": groups, "hosts": hosts}), policy or ""))
    failed = [r for r in reports if r.status != "ok"]
    if failed:
        raise BackupRunFailed("; ".join(f"{r.host}/{r.disk}: {r.error}" for r in failed))
    return reports


def _report(host: str, disk: str, future: PrefectFuture[DiskReport]) -> DiskReport:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one disk's failure is reported, the others go on
        log.error("backup.failed", host=host, disk=disk, error=str(exc))
        return failed_report(host, disk, exc)


def report_row(report: DiskReport) -> dict[str, str]:
    """One disk's row as people read it: sizes in KiB/MiB/GiB, seconds to a tenth."""
    return {"host": report.host, "disk": report.disk, "status": report.status, "consistency": report.consistency or "",
            **{column: human_size(getattr(report, field)) for column, field in SIZE_COLUMNS.items()},
            "seconds": f"{report.seconds:.1f}", "point": report.point or "", "error": report.error or ""}


def _publish(reports: list[DiskReport], retention: RetentionSummary, key: str) -> None:
    ok = sum(r.status == "ok" for r in reports)
    create_table_artifact(
        key=key,
        table=[report_row(r) for r in reports],
        description=(f"{current_run_name('backup')}: {ok}/{len(reports)} disks backed up; "
                     f"retention forgot {len(retention.forgotten)} points"),
    )
