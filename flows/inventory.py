"""Fleet reachability: can we reach every host, and who is it since boot?

The smallest whole flow: a task per host, a table artifact, logs in the UI. Runs from the
CLI (`patchdrill hosts ping` calls the same task logic directly), a deployment or the UI.
"""


from pathlib import Path

import structlog
from prefect import flow, task
from prefect.artifacts import create_table_artifact

from configs.loader import load_config
from configs.models import HostConfig
from flows.alerting import ALERT_ON_CRASH, ALERT_ON_FAILURE
from flows.logs import configure
from flows.run_form import Names, current_run_name, run_name, selection
from tasks.rendering import artifact_key
from tasks.inventory import PingResult, ping_host

log = structlog.stdlib.get_logger("patchdrill.inventory")


@task(name="ping-host", task_run_name="ping {host.name}")
def ping_task(host: HostConfig, base_dir: Path) -> PingResult:
    row = ping_host(host, base_dir)
    if row.reachable:
        log.info("host up", host=row.host, os=row.os, boot_id=row.boot_id, rtt_ms=row.rtt_ms)
    else:
        log.warning("host unreachable", host=row.host, error=row.error)
    return row


@flow(name="inventory-check", log_prints=True, flow_run_name=run_name("inventory"),
      on_failure=ALERT_ON_FAILURE, on_crashed=ALERT_ON_CRASH)
def inventory_check(config_path: str = "configs/lab.yaml", groups: Names = []) -> list[PingResult]:
    """Ping every selected host in parallel and publish a reachability table.

    Args:
        config_path: The fleet's YAML config, relative to the repository (or absolute).
        groups: Only hosts in these groups; empty for every host.
    """
    configure()
    loaded = load_config(Path(config_path))
    hosts = loaded.config.select(groups)
    futures = [ping_task.submit(h, loaded.base_dir) for h in hosts]
    rows = [f.result() for f in futures]
    scope = selection({"groups": groups})
    create_table_artifact(
        key=artifact_key("inventory", scope),
        table=[r.model_dump(mode="json") for r in rows],
        description=f"{current_run_name('inventory')}: {sum(r.reachable for r in rows)}/{len(rows)} hosts reachable",
    )
    return rows
