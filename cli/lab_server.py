"""`make server`: a local Prefect stack for the embedded lab, up with one command, down with Ctrl-C.

Starts the Prefect server (API, UI and its services, the scheduler among them) on one port,
creates the `patchdrill` process work pool, deploys deployments/prefect.yaml, starts a worker,
and makes the lab's sample data, so every shipped deployment runs from the UI with its defaults.
Ctrl-C (SIGINT) or SIGTERM stops the workers, then the server, then its database, and waits
for each.

`--db postgres` gives the server a private PostgreSQL cluster (cli/lab_postgres.py) instead of
its SQLite file; `--workers N` starts N workers on the one pool, which share its runs as workers
on several machines would.

The UI is told the API's address explicitly (PREFECT_UI_API_URL): left to itself it follows a
PREFECT_API_URL from the user's profile, which may name another port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from cli import lab_apt
from cli.api import forget_lab_server, record_lab_server
from cli.demo import install_notes_app, make_sample_data
from cli.lab_postgres import LabPostgres, PostgresFailed
from cli.server_leases import server_environment

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
LAB = REPO / ".lab"
WORK_POOL = "patchdrill"
STARTUP_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 20.0


class StackFailed(RuntimeError):
    """A step of bringing the stack up failed; the message says which and shows its output."""


def stack_environment(port: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every process of the stack shares: one port for the API and the UI."""
    api_url = f"http://127.0.0.1:{port}/api"
    # The server keeps its leases in files (cli/server_leases.py): a slot whose holder was killed
    # comes back once its lease expires, across a restart of the server too.
    return {
        **server_environment(base if base is not None else os.environ),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PATCHDRILL_HOME": str(REPO),
        # The lab host is this machine: its package manager is an empty sandbox (cli/lab_apt.py),
        # so a lab patch run assesses and "installs" without touching the machine's packages.
        **lab_apt.environment(),
    }


def make_lab_data() -> None:
    """The sample disks lab.yaml names, made once with the demo's generator so backups have work."""
    if not (LAB / "disk.img").exists() or not (LAB / "sample").is_dir():
        make_sample_data(random.Random(7))
    if not (LAB / "notes-app" / "data").is_dir():
        install_notes_app()


class LabStack:
    """The server and worker processes; each in its own session so a terminal's Ctrl-C reaches
    only this supervisor, which then stops them in order."""

    def __init__(self, port: int, log_dir: Path, env: dict[str, str] | None = None, *,
                 database: LabPostgres | None = None, workers: int = 1, worker_limit: int | None = None) -> None:
        self.port = port
        self.log_dir = log_dir
        self.env = stack_environment(port, env)
        self.database = database
        self.workers = workers
        self.worker_limit = worker_limit
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self._spawn_command(name, [sys.executable, "-m", "prefect", *args], env=env)

    def _spawn_command(self, name: str, command: list[str], *, env: dict[str, str] | None = None,
                       cwd: Path = REPO, **popen: Any) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(command, cwd=cwd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, **popen)
        log.close()
        self.processes.append(process)
        return process

    def _server_environment(self) -> dict[str, str]:
        """The server's own environment: the database URL (with its password) goes to it alone."""
        if self.database is None:
            return self.env
        binaries = self.database.prepare()
        log = self.log_dir / "postgres.log"
        postgres = self._spawn_command("postgres", self.database.command(binaries), env=self.env,
                                       cwd=self.database.root, **self.database.as_service_user)
        self.database.wait_ready(binaries, postgres, log)
        return {**self.env, "PREFECT_API_DATABASE_CONNECTION_URL": self.database.connection_url()}

    def _prefect(self, *args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=STARTUP_TIMEOUT_SECONDS)
        if done.returncode != 0:
            raise StackFailed(f"prefect {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")

    def _wait_healthy(self, server: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise StackFailed(f"the Prefect server exited ({server.returncode}); see {self.log_dir / 'server.log'}")
            try:
                if httpx.get(f"{self.ui_url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackFailed(f"the Prefect server did not answer on port {self.port} within {STARTUP_TIMEOUT_SECONDS:.0f} s")

    def _sweep_slots(self, server_env: dict[str, str]) -> None:
        """Slots left busy from before leases were kept in files: once per database, with the
        server's environment (its database), and its repossessor then returns them
        (cli/server_leases.py). Not a process of the stack: it ends, and a failure is only logged."""
        with (self.log_dir / "slot-sweep.log").open("wb") as log, contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-m", "cli.server_leases"], cwd=REPO, env=server_env, stdout=log,
                           stderr=subprocess.STDOUT, timeout=STARTUP_TIMEOUT_SECONDS, check=False)

    def start(self) -> None:
        _check_port_free(self.port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        lab_apt.make_lab_apt_root()
        make_lab_data()
        try:
            server_env = self._server_environment()
        except PostgresFailed as exc:
            raise StackFailed(str(exc)) from None
        server = self._spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                             env=server_env)
        self._wait_healthy(server)
        self._sweep_slots(server_env)
        self._prefect("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
        self._prefect("deploy", "--all", "--prefect-file", str(PREFECT_YAML))
        limit = ["--limit", str(self.worker_limit)] if self.worker_limit else []
        for number in range(1, self.workers + 1):
            # The first worker keeps the name and log of a one-worker stack.
            suffix = "" if number == 1 else f"-{number}"
            self._spawn(f"worker{suffix}", "worker", "start", "--pool", WORK_POOL, "--name", worker_name(number),
                        *limit)
        # Found by ad-hoc `patchdrill` commands (cli/api.py), so their runs show in this UI too.
        record_lab_server(self.env["PREFECT_API_URL"], server.pid)

    def stop(self) -> None:
        """Workers first (they may be running flows), then the server, then its database; each
        whole process group."""
        for process in reversed(self.processes):
            forget_lab_server(process.pid)
            _stop_group(process)
        self.processes.clear()


def worker_name(number: int) -> str:
    """What the UI shows as the worker and what each run it takes carries as its
    `prefect.worker.name` label."""
    return f"{WORK_POOL}-worker-{number}"


def _check_port_free(port: int) -> None:
    """Refuse a busy port up front: a health check could otherwise be answered by whatever
    already listens there (another Prefect server, say) and the stack would talk to it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StackFailed(f"port {port} is in use on 127.0.0.1: stop what listens there or choose "
                              "another with PORT=...") from None


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Children that outlived their leader (uvicorn workers, flow runs) share its group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 4200))
    parser.add_argument("--log-dir", type=Path, default=LAB / "server")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the server's database: its SQLite file, or a private PostgreSQL cluster")
    parser.add_argument("--db-dir", type=Path, default=LAB / "postgres",
                        help="the PostgreSQL cluster's directory (data, socket, password)")
    parser.add_argument("--db-port", type=int, default=0, help="the PostgreSQL port (default: a free one)")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="workers started on the patchdrill pool")
    parser.add_argument("--worker-limit", type=_positive, default=None,
                        help="flow runs each worker runs at once (default: no limit)")
    args = parser.parse_args(argv)
    database = None
    if args.db == "postgres":
        database = LabPostgres(args.db_dir.resolve(), args.db_port or _free_port())
    stack = LabStack(args.port, args.log_dir, database=database, workers=args.workers,
                     worker_limit=args.worker_limit)

    def interrupted(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        stack.start()
        print(f"Prefect UI: {stack.ui_url}  (API {stack.env['PREFECT_API_URL']}; logs in {args.log_dir})", flush=True)
        if database is not None:
            print(f"Database: PostgreSQL on 127.0.0.1:{database.port}, cluster in {database.root}", flush=True)
        if args.workers > 1:
            print(f"Workers: {', '.join(worker_name(n) for n in range(1, args.workers + 1))} on pool {WORK_POOL}",
                  flush=True)
        print(f"In another shell: export PREFECT_API_URL={stack.env['PREFECT_API_URL']}", flush=True)
        print("Ctrl-C stops the workers, the server and its database.", flush=True)
        while all(p.poll() is None for p in stack.processes):
            time.sleep(1)
        print("a process of the stack exited; stopping the rest", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("stopping the workers, the server and its database", flush=True)
        return 0
    except StackFailed as exc:
        print(f"make server: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
