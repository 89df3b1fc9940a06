"""Back up the selected hosts: snapshot, changed-block scan, delta upload, recovery point,
snapshot removal, then retention. Runbook order; the steps live in tasks/backup/."""

from __future__ import annotations

from pathlib import Path

import structlog
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Cancelled, State

from configs.loader import load_config
from configs.models import DiskConfig, HostConfig
from flows.logs import configure
from tasks.backup import cancel
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.run import DiskReport, failed_report
from tasks.backup.scheduling import Bounds, run_bounded
from tasks.backup.tasks import RetentionSummary, backup_disk_task, retention_task

log = structlog.stdlib.get_logger("patchdrill.backup")

REPORT_COLUMNS = ("host", "disk", "status", "consistency", "scanned_bytes", "changed_bytes", "uploaded_bytes",
                  "stored_bytes", "seconds", "point", "error")


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


@flow(name="backup-run", log_prints=True)
def backup_run(config_path: str = "configs/lab.yaml", hosts: list[str] | None = None, groups: list[str] | None = None,
               policy: str | None = None, disks: list[str] | None = None) -> list[DiskReport] | State:
    """Back up every disk of the selected hosts (all hosts when none are selected).

    Ctrl-C, SIGTERM or a cancellation from the Prefect UI stops it cleanly: no point for the
    disks still running, their locks released and snapshots removed, the run Cancelled.
    """
    with cancel.stop_on_signals():
        return _back_up(config_path, hosts, groups, policy, disks)


def _back_up(config_path: str, hosts: list[str] | None, groups: list[str] | None, policy: str | None,
             disks: list[str] | None) -> list[DiskReport] | State:
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
        sleep=cancel.wait, stopped=lambda: cancel.requested() is not None,
    )
    reports = [_report(host, disk, future) for host, disk, future in finished]
    if (reason := cancel.requested()) is not None:
        return _stopped(reason, work, reports)
    reports.sort(key=lambda r: (r.host, r.disk))

    retention = retention_task(config_path, chosen, sorted({r.host for r in reports if r.status == "ok"}))
    _publish(reports, retention)
    failed = [r for r in reports if r.status != "ok"]
    if failed:
        raise BackupRunFailed("; ".join(f"{r.host}/{r.disk}: {r.error}" for r in failed))
    return reports


def _stopped(reason: str, work: list[tuple[HostConfig, list[DiskConfig]]], reports: list[DiskReport]) -> State:
    """The run's end after a stop: no retention (it would prune beside a half-finished run's
    chunks for nothing), the table of what did and did not get a point, and a Cancelled state."""
    ran = {(r.host, r.disk) for r in reports}
    reports += [failed_report(h.name, d.name, cancel.Interrupted(f"not started: {reason}"))
                for h, ds in work for d in ds if (h.name, d.name) not in ran]
    reports.sort(key=lambda r: (r.host, r.disk))
    _publish(reports, RetentionSummary())
    done = [f"{r.host}/{r.disk}" for r in reports if r.status == "ok"]
    missed = [f"{r.host}/{r.disk}" for r in reports if r.status != "ok"]
    message = f"backup {reason}: stopped cleanly"
    message += f", no recovery point written for {', '.join(missed)}" if missed else ", retention skipped"
    if done:
        message += f" (points written before the stop: {', '.join(done)})"
    log.warning("backup.cancelled", reason=reason, points_written=len(done))
    return Cancelled(message=message)


def _report(host: str, disk: str, future: PrefectFuture[DiskReport]) -> DiskReport:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one disk's failure is reported, the others go on
        if not isinstance(exc, cancel.Interrupted):
            log.error("backup.failed", host=host, disk=disk, error=str(exc))
        return failed_report(host, disk, exc)


def _publish(reports: list[DiskReport], retention: RetentionSummary) -> None:
    ok = sum(r.status == "ok" for r in reports)
    create_table_artifact(
        key="backup-run",
        table=[{c: getattr(r, c) for c in REPORT_COLUMNS} for r in reports],
        description=f"{ok}/{len(reports)} disks backed up; retention forgot {len(retention.forgotten)} points"
                    + (f"; prune deferred: {retention.prune_deferred}" if retention.prune_deferred else ""),
    )
