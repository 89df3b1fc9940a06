"""Prune the repository: forget the selected hosts' points the policy no longer keeps, then delete
the data no point names. The same retention step a backup run ends with, for its hosts."""


from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from configs.loader import load_config
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.run_form import Names, OptionalName, current_run_name, run_name, selection
from tasks.backup.errors import BackupError, RepositoryBusy
from tasks.backup.policy import policy_from_config
from tasks.backup.steps import RetentionSummary, retention_task
from tasks.rendering import artifact_key, human_size


@flow(name="prune-run", log_prints=True, flow_run_name=run_name("prune", "policy"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def prune_run(config_path: str = "configs/lab.yaml", hosts: Names = [], groups: Names = [],
              policy: OptionalName = "", dry_run: bool = False) -> RetentionSummary:
    """Apply the policy's keep rules to the selected hosts' points, then prune unreferenced data.

    Fails (deleting nothing) when a backup holds the repository: prune never runs beside one.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        hosts: Only these hosts' points; empty for every host of the config (of the groups, if given).
        groups: Only hosts in these groups; empty for every group.
        policy: Backup policy whose keep rules (and key) apply; empty for the default.
        dry_run: Show what would be forgotten and deleted; delete nothing.
    """
    configure()
    # Read and validated once: the task gets typed models, never the file again.
    loaded = load_config(Path(config_path))
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    try:
        selected = sorted(h.name for h in loaded.config.select(groups, hosts))
    except KeyError as exc:
        raise BackupError(f"{config_path}: {exc.args[0]}") from None
    summary = retention_task(loaded.config.storage, loaded.base_dir, chosen, selected, dry_run=dry_run,
                             prune_data="always", host_configs=list(loaded.config.hosts))
    if summary.prune_deferred is not None:
        raise RepositoryBusy(summary.prune_deferred)
    pruned = summary.prune
    create_table_artifact(
        key=artifact_key("prune", selection({"groups": groups, "hosts": hosts}), policy or ""),
        table=[{"forgotten": key} for key in summary.forgotten] or [{"forgotten": "-"}],
        description=(f"{current_run_name('prune')}: {'would forget' if dry_run else 'forgot'} "
                     f"{len(summary.forgotten)} points"
                     + (f"; {'would free' if dry_run else 'freed'} {human_size(pruned.bytes_freed)}" if pruned else "")))
    return summary
