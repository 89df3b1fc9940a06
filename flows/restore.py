"""Restore a recovery point: a whole disk or directory, or selected files, delta-aware."""


from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.states import Cancelled, State

from configs.loader import load_config
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.run_form import Names, OptionalName, current_run_name, run_name
from tasks.backup import cancel
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.restore import RestoreResult
from tasks.backup.disk import find_disk
from tasks.backup.steps import restore_task
from tasks.rendering import artifact_key, human_size


@flow(name="restore-run", log_prints=True, flow_run_name=run_name("restore", "disk"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def restore_run(config_path: str, host: str, disk: str, target: str, point: OptionalName = "",
                force: bool = False, include: Names = [], policy: OptionalName = "",
                target_host: OptionalName = "") -> RestoreResult | State:
    """Restore host/disk's latest point (or `point`, a time stamp or key) to target, on this
    machine or on target_host (any host of the config, e.g. an isolated DR host).

    An existing target is refused unless force (an empty directory, e.g. a fresh volume, needs
    none); forced, only blocks that differ are written and, for a whole directory point, what
    the point lacks is removed. Entries not restored as recorded are listed in their own artifact.
    Ctrl-C, SIGTERM or a cancellation from the Prefect UI stops it and ends the run Cancelled,
    saying what the target holds: nothing new (a new target is built under a temporary name
    that is removed) or part of the point (an existing target forced in place).

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        host: The host whose recovery point is restored.
        disk: The disk (as named in the config) whose recovery point is restored.
        target: Where to write: a file or device for a block disk, a directory for a directory.
        point: A recovery point's time stamp or key; empty for the latest.
        force: Write over an existing target (only the blocks that differ; what the point lacks is removed).
        include: Only these files (paths inside a directory point); empty for everything.
        policy: Backup policy whose repository settings (key, block size) apply; empty for the default.
        target_host: Restore onto this host of the config instead of this machine.
    """
    with cancel.stop_on_signals():
        try:
            return _restore(config_path, host, disk, target, point, force, include, policy, target_host)
        except cancel.Interrupted as exc:
            return Cancelled(message=str(exc))


def _restore(config_path: str, host: str, disk: str, target: str, point: str | None, force: bool,
             include: list[str] | None, policy: str | None, target_host: str | None) -> RestoreResult:
    configure()
    # Read and validated once: the task gets typed models, never the file again.
    loaded = load_config(Path(config_path))
    source_host, _ = find_disk(loaded.config, host, disk)
    onto = {h.name: h for h in loaded.config.hosts}.get(target_host) if target_host is not None else None
    if target_host is not None and onto is None:
        raise BackupError(f"{config_path}: no host {target_host!r} to restore onto")
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    result = restore_task(loaded.config.storage, loaded.base_dir, host, disk, target, chosen, point=point, force=force,
                          include=include, target_host=onto, source_host=source_host)
    key = artifact_key("restore", host, disk)
    row = {**{k: v for k, v in vars(result).items() if k != "skipped"}, "skipped": len(result.skipped),
           "bytes_written": human_size(result.bytes_written), "seconds": f"{result.seconds:.1f} s"}
    create_table_artifact(key=key, table=[row],
                          description=f"{current_run_name('restore')}: restored {result.point} to {result.target}")
    if result.skipped:
        # Per entry: what the target did not get as the point recorded it, and why.
        create_table_artifact(key=f"{key}-skipped",
                              table=[dict(zip(("entry", "why"), line.split(": ", 1))) for line in result.skipped],
                              description=f"{len(result.skipped)} entries of {result.point} not restored as recorded")
    return result
