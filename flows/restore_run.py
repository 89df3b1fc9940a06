"""Restore a recovery point: a whole disk or directory, or selected files, delta-aware."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.states import Cancelled, State

from configs.loader import load_config
from flows.logs import configure
from tasks.backup import cancel
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.restore import RestoreResult
from tasks.backup.run import find_disk
from tasks.backup.tasks import restore_task


@flow(name="restore-run", log_prints=True)
def restore_run(config_path: str, host: str, disk: str, target: str, point: str | None = None,
                force: bool = False, include: list[str] | None = None, policy: str | None = None,
                target_host: str | None = None) -> RestoreResult | State:
    """Restore host/disk's latest point (or `point`, a time stamp or key) to target, on this
    machine or on target_host (any host of the config, e.g. an isolated DR host).

    An existing target is refused unless force; forced, only blocks that differ are written.
    Ctrl-C, SIGTERM or a cancellation from the Prefect UI stops it and ends the run Cancelled,
    saying what the target holds: nothing new (a new target is built under a temporary name
    that is removed) or part of the point (an existing target forced in place).
    """
    with cancel.stop_on_signals():
        try:
            return _restore(config_path, host, disk, target, point, force, include, policy, target_host)
        except cancel.Interrupted as exc:
            return Cancelled(message=str(exc))


def _restore(config_path: str, host: str, disk: str, target: str, point: str | None, force: bool,
             include: list[str] | None, policy: str | None, target_host: str | None) -> RestoreResult:
    configure()
    loaded = load_config(Path(config_path))
    find_disk(loaded.config, host, disk)
    if target_host is not None and target_host not in {h.name for h in loaded.config.hosts}:
        raise BackupError(f"{config_path}: no host {target_host!r} to restore onto")
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    result = restore_task(config_path, host, disk, target, chosen, point=point, force=force, include=include,
                          target_host=target_host)
    create_table_artifact(key="restore-run", table=[vars(result)],
                          description=f"restored {result.point} to {result.target}")
    return result
