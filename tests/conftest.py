"""Shared fixtures: each real test host lives in its own module under tests/hosts/."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

# Keep test processes away from the user's Prefect home and the network.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Tests press Ctrl-C (SIGINT) on what they start, as a terminal does. A suite started in the
# background (`make test &` in a script, nohup) inherits SIGINT ignored, and an ignored signal
# stays ignored across exec: every server it starts would shrug off that Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["tests.hosts.sshd", "tests.hosts.winrm", "tests.hosts.azurite", "tests.hosts.aptlab",
                  "tests.hosts.loopfs", "tests.hosts.postgres", "tests.hosts.webhook", "tests.hosts.lab_stack",
                  "tests.hosts.patch_host", "tests.scheduling"]


@pytest.fixture(autouse=True)
def _fresh_stop_token() -> Iterator[None]:
    """Each test starts with no stop asked for: the stop token (tasks/backup/cancel.py) is the
    process's, and a flow run in a test's thread (where signals cannot be owned, so nothing
    resets it) may have been stopped on purpose, by a cancellation it noticed."""
    from tasks.backup import cancel

    cancel.reset()
    yield
    cancel.reset()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real temporary Prefect server (SQLite) for flows run in tests.

    Heartbeats are off here: a synchronous flow call otherwise waits ~1.2 s on its heartbeat
    thread. Production keeps them on (they detect crashed runs).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with prefect_test_harness(server_startup_timeout=120):
            yield
