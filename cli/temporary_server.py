"""Prefect's temporary API server, for a command told to use one (PATCHDRILL_SERVER=temporary).

With no PREFECT_API_URL, Prefect starts its temporary server as a child process in the command's
process group, so a Ctrl-C at the terminal (which signals the whole foreground group) also
stopped the server, under the run that still had to record its end there: the command then hung
with Prefect's events worker retrying a dead server. Started in a session of its own, the server
outlives the first Ctrl-C long enough for the run to be recorded Cancelled, and still ends with
the command (Prefect stops it at exit; a second signal kills it before exiting at once).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The temporary server's app, as uvicorn's --factory names it (and its command line shows it).
APP_FACTORY = "cli.server_leases:create_app"


def _detached_server_class() -> type:
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from cli.server_leases import server_environment

    class DetachedEphemeralServer(SubprocessASGIServer):
        """Prefect's temporary server, started as Prefect 3.8 starts it, in a new session."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Its own output goes to a log file, not the command's terminal: a server stopped
            # while the interrupted run's last requests were in flight logs their cancelled
            # database sessions, tracebacks that are no user's mistake.
            log = server_log()
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as output:
                return subprocess.Popen(
                    # Prefect's app with its leases kept in files and its expired leases revoked
                    # (cli/server_leases.py): a run killed here does not keep its slots for good.
                    args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                          "--factory", APP_FACTORY, "--host", "127.0.0.1",
                          "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                    env=server_environment({**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                                            "PREFECT__SERVER_FINAL": "1",
                                            **get_current_settings().to_environment_variables(exclude_unset=True)}),
                    stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
                )

    return DetachedEphemeralServer


def server_log() -> Path:
    """Where the temporary servers' own output goes (appended): <PREFECT_HOME>/patchdrill/."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser() / "patchdrill" / "temporary-server.log"


def detach_ephemeral_server() -> None:
    """Make the temporary server Prefect will start (if it starts one) a detached one.

    Prefect looks its temporary server up as SubprocessASGIServer() and gets the instance kept
    for the default port, which is how prefect_test_harness substitutes its own; this does the
    same, and leaves alone a server already started or substituted, or a configured API.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if get_current_settings().api.url or None in SubprocessASGIServer._instances:
        return
    SubprocessASGIServer._instances[None] = _detached_server_class()()


def kill_ephemeral_server() -> None:
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        process = server.server_process
        if process is not None and process.poll() is None:
            process.kill()
            # Reaped before the command exits: a killed server that is still dying would
            # otherwise outlive the command for a moment, orphaned.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
