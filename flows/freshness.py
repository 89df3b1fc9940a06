"""Freshness check: is every disk's newest recovery point younger than its policy allows?

A backup run cannot report its own absence (a scheduler, a worker or a whole controller that
is down makes no run at all), and the weekly verify reads chunks and comes too seldom, so
staleness is a check of its own: small (it lists point keys, reads no data), scheduled hourly
beside the nightly backups, and run ad hoc with `patchdrill freshness`. Each disk of the selected
hosts whose newest point is older than the policy's `max_point_age`, or that has none, raises
a `patchdrill.backup.stale` alert; the run itself completes (the finding is the alert).
"""


from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from configs.loader import load_config
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.backup import select_work
from flows.logs import configure
from flows.run_form import Names, OptionalName, current_run_name, run_name, selection
from tasks.alerts import raise_alert, stale_point
from tasks.backup.disk import policy_name
from tasks.backup.errors import BackupError
from tasks.backup.freshness import DiskFreshness, newest_points_task
from tasks.backup.policy import policy_from_config
from tasks.rendering import artifact_key


@flow(name="freshness-check", flow_run_name=run_name("freshness", "policy"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def freshness_check(config_path: str = "configs/lab.yaml", hosts: Names = [], groups: Names = [],
                    policy: OptionalName = "") -> list[DiskFreshness]:
    """Alert on every disk whose newest recovery point is older than the policy's max_point_age.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        hosts: Only these hosts; empty for every host (of the groups, if given).
        groups: Only hosts in these groups; empty for every group.
        policy: The backup policy whose max_point_age applies (the one the backups of these hosts run with); empty for the default.
    """
    configure()
    loaded = load_config(Path(config_path))
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    name = policy_name(loaded.config, chosen) or "default"
    if chosen.max_point_age is None:
        raise BackupError(f"{config_path}: backup policy {name} sets no max_point_age: nothing to check against")
    disks = [(h.name, d.name) for h, ds in select_work(loaded.config, config_path, hosts, groups, None) for d in ds]
    newest = newest_points_task(loaded.config.storage, loaded.base_dir, disks)
    now = datetime.now(timezone.utc)
    rows = []
    for host, disk in disks:
        alert = stale_point(host, disk, name, newest[host, disk], chosen.max_point_age, now)
        if alert is not None:
            raise_alert(alert, loaded.config.alerts, loaded.base_dir)
        point = newest[host, disk]
        rows.append(DiskFreshness(host=host, disk=disk, newest_point=point, stale=alert is not None,
                                  age_seconds=None if point is None else (now - point).total_seconds()))
    stale = sum(r.stale for r in rows)
    create_table_artifact(
        key=artifact_key("freshness", selection({"groups": groups, "hosts": hosts}), policy or ""),
        table=[{"host": r.host, "disk": r.disk, "newest point": r.newest_point.isoformat() if r.newest_point else "none",
                "age": "" if r.age_seconds is None else f"{r.age_seconds / 3600:.1f} h",
                "stale": "STALE" if r.stale else "ok"} for r in rows],
        description=f"{current_run_name('freshness')}: {stale}/{len(rows)} disks stale "
                    f"(policy {name} allows {chosen.max_point_age})")
    return rows
