"""A running PostgreSQL cluster backed up application-consistently with the shipped example
scripts (examples/postgresql/), restored elsewhere, started, and probed: the copy holds exactly
the committed state at the point.

Everything is real: Debian's PostgreSQL (tests/hosts/postgres.py), its data directory on a
loop-mounted XFS frozen by the backup (snapshot_method: fsfreeze), backup_run and restore_run as
flows on the Prefect test server, and the SQL probe running psql.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml

from configs.models import HostConfig
from configs.probes import SqlProbe
from connectors import connect
from flows.backup import backup_run
from flows.restore import restore_run
from tasks.probes import ProbeContext, run_probe
from tests.hosts.loopfs import loop_xfs
from tests.hosts.postgres import PgCluster, bin_dir, checksum_query, make_cluster, owned_directory, scratch_directory, table_with_rows
from tests.hosts.sshd_server import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "postgresql"
SLOW = 120.0


def _rows(cluster: PgCluster, table: str) -> list[list[str]]:
    return [cluster.sql(checksum_query(table)).split("|")]


@contextmanager
def _hold_uncommitted_insert(cluster: PgCluster) -> Iterator[subprocess.Popen[str]]:
    """A session with rows inserted and not committed, left open: the copy must not show them."""
    with subprocess.Popen(["psql", "-X", "-q", "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres"],
                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as session:
        try:
            assert session.stdin is not None
            session.stdin.write("BEGIN;\nINSERT INTO orders SELECT g, 'uncommitted' FROM generate_series(100001, 100500) AS g;\n")
            session.stdin.flush()
            deadline = time.monotonic() + SLOW
            while cluster.sql("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'") != "1":
                if session.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the uncommitted insert did not happen")
                time.sleep(0.05)
            yield session
        finally:
            if session.poll() is None:
                session.kill()


def test_a_running_cluster_backed_up_restored_and_started_equals_the_point(prefect_server: None) -> None:
    bin_dir()  # fails early where PostgreSQL is missing (skips without root)
    scratch = scratch_directory("patchdrill-pg-backup-")
    with ExitStack() as cleanup:
        # Callbacks run last-in first-out: the servers stop before their file system is unmounted.
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        mount = cleanup.enter_context(loop_xfs(scratch, size=512 << 20))
        mount.chmod(0o755)
        primary = make_cluster(mount / "data", scratch / "run-primary")
        primary.start()
        cleanup.callback(primary.stop)
        table_with_rows(primary, "orders", 2000)
        at_the_point = _rows(primary, "orders")
        session = cleanup.enter_context(_hold_uncommitted_insert(primary))

        pre = (f"PGHOST={shlex.quote(str(primary.socket_dir))} PGPORT={primary.port} PGUSER=postgres "
               f"sh {shlex.quote(str(EXAMPLES / 'pre-backup.sh'))}")
        config = scratch / "fleet.yaml"
        config.write_text(yaml.safe_dump({
            "storage": {"kind": "local", "path": str(scratch / "store")},
            "hosts": [{"name": "pg-1", "transport": "local",
                       "disks": [{"name": "pgdata", "path": str(primary.data), "kind": "directory"}]}],
            "backup_policies": {"app": {"block_size": 65536, "snapshot_method": "fsfreeze", "pre_script": pre}},
        }))
        [report] = backup_run(str(config), policy="app")
        assert (report.status, report.consistency, report.snapshot_method) == ("ok", "application-consistent", "fsfreeze"), report

        # After the point: the held transaction commits and more rows arrive.
        assert session.stdin is not None
        session.communicate("COMMIT;\n", timeout=SLOW)
        primary.sql("INSERT INTO orders SELECT g, 'after the point' FROM generate_series(2001, 2100) AS g")
        now = _rows(primary, "orders")
        assert now != at_the_point and now[0][0] == "2600"

        restored = scratch / "copy"
        restore_run(str(config), "pg-1", "pgdata", str(restored), policy="app")
        subprocess.run(["sh", str(EXAMPLES / "prepare-copy.sh"), str(restored)], check=True)
        copy = PgCluster(bin=primary.bin, data=restored, socket_dir=owned_directory(scratch / "run-copy"),
                         port=free_port("127.0.0.1"))
        copy.start()
        cleanup.callback(copy.stop)
        # It started as after a crash and replayed its WAL, as the manual says a snapshot copy does.
        assert "automatic recovery in progress" in copy.log.read_text()

        host = HostConfig(name="pg-dr", transport="local", address="127.0.0.1")
        ctx = ProbeContext.for_host(host, connect(host))
        fields = {"host": str(copy.socket_dir), "port": copy.port, "user": "postgres", "database": "postgres",
                  "query": checksum_query("orders"), "timeout_seconds": SLOW}
        equal_to_point = run_probe(ctx, SqlProbe(**fields, expect_rows=at_the_point))  # type: ignore[arg-type]
        equal_to_now = run_probe(ctx, SqlProbe(**fields, expect_rows=now))  # type: ignore[arg-type]
        assert equal_to_point.ok, equal_to_point
        assert not equal_to_now.ok and at_the_point[0][1] in (equal_to_now.observed or "")


def test_the_pre_script_refuses_a_wal_directory_on_another_file_system(postgres_cluster: PgCluster) -> None:
    """A snapshot of the data directory alone would miss pg_wal: the point must not be called
    application-consistent, so the script fails; on one file system it checkpoints and passes."""
    scratch = scratch_directory("patchdrill-pg-split-")
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        mount = cleanup.enter_context(loop_xfs(scratch))
        mount.chmod(0o755)
        split = make_cluster(scratch / "data", scratch / "run", waldir=mount / "wal")
        split.start()
        cleanup.callback(split.stop)
        refused = _pre_backup(split)
        assert refused.returncode == 1 and "pg_wal is on another file system" in refused.stderr, refused
    passed = _pre_backup(postgres_cluster)
    assert passed.returncode == 0 and "checkpoint done" in passed.stdout, passed.stderr


def _pre_backup(cluster: PgCluster) -> subprocess.CompletedProcess[str]:
    env = {"PGHOST": str(cluster.socket_dir), "PGPORT": str(cluster.port), "PGUSER": "postgres", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["sh", str(EXAMPLES / "pre-backup.sh")], env=env, capture_output=True, text=True)
