"""Which Prefect API a command's flow runs report to, so that ad-hoc commands start at once.

Prefect's temporary API costs every command seconds to start (its database, its app) before a
flow can begin. A command therefore runs its flows on, in this order:

1. the server PREFECT_API_URL names (environment or Prefect profile). If it does not answer,
   the command says so in one line and exits 1: a configured server is where its user expects
   to find the run, so there is no silent fallback;
2. the server `make server` runs, which records itself (`record_lab_server`) while it is up,
   so its UI shows the run in its history;
3. patchdrill's background server (cli/server_daemon.py): found through its state file, or
   started on first use and left running for the commands after it. It stops by itself after
   PATCHDRILL_SERVER_IDLE_MINUTES (15) without a request; `patchdrill server status|stop`.

PATCHDRILL_SERVER=temporary keeps the old way, for a run that must leave nothing behind: Prefect's
temporary API, started for this command and ended with it.

Everything lives under <PREFECT_HOME>/patchdrill/: the background server's own PREFECT_HOME
(its SQLite database), its state file (pid, port, URL), its log and the lock that makes
commands started together share one start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cli import warm
from cli.common import fail, notice
from cli.server_leases import server_environment

MODE_ENV = "PATCHDRILL_SERVER"
IDLE_ENV = "PATCHDRILL_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 15.0
#: set while a run reports to the background server: nobody watches it, so no run may pause on it
PRIVATE_API_ENV = "PATCHDRILL_PRIVATE_API"
#: the same knob Prefect's temporary API reads (cli/app.py gives it 120 s)
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
HEALTH_TIMEOUT_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 20.0
DAEMON_MODULE = "cli.server_daemon"


class ApiUnavailable(RuntimeError):
    """No Prefect API to run on; the message is the one line the command prints."""


def patchdrill_dir() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser() / "patchdrill"


def healthy(url: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


_read_json = warm.read_state


_running = warm.alive


# --------------------------------------------------------------------------- `make server`'s record


def _lab_record() -> Path:
    return patchdrill_dir() / "lab-server.json"


def record_lab_server(url: str, pid: int) -> None:
    from cli.server_daemon import write_state

    _lab_record().parent.mkdir(parents=True, exist_ok=True)
    write_state(_lab_record(), {"url": url, "pid": pid})


def forget_lab_server(pid: int) -> None:
    record = _read_json(_lab_record())
    if record is not None and record.get("pid") == pid:
        _lab_record().unlink(missing_ok=True)


def lab_server_url() -> str | None:
    record = _read_json(_lab_record())
    if record is None or not _running(int(record.get("pid", 0))) or not healthy(str(record.get("url"))):
        return None
    return str(record["url"])


# --------------------------------------------------------------------------- the background server


@dataclass(frozen=True)
class BackgroundServer:
    """Where the background server keeps its files, and what a command can do with it."""

    root: Path

    @classmethod
    def default(cls) -> "BackgroundServer":
        return cls(patchdrill_dir() / "server")

    @property
    def state_file(self) -> Path:
        return self.root / "server.json"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def state(self) -> dict[str, Any] | None:
        """The state of a server that is running; a state file left by a dead one is removed."""
        state = _read_json(self.state_file)
        if state is None:
            return None
        if not _running(int(state.get("pid", 0)), DAEMON_MODULE):
            self.state_file.unlink(missing_ok=True)
            return None
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One command at a time checks and starts the server: two started together share one."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def url(self) -> str:
        """The running server's API URL, starting the server first when none runs."""
        timeout = float(os.environ.get(STARTUP_TIMEOUT_ENV) or 120)
        with self._locked():
            state = self.state()
            if state is not None:
                self._wait_healthy(state, None, timeout)
                return str(state["url"])
            return self._start(timeout)

    def _start(self, timeout: float) -> str:
        idle = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_MINUTES)
        self.state_file.unlink(missing_ok=True)
        # Leases in files under its PREFECT_HOME (cli/server_leases.py): they outlive the server.
        env = server_environment({key: value for key, value in os.environ.items()
                                  if not key.startswith("PREFECT_API_URL")})
        env.update(PREFECT_HOME=str(self.root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false")
        with open(self.log_file, "ab") as log:
            # A session of its own: a Ctrl-C at the terminal stops the command, not the server
            # the next command will use; stdin closed, output to its log.
            process = subprocess.Popen(
                [sys.executable, "-m", DAEMON_MODULE, "--state-file", str(self.state_file), "--idle-minutes", f"{idle:g}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        notice("server.starting", f"starting patchdrill's background Prefect server (pid {process.pid}; it stops "
               f"after {idle:g} min idle, `patchdrill server stop` stops it now)", pid=process.pid, idle_minutes=idle,
               log=str(self.log_file))
        try:
            state = self._wait_healthy(None, process, timeout)
        except BaseException:
            _kill_group(process.pid)
            process.wait()
            self.state_file.unlink(missing_ok=True)
            raise
        return str(state["url"])

    def _wait_healthy(self, state: dict[str, Any] | None, process: subprocess.Popen[bytes] | None,
                      timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if process is not None:
                if process.poll() is not None:
                    raise ApiUnavailable(f"patchdrill's background Prefect server exited ({process.returncode}) "
                                         f"before it answered; its log: {self.log_file}")
                state = _read_json(self.state_file)
                if state is not None and state.get("pid") != process.pid:
                    state = None
            if state is not None and healthy(str(state["url"])):
                return state
            if state is not None and process is None and not _running(int(state["pid"]), DAEMON_MODULE):
                raise ApiUnavailable(f"patchdrill's background Prefect server (pid {state['pid']}) exited while "
                                     f"starting; its log: {self.log_file}")
            if time.monotonic() > deadline:
                raise ApiUnavailable(
                    f"patchdrill's background Prefect server did not answer within {timeout:g} s (raise "
                    f"{STARTUP_TIMEOUT_ENV}, or point PREFECT_API_URL at a running server: `make server`); "
                    f"its log: {self.log_file}")
            time.sleep(0.1)

    def stop(self) -> dict[str, Any] | None:
        """Stop the running server (SIGTERM, then SIGKILL after a grace time) and the warm process
        beside it; the server's last state."""
        warm.stop()
        with self._locked():
            state = self.state()
            if state is None:
                return None
            pid = int(state["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _running(pid):
                _kill_group(pid)
            self.state_file.unlink(missing_ok=True)
            return state


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- choosing


def choose_api() -> tuple[str, str | None]:
    """(where, URL): "configured", "lab" or "background" with the API's URL, or ("temporary", None)."""
    from prefect.settings import get_current_settings

    configured = get_current_settings().api.url
    if configured:
        if not healthy(configured):
            raise ApiUnavailable(f"the Prefect server at {configured} (PREFECT_API_URL) does not answer: start it, "
                                 "or unset PREFECT_API_URL to run on patchdrill's background server")
        return "configured", configured
    mode = os.environ.get(MODE_ENV, "background")
    if mode == "temporary":
        return "temporary", None
    if mode != "background":
        raise ApiUnavailable(f"{MODE_ENV}={mode!r}: expected 'background' or 'temporary'")
    lab = lab_server_url()
    if lab is not None:
        return "lab", lab
    return "background", BackgroundServer.default().url()


@contextlib.contextmanager
def using_api() -> Iterator[str]:
    """Run the flows inside on the chosen Prefect API (see the module's docstring); yields which."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from cli.temporary_server import detach_ephemeral_server

    try:
        where, url = choose_api()
    except ApiUnavailable as exc:
        fail(str(exc))
    if url is None or where == "configured":
        if where == "temporary":
            detach_ephemeral_server()
        yield where
        return
    private = where == "background"
    previous = os.environ.get(PRIVATE_API_ENV)
    if private:
        os.environ[PRIVATE_API_ENV] = "1"
    # Heartbeats let a server's automations tell a crashed run; nobody sets one up on the private
    # server, and a synchronous flow waits up to a second for its heartbeat thread at the end.
    updates: dict[Any, Any] = {PREFECT_API_URL: url, **({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if private else {})}
    try:
        with temporary_settings(updates=updates):
            yield where
    finally:
        if private:
            # After the run, not before: its imports would compete with this command for the CPU.
            warm.start(BackgroundServer.default().state_file)
            if previous is None:
                os.environ.pop(PRIVATE_API_ENV, None)
            else:
                os.environ[PRIVATE_API_ENV] = previous
