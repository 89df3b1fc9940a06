"""A drill of a real application nobody here wrote: Debian's PostgreSQL.

The primary is a private PostgreSQL cluster whose data directory is a disk of an sshd host;
it is backed up application-consistently (the backup policy's pre-script stops the cluster
cleanly, the post-script starts it again), then written to, so the live database and the
recovery point differ. The drill restores the data directory onto the DR target (another sshd
host), starts a second postmaster on the copy inside the copy's network namespace (the
`command` preset), and the SQL probe, run inside that namespace, must read the row count and
checksum of the table as it was at the point, not as the primary holds it now.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from configs.loader import load_config
from connectors.stores import open_store
from flows.backup import backup_run
from tasks.drill.evidence import DrillEvidence
from tests.hosts.postgres import PgCluster, checksum_query, make_cluster, scratch_directory, table_with_rows
from tests.hosts.sshd import SshdFleet

pytestmark = pytest.mark.e2e


@pytest.fixture
def primary_cluster() -> Iterator[tuple[PgCluster, Path]]:
    root = scratch_directory("patchdrill-pgdrill-")
    cluster = make_cluster(root / "data", root / "run")
    cluster.start()
    try:
        yield cluster, root
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_postgresql_drill_answers_sql_probes_with_the_state_at_the_point(
        prefect_server: None, sshd_fleet: SshdFleet, primary_cluster: tuple[PgCluster, Path]) -> None:
    cluster, root = primary_cluster
    primary, target = sshd_fleet.create("pg-primary"), sshd_fleet.create("pg-dr")
    table_with_rows(cluster, "orders", 500)
    at_point = cluster.sql(checksum_query("orders")).split("|")
    pg_ctl = cluster.bin / "pg_ctl"
    options = f"-p {cluster.port} -k {cluster.socket_dir} -c listen_addresses=127.0.0.1"
    as_pg = "runuser -u postgres --"
    copy_options = "-p 5432 -k {root}/run -c listen_addresses=127.0.0.1"
    cfg = root / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": str(root / "store")},
        "hosts": [primary.host_config().model_dump(exclude_none=True) | {
                      "disks": [{"name": "pgdata", "path": str(cluster.data), "kind": "directory"}]},
                  target.host_config().model_dump(exclude_none=True)],
        "backup_policies": {"default": {
            "block_size": 65536, "snapshot_method": "none",
            # A clean shutdown before the copy, a start after: the point is application-consistent.
            "pre_script": f"{as_pg} {pg_ctl} -D {cluster.data} -m fast -w stop",
            "post_script": f"{as_pg} {pg_ctl} -D {cluster.data} -l {cluster.log} -o '{options}' -w start"}},
        "recovery_plans": {"orders": {
            "rto_target": "PT10M", "rpo_target": "P1D",
            "groups": [{"name": "db", "members": [{
                "host": primary.name, "point": "latest-application-consistent",
                "target": {"host": target.name, "path": str(root / "dr")},
                "primary_writes": True,  # the primary cluster runs on, writing its data directory
                "pre_actions": [{"command": "mkdir -p {root}/run && chown postgres {root}/run"}],
                "app": {"preset": "command",
                        "start": f"{as_pg} {pg_ctl} -D {{disk:pgdata}} -l {{root}}/run/copy.log -o '{copy_options}' -w start",
                        "stop": f"{as_pg} {pg_ctl} -D {{disk:pgdata}} -m fast -w stop",
                        "verify": f"! {as_pg} {pg_ctl} -D {{disk:pgdata}} status"},
                "probes": [
                    {"kind": "tcp", "port": 5432, "address": "127.0.0.1"},
                    {"kind": "sql", "engine": "postgresql", "host": "{root}/run", "port": 5432, "user": "postgres",
                     "database": "postgres", "query": checksum_query("orders"), "expect_rows": [at_point]},
                ],
                "steady_state": [{"kind": "sql", **cluster.probe_fields(), "query": "SELECT 1", "expect": "1"}],
            }]}],
        }},
    }, sort_keys=False))

    backed_up = backup_run(config_path=str(cfg))
    assert [r.consistency for r in backed_up] == ["application-consistent"]
    assert cluster.running
    table_with_rows(cluster, "orders", 600)  # the primary moves on after the point
    assert cluster.sql(checksum_query("orders")).split("|") != at_point

    result = CliRunner().invoke(app, ["drill", "run", "orders", "--config", str(cfg), "--yes"])
    assert result.exit_code == 0, result.output
    loaded = load_config(cfg)
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        [key] = [i.key for i in store.list("evidence/drills/orders/")]
        evidence = DrillEvidence.model_validate_json(store.get(key))
    sql = [p for p in evidence.probes if p.phase == "copy" and p.probe.startswith("sql")]
    assert len(sql) == 1 and sql[0].ok and sql[0].observed is not None and "500" in sql[0].observed, sql
    assert evidence.points[0].consistency == "application-consistent"
    assert evidence.cleanup_verified is True and not (root / "dr").exists()
    assert cluster.running and cluster.sql("SELECT count(*) FROM orders") == "600"  # the primary untouched
