"""PostgreSQL for `make server DB=postgres`: a private cluster of Debian's postgresql, its data
under .lab/postgres, on a port of its own, run in the foreground beside the Prefect server.

Nothing system-wide is assumed or touched: no Debian cluster (pg_createcluster), no service,
no system port. The server binaries come from /usr/lib/postgresql/<newest>/bin (`make
bootstrap` installs the package). PostgreSQL refuses to run as root, so under root the cluster
belongs to Debian's `postgres` account and its processes switch to it; as any other user they
run as that user.

The Prefect server reaches it over TCP on 127.0.0.1 as role `patchdrill` with a password
(scram-sha-256) generated on first start and kept in .lab/postgres/password (mode 0600), as it
would reach a database on another machine; psql's own set-up calls use the cluster's private
socket directory (mode 0700), where local connections are trusted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

PG_ROOT = Path("/usr/lib/postgresql")
# Debian's account for PostgreSQL: the cluster's owner when this runs as root.
SERVICE_USER = "postgres"
ROLE = "patchdrill"
DATABASE = "prefect"
READY_TIMEOUT_SECONDS = 120.0


class PostgresFailed(RuntimeError):
    """The cluster could not be made or started; the message says why and what to do."""


def server_binaries(root: Path = PG_ROOT) -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    versions = sorted((p for p in root.glob("*/bin") if (p / "initdb").exists() and (p / "postgres").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        raise PostgresFailed(f"Debian's postgresql is not installed (no server under {root}): "
                             "run `make bootstrap`, or apt-get install postgresql")
    return versions[-1]


@dataclass
class LabPostgres:
    """One private cluster: `root` holds data/, run/ (its socket) and the role's password."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def as_service_user(self) -> dict[str, Any]:
        """Popen arguments that run a PostgreSQL binary as the cluster's owner."""
        if os.geteuid() != 0:
            return {}
        return {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []}

    def connection_url(self) -> str:
        """The SQLAlchemy URL Prefect's server takes (asyncpg is one of Prefect's own dependencies).
        It holds the password: hand it to the server's environment only, never to a log."""
        password = quote(self.password_file.read_text().strip(), safe="")
        return f"postgresql+asyncpg://{ROLE}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def prepare(self) -> Path:
        """Make the cluster on first use (initdb); returns the binaries to start it with."""
        binaries = server_binaries()
        if (self.data / "PG_VERSION").exists() and not self.password_file.is_file():
            raise PostgresFailed(f"{self.password_file} is missing, so the server cannot log in to the cluster in "
                                 f"{self.data}: restore it, or remove {self.root} to start with an empty database")
        self.root.mkdir(parents=True, exist_ok=True)
        self._owned_by_service_user(self.socket_dir)
        if not (self.data / "PG_VERSION").exists():
            self._initdb(binaries)
        return binaries

    def command(self, binaries: Path) -> list[str]:
        """The server in the foreground, so the stack stops it as it stops its other processes."""
        return [str(binaries / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"]

    def wait_ready(self, binaries: Path, server: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise PostgresFailed(f"PostgreSQL exited ({server.returncode}); see {log}")
            ready = subprocess.run([str(binaries / "pg_isready"), "-q", "-h", str(self.socket_dir), "-p", str(self.port),
                                    "-U", ROLE, "-d", "postgres"],
                                   capture_output=True)
            if ready.returncode == 0:
                self._ensure_database(binaries)
                return
            time.sleep(0.3)
        raise PostgresFailed(f"PostgreSQL did not accept connections on port {self.port} within "
                             f"{READY_TIMEOUT_SECONDS:.0f} s; see {log}")

    def _psql(self, binaries: Path, statement: str) -> str:
        done = subprocess.run([str(binaries / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                               "-h", str(self.socket_dir), "-p", str(self.port), "-U", ROLE, "-d", "postgres",
                               "-c", statement], capture_output=True, text=True)
        if done.returncode != 0:
            raise PostgresFailed(f"psql on port {self.port}: {done.stderr.strip()}")
        return done.stdout.strip()

    def _ensure_database(self, binaries: Path) -> None:
        if self._psql(binaries, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
            self._psql(binaries, f"CREATE DATABASE {DATABASE}")

    def _initdb(self, binaries: Path) -> None:
        self._owned_by_service_user(self.data)
        password = secrets.token_urlsafe(24)
        self.password_file.touch(mode=0o600)
        self.password_file.write_text(password + "\n")
        # initdb reads the password from a file its own user can read; removed right after.
        pwfile = self.socket_dir / "initdb-password"
        pwfile.touch(mode=0o600)
        pwfile.write_text(password + "\n")
        if self.as_service_user:
            shutil.chown(pwfile, SERVICE_USER, SERVICE_USER)
        try:
            done = subprocess.run([str(binaries / "initdb"), "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}",
                                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                                   "--locale=C.UTF-8"],
                                  capture_output=True, text=True, cwd=self.root, **self.as_service_user)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise PostgresFailed(f"initdb {self.data} failed: {(done.stdout + done.stderr).strip()[-2000:]}")

    def _owned_by_service_user(self, directory: Path) -> None:
        """A directory the cluster's owner holds alone (mode 0700, as initdb and the server demand)."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        if not self.as_service_user:
            return
        shutil.chown(directory, SERVICE_USER, SERVICE_USER)
        reach = subprocess.run(["test", "-x", str(directory)], **self.as_service_user)
        if reach.returncode != 0:
            raise PostgresFailed(f"the {SERVICE_USER} user cannot reach {directory}: a parent directory is not "
                                 "searchable by others (chmod o+x it, or keep the repository elsewhere)")
