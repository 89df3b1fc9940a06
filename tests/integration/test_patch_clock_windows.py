"""The clock check of a Windows host, through pywinrm and the WS-Management test host.

No Windows runs here: what PowerShell would print is simulated behind the test host (see
tests/hosts/wsman_sim.py): the time command answers with this machine's clock plus an offset,
and time_sync.ps1 (matched on its exact shipped text, which tests/unit/test_powershell_parses.py
parses) answers as w32time would. What is real: the commands travel over WinRM as the product
sends them, and the product parses and judges the answers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from configs.patch_safety import ClockCheck
from tasks.patching.safety.clock import WINDOWS_SCRIPT, WINDOWS_TIME, clock_task
from tests.hosts.winrm import HostFactory
from tests.hosts.wsman_sim import SimResult, script_handler

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("offset", "source", "fails"), [
    (0.0, "time.windows.com,0x9", ""),
    (-90.0, "Local CMOS Clock", "behind the controller's"),
])
def test_a_windows_hosts_clock_and_w32time_state_are_read_over_winrm(
        wsman_host_factory: HostFactory, tmp_path: Path, offset: float, source: str, fails: str) -> None:
    host = wsman_host_factory(scheme="https", auth=("ntlm",))

    def now(script: str, args: list[str]) -> SimResult | None:
        if script.strip() != WINDOWS_TIME:
            return None
        return SimResult(stdout=f"{int((time.time() + offset) * 1000)}\r\n")

    state = {"service": "w32time", "status": "Running", "source": source,
             "last_sync": "unspecified" if "CMOS" in source else "12/2/2026 3:04:05 AM"}
    host.handlers.insert(0, now)
    host.handlers.insert(0, script_handler(WINDOWS_SCRIPT, lambda _: SimResult(stdout=json.dumps(state) + "\r\n")))
    config = host.host_config("clock-win", connect_timeout=60)

    reading = clock_task.fn(config, tmp_path, ClockCheck(max_skew_seconds=5), "reboot")

    assert reading.skew_seconds is not None
    assert abs(reading.skew_seconds - offset) <= reading.uncertainty_seconds + 0.001
    assert reading.sync.service == "w32time" and reading.sync.active
    assert reading.sync.synchronized is (not fails)
    assert (fails in reading.failure) if fails else reading.failure == ""
