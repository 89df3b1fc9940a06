"""Back up the selected hosts: per disk, snapshot, changed-block scan and upload, recovery point,
snapshot removal (always), then retention. Each step is a task run of its own under the disk's
`backup-disk` run, named after the host and disk, so the UI says which step of which disk failed;
the steps live in tasks/backup/ (disk.py runs them in this order)."""


from pathlib import Path

import structlog
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Cancelled, State

from configs.loader import load_config
from configs.models import DiskConfig, HostConfig, PatchdrillConfig
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.run_form import Names, OptionalName, current_run_name, run_name, selection
from tasks.backup import cancel
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.disk import DiskReport, failed_report, policy_name
from tasks.backup.scheduling import Bounds, run_bounded
from tasks.backup.steps import RetentionSummary, backup_disk_task, retention_task
from tasks.rendering import artifact_key, human_size

log = structlog.stdlib.get_logger("patchdrill.backup")

SIZE_COLUMNS = {"scanned": "scanned_bytes", "changed": "changed_bytes", "uploaded": "uploaded_bytes",
                "stored": "stored_bytes"}


class BackupRunFailed(BackupError):
    """Some disks were not backed up; the run's table artifact says which and why, and
    `reports` holds every disk's outcome, the successes included."""

    reports: list[DiskReport]


def select_work(config: PatchdrillConfig, source: str, hosts: list[str] | None, groups: list[str] | None,
                disks: list[str] | None) -> list[tuple[HostConfig, list[DiskConfig]]]:
    try:
        chosen = config.select(groups, hosts)
    except KeyError as exc:
        raise BackupError(f"{source}: {exc.args[0]}") from None
    work = [(h, [d for d in h.disks if not disks or d.name in disks]) for h in chosen]
    return [(h, ds) for h, ds in work if ds]


def _first_done(futures: list[PrefectFuture[DiskReport]]) -> PrefectFuture[DiskReport]:
    return next(as_completed(futures))


@flow(name="backup-run", log_prints=True, flow_run_name=run_name("backup", "policy"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def backup_run(config_path: str = "configs/lab.yaml", hosts: Names = [], groups: Names = [],
               policy: OptionalName = "", disks: Names = []) -> list[DiskReport] | State:
    """Back up every disk of the selected hosts (all hosts when none are selected).

    Ctrl-C, SIGTERM or a cancellation from the Prefect UI stops it cleanly: no point for the
    disks still running, their locks released and snapshots removed, the run Cancelled.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        hosts: Only these hosts; empty for every host (of the groups, if given).
        groups: Only hosts in these groups; empty for every group.
        policy: Backup policy (schedule-independent settings: retention, parallelism, key); empty for the default.
        disks: Only these disks (by name); empty for every disk of each host.
    """
    with cancel.stop_on_signals():
        return _back_up(config_path, hosts, groups, policy, disks)


def _back_up(config_path: str, hosts: list[str] | None, groups: list[str] | None, policy: str | None,
             disks: list[str] | None) -> list[DiskReport] | State:
    configure()
    # Read and validated once: every task of the run gets typed models, never the file again.
    loaded = load_config(Path(config_path))
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    name = policy_name(loaded.config, chosen)
    work = select_work(loaded.config, config_path, hosts, groups, disks)
    by_name = {(h.name, d.name): (h, d) for h, ds in work for d in ds}
    if not work:
        raise BackupError(f"{config_path}: no disks to back up for the selected hosts")
    log.info("backup.start", hosts=len(work), disks=sum(len(ds) for _, ds in work), policy=policy or "default")

    finished = run_bounded(
        [(h.name, [d.name for d in ds]) for h, ds in work],
        Bounds(chosen.max_parallel_hosts, chosen.max_parallel_disks, chosen.stagger_seconds),
        lambda host, disk: backup_disk_task.submit(loaded.config.storage, loaded.base_dir, *by_name[host, disk], chosen,
                                                   name),
        _first_done,
        sleep=cancel.wait, stopped=lambda: cancel.requested() is not None,
    )
    reports = [_report(host, disk, future) for host, disk, future in finished]
    key = artifact_key("backup", selection({"groups": groups, "hosts": hosts}), policy or "")
    if (reason := cancel.requested()) is not None:
        return _stopped(reason, work, reports, key)
    reports.sort(key=lambda r: (r.host, r.disk))

    retention = retention_task(loaded.config.storage, loaded.base_dir, chosen,
                               sorted({r.host for r in reports if r.status == "ok"}), host_configs=[h for h, _ in work])
    _publish(reports, retention, key)
    failed = [r for r in reports if r.status != "ok"]
    if failed:
        failure = BackupRunFailed("; ".join(f"{r.host}/{r.disk}: {r.error}" for r in failed))
        # An attribute, not an __init__ argument: the exception still pickles with Prefect's results.
        failure.reports = reports
        raise failure
    return reports


def _stopped(reason: str, work: list[tuple[HostConfig, list[DiskConfig]]], reports: list[DiskReport],
             key: str) -> State:
    """The run's end after a stop: no retention (it would prune beside a half-finished run's
    chunks for nothing), the table of what did and did not get a point, and a Cancelled state."""
    ran = {(r.host, r.disk) for r in reports}
    reports += [failed_report(h.name, d.name, cancel.Interrupted(f"not started: {reason}"))
                for h, ds in work for d in ds if (h.name, d.name) not in ran]
    reports.sort(key=lambda r: (r.host, r.disk))
    _publish(reports, RetentionSummary(), key)
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


def report_row(report: DiskReport) -> dict[str, str]:
    """One disk's row as people read it: sizes in KiB/MiB/GiB, seconds to a tenth."""
    return {"host": report.host, "disk": report.disk, "status": report.status, "consistency": report.consistency or "",
            **{column: human_size(getattr(report, field)) for column, field in SIZE_COLUMNS.items()},
            "seconds": f"{report.seconds:.1f}", "point": report.point or "", "error": report.error or "",
            "warning": report.warning or ""}


def _publish(reports: list[DiskReport], retention: RetentionSummary, key: str) -> None:
    ok = sum(r.status == "ok" for r in reports)
    create_table_artifact(
        key=key,
        table=[report_row(r) for r in reports],
        description=(f"{current_run_name('backup')}: {ok}/{len(reports)} disks backed up; "
                     f"retention forgot {len(retention.forgotten)} points"
                     + (f"; prune deferred: {retention.prune_deferred}" if retention.prune_deferred else "")),
    )
