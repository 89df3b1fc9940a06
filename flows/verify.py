"""Verify the repository: read back every chunk (or a sample) the points name."""


from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from configs.loader import load_config
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.run_form import OptionalName, current_run_name, run_name
from tasks.rendering import artifact_key
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config
from tasks.backup.steps import verify_task
from tasks.backup.repo.verify import VerifyReport


class RepositoryDamaged(BackupError):
    """Verify found missing or corrupt chunks; `report` says which, and which points name them."""

    report: VerifyReport


@flow(name="verify-run", log_prints=True, flow_run_name=run_name("verify", "disk"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def verify_run(config_path: str = "configs/lab.yaml", host: OptionalName = "", disk: OptionalName = "",
               sample_percent: float = 100.0, policy: OptionalName = "") -> VerifyReport:
    """Check chunks against their ids; the run fails (and the artifact lists them) on any damage.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        host: Only this host's recovery points; empty for every host.
        disk: Only this disk's recovery points; empty for every disk.
        sample_percent: Share of the chunks read back, in percent (100 reads them all).
        policy: Backup policy whose repository settings (key, block size) apply; empty for the default.
    """
    configure()
    if not 0 < sample_percent <= 100:
        raise BackupError(f"sample_percent must be in (0, 100], not {sample_percent}")
    # Read and validated once: the task gets typed models, never the file again.
    loaded = load_config(Path(config_path))
    chosen = policy_from_config(loaded.config.backup_policies, policy, source=config_path)
    report = verify_task(loaded.config.storage, loaded.base_dir, chosen, host=host, disk=disk,
                         sample_percent=sample_percent)
    rows = ([{"chunk": c, "problem": "missing", "points": ", ".join(p)} for c, p in report.missing.items()]
            + [{"chunk": c, "problem": "corrupt", "points": ", ".join(p)} for c, p in report.corrupt.items()]
            + [{"chunk": "(map)", "problem": why, "points": key} for key, why in report.broken_points.items()])
    create_table_artifact(key=artifact_key("verify", host or "all", disk or ""),
                          table=rows or [{"chunk": "-", "problem": "none", "points": report.summary()}],
                          description=f"{current_run_name('verify')}: {report.summary()}")
    if not report.ok:
        # verify() has recorded the damage: the next backup rewrites what the disks still hold.
        damaged = RepositoryDamaged(f"{report.summary()}; recorded for the next backup and `patchdrill repair`")
        # An attribute, not an __init__ argument: the exception still pickles with Prefect's results.
        damaged.report = report
        raise damaged
    return report
