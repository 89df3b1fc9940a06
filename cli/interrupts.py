"""Ctrl-C and SIGTERM for commands that run a flow in this process.

The flows stop their own work on a signal (tasks/backup/cancel.py); what is left here belongs
to the command line: the Prefect API the run reports to (cli/api.py). A background or
configured server outlives the command by design; Prefect's temporary server
(cli/temporary_server.py) must not.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from cli.api import using_api
from cli.temporary_server import kill_ephemeral_server
from tasks.backup import cancel


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Run a flow so that the first SIGINT/SIGTERM stops it cleanly and the second exits at once,
    leaving no temporary Prefect server behind either way."""
    with using_api(), cancel.stop_on_signals(), cancel.on_hard_exit(kill_ephemeral_server):
        yield
