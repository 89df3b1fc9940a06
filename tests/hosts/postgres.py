"""PostgreSQL test clusters: Debian's postgresql binaries, a private cluster per fixture.

    postgres_cluster   session   PgCluster, running: its own data directory, port and socket
                                 directory in a temporary directory; local socket connections are
                                 trusted, TCP ones (127.0.0.1) need a password (scram-sha-256)

Nothing system-wide is touched: no Debian cluster (pg_createcluster) and no service; initdb and
the server run as the `postgres` user (initdb refuses root) through runuser. Directories live
under /tmp rather than pytest's tmp_path, whose root-only parents the postgres user cannot
traverse. `make_cluster` gives a test a cluster of its own elsewhere (on a loop-mounted file
system, say); `table_with_rows` and `checksum_query` give a table and the query whose answer
states its content.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hosts.sshd_server import free_port

PG_ROOT = Path("/usr/lib/postgresql")
USER = "postgres"


def bin_dir() -> Path:
    """The newest installed server's binaries. Without root the PostgreSQL tests skip (the
    cluster must run as the postgres user); as root `make bootstrap` installs postgresql, so its
    absence is a failed install and fails the test instead of hiding it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a cluster as the postgres user")
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions or shutil.which("runuser") is None:
        pytest.fail("Debian's postgresql is not installed (make bootstrap installs it: apt-get install postgresql)")
    return versions[-1]


def as_postgres(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *map(str, argv)], capture_output=True, text=True, check=check)


def owned_directory(path: Path) -> Path:
    """A directory the postgres user owns (mode 0700, as initdb and the server demand)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, USER, USER)
    path.chmod(0o700)
    return path


def scratch_directory(prefix: str) -> Path:
    """A directory under /tmp whose parents the postgres user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass
class PgCluster:
    bin: Path
    data: Path
    socket_dir: Path
    port: int

    @property
    def log(self) -> Path:
        return self.socket_dir / "server.log"

    def start(self) -> None:
        # listen_addresses: TCP on loopback only, for the password-authenticated connections.
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        done = as_postgres(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "120",
                           "start", check=False)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"postgres on {self.data} did not start: {done.stdout}{done.stderr}\n{tail}")

    def stop(self) -> None:
        as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)

    @property
    def running(self) -> bool:
        return as_postgres(self.bin / "pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL over the trusted socket as the superuser; unaligned output, no headers."""
        done = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                               "-p", str(self.port), "-U", USER, "-d", database, "-c", statement],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"psql on port {self.port}: {done.stderr.strip()}")
        return done.stdout.strip()

    def probe_fields(self, database: str = "postgres") -> dict[str, object]:
        """The connection fields of a SqlProbe reaching this cluster through its socket."""
        return {"engine": "postgresql", "host": str(self.socket_dir), "port": self.port, "user": USER,
                "database": database}


def make_cluster(data: Path, socket_dir: Path, *, waldir: Path | None = None) -> PgCluster:
    """initdb a new cluster in `data` (created, owned by postgres), its WAL in `waldir` when
    given (initdb links pg_wal there); not started."""
    binaries = bin_dir()
    owned_directory(data)
    owned_directory(socket_dir)
    wal = ["--waldir", str(owned_directory(waldir))] if waldir is not None else []
    as_postgres(binaries / "initdb", "-D", data, "-U", USER, "--auth-local=trust", "--auth-host=scram-sha-256",
                "--no-sync", "-E", "UTF8", "--locale=C.UTF-8", *wal)
    return PgCluster(bin=binaries, data=data, socket_dir=socket_dir, port=free_port("127.0.0.1"))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PgCluster]:
    root = scratch_directory("patchdrill-pg-")
    cluster = make_cluster(root / "data", root / "run")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def table_with_rows(cluster: PgCluster, table: str, rows: int, database: str = "postgres") -> None:
    """(Re)create `table` (id, payload) with `rows` rows whose payloads differ."""
    cluster.sql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id integer PRIMARY KEY, payload text NOT NULL); "
                f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, {rows}) AS g", database)


def checksum_query(table: str) -> str:
    """One row: the row count and an md5 over every row in id order (NULL-safe for an empty table)."""
    return (f"SELECT count(*), coalesce(md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)), '') "
            f"FROM {table}")
