"""Restore a recovery point: a whole disk or directory, or selected files, delta-aware."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from configs.loader import load_config
from flows.logs import configure
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.restore import RestoreResult
from tasks.backup.run import find_disk
from tasks.backup.tasks import restore_task


@flow(name="restore-run", log_prints=True)
def restore_run(config_path: str, host: str, disk: str, target: str, point: str | None = None,
                force: bool = False, include: list[str] | None = None, policy: str | None = None,
                target_host: str | None = None) -> RestoreResult:
    """Restore host/disk's latest point (or `point`, a time stamp or key) to target, on this
    machine or on target_host (any host of the config, e.g. an isolated DR host).

    An existing target is refused unless force (an empty directory, e.g. a fresh volume, needs
    none); forced, only blocks that differ are written and, for a whole directory point, what
    the point lacks is removed. Entries not restored as recorded are listed in their own artifact.
    """
    configure()
    loaded = load_config(Path(config_path))
    find_disk(loaded.config, host, disk)
    if target_host is not None and target_host not in {h.name for h in loaded.config.hosts}:
        raise BackupError(f"{config_path}: no host {target_host!r} to restore onto")
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    result = restore_task(config_path, host, disk, target, chosen, point=point, force=force, include=include,
                          target_host=target_host)
    summary = {k: v for k, v in vars(result).items() if k != "skipped"} | {"skipped": len(result.skipped)}
    create_table_artifact(key="restore-run", table=[summary],
                          description=f"restored {result.point} to {result.target}")
    if result.skipped:
        # Per entry: what the target did not get as the point recorded it, and why.
        create_table_artifact(key="restore-run-skipped",
                              table=[dict(zip(("entry", "why"), line.split(": ", 1))) for line in result.skipped],
                              description=f"{len(result.skipped)} entries of {result.point} not restored as recorded")
    return result
