"""A concurrency slot whose holder was killed comes back; a live holder's slot does not
(cli/server_leases.py, tasks/patching/slots.py).

Everything is real: each run is a process of its own (tests/hosts/slot_holder.py) taking the slot
through `exclusive()` on the Prefect server a command would use (Prefect's temporary API or
patchdrill's background server, both started by patchdrill's code), with a PREFECT_HOME per
test (its SQLite database and its lease files). A holder is killed with SIGKILL and its server
with it, as a crash or a reboot would; the next run starts a new server on the same home.

The lease is the shortest the server accepts (60 s) and the revocation looks every 2 s, so a
test waits about a minute; no test asserts how long anything took: a run either gets the slot
or waits out its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks.patching.slots import host_limit_name

pytestmark = pytest.mark.e2e
PATCHDRILL = Path(sys.executable).with_name("patchdrill")
HANG_GUARD = 300.0
LEASE_SECONDS = 60.0  # the least the server accepts
LIMIT = host_limit_name("lab-local")


@dataclass
class Runs:
    """The runs a test started, and the servers they reported; all killed at the end."""

    home: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server_pids: list[int] = field(default_factory=list)

    def env(self, mode: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "PATCHDRILL_SERVER"))}
        env.update(PREFECT_HOME=str(self.home), PATCHDRILL_SERVER=mode, PATCHDRILL_WARM="0",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="2",
                   **extra)
        return env

    def start(self, name: str, action: str, mode: str, timeout_seconds: float, **extra: str) -> subprocess.Popen[bytes]:
        with open(self.home / f"{name}.out", "wb") as out, open(self.home / f"{name}.err", "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.hosts.slot_holder", action, LIMIT,
                 "--lease-seconds", f"{LEASE_SECONDS:g}", "--timeout-seconds", f"{timeout_seconds:g}"],
                cwd=Path(__file__).resolve().parents[2], env=self.env(mode, **extra), stdout=out, stderr=err,
                start_new_session=True)
        self.processes.append(process)
        return process

    def steps(self, name: str) -> list[dict[str, Any]]:
        lines = (self.home / f"{name}.out").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def held(self, name: str, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        """Once the holder holds the slot (and its server has stored the acquisition): its step."""
        deadline = time.monotonic() + HANG_GUARD
        while not (held := [s for s in self.steps(name) if s["step"] == "held"]):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} never held the slot:\n{(self.home / f'{name}.err').read_text()[-3000:]}")
            time.sleep(0.2)
        if held[0]["server_pid"]:
            self.server_pids.append(held[0]["server_pid"])
        return held[0]

    def outcome(self, name: str, process: subprocess.Popen[bytes]) -> str:
        """How a taking run ended: "took" or "timed out"."""
        process.wait(timeout=HANG_GUARD)
        ends = [s["step"] for s in self.steps(name) if s["step"] in ("took", "timed out")]
        assert ends, f"{name} ended ({process.returncode}) without an outcome:\n" \
                     f"{(self.home / f'{name}.err').read_text()[-3000:]}"
        return ends[-1]

    def waiting_lines(self, name: str) -> list[dict[str, Any]]:
        lines = (self.home / f"{name}.err").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if e.get("event") == "waiting for a concurrency slot"]

    def kill(self, process: subprocess.Popen[bytes], server_pid: int | None) -> None:
        """SIGKILL to the run's process group, and to its server: nothing ends cleanly."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if server_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)
            deadline = time.monotonic() + HANG_GUARD
            while Path(f"/proc/{server_pid}").exists() and _state(server_pid) != "Z":
                if time.monotonic() > deadline:
                    pytest.fail(f"server {server_pid} outlived SIGKILL")
                time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@contextlib.contextmanager
def started_in(home: Path) -> Iterator[Runs]:
    """The runs of one scenario, with a PREFECT_HOME of its own; everything they started is
    killed at the end, and a background server stopped."""
    runs = Runs(home)
    runs.home.mkdir()
    try:
        yield runs
    finally:
        for process in runs.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in runs.server_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A background server a taking run started (and the warm process beside it, were there one).
        subprocess.run([str(PATCHDRILL), "server", "stop"], env=runs.env("background"), capture_output=True,
                       timeout=HANG_GUARD, check=False)


def a_live_holder_keeps_its_slot(runs: Runs) -> None:
    """On Prefect's temporary API: while the holder renews its lease, a second run waits longer
    than the lease and times out, saying who holds the slot, even through a sweep for slots no
    lease names (as if this database had never been swept)."""
    holder = runs.start("holder", "hold", "temporary", timeout_seconds=HANG_GUARD)
    held = runs.held("holder", holder)
    for record in (runs.home / "patchdrill" / "slot-sweeps").glob("*.json"):
        record.unlink()

    waiter = runs.start("waiter", "take", "temporary", timeout_seconds=LEASE_SECONDS + 20)
    assert runs.outcome("waiter", waiter) == "timed out"
    assert holder.poll() is None, "the holder ended while it held the slot"
    assert [s["step"] for s in runs.steps("holder")] == ["held"]
    [waiting] = runs.waiting_lines("waiter")
    assert waiting["limit"] == LIMIT
    assert waiting["flow_run"].startswith(held["flow_run"] + " (")
    assert waiting["held_for"]
    assert list((runs.home / "patchdrill" / "slot-sweeps").glob("*.json")), "the waiter's server did not sweep"


def a_killed_holders_slot_comes_back_on_the_next_temporary_api(runs: Runs) -> None:
    """On Prefect's temporary API, where the slots were seen stuck for hours: the holder and its
    server are killed, and the next run, on a new server on the same home (database and lease
    files), gets the slot once the dead holder's lease expires; before leases were kept in files
    and revoked on these servers, it waited out its timeout (HANG_GUARD here, an hour for a host
    in a patch run)."""
    _killed_holder_then_taker(runs, "temporary")


def a_killed_holders_slot_comes_back_on_the_next_background_server(runs: Runs) -> None:
    """The same on patchdrill's background server (cli/server_daemon.py), where commands run by
    default: the holder and the server killed, the next command starts a new one on the home."""
    _killed_holder_then_taker(runs, "background")


def _killed_holder_then_taker(runs: Runs, mode: str) -> None:
    """A holder takes the slot on a server of this mode; both are killed; a new run on a new
    server of the same home gets the slot."""
    holder = runs.start("holder", "hold", mode, timeout_seconds=HANG_GUARD)
    held = runs.held("holder", holder)
    runs.kill(holder, held["server_pid"])
    taker = runs.start("taker", "take", mode, timeout_seconds=HANG_GUARD)
    assert runs.outcome("taker", taker) == "took"


def a_slot_no_lease_names_comes_back_once(runs: Runs) -> None:
    """What servers that kept leases in memory left: the holder took the slot through a server
    whose leases died with it (Prefect's default), and both were killed; the database says the
    slot is busy and no lease names it. The next server patchdrill starts gives it back."""
    memory = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.memory"}
    holder = runs.start("holder", "hold", "temporary", timeout_seconds=HANG_GUARD, **memory)
    held = runs.held("holder", holder)
    runs.kill(holder, held["server_pid"])
    assert not list((runs.home / "concurrency_leases").rglob("*-*.json")), "the holder's lease was kept in a file"

    taker = runs.start("taker", "take", "temporary", timeout_seconds=HANG_GUARD)
    assert runs.outcome("taker", taker) == "took"
    [record] = (runs.home / "patchdrill" / "slot-sweeps").glob("*.json")
    assert json.loads(record.read_text())["returned"] == [LIMIT]


SCENARIOS = [a_live_holder_keeps_its_slot, a_killed_holders_slot_comes_back_on_the_next_temporary_api,
             a_killed_holders_slot_comes_back_on_the_next_background_server, a_slot_no_lease_names_comes_back_once]


def test_killed_holders_slots_come_back_and_a_live_holders_does_not(tmp_path: Path) -> None:
    """The scenarios above, side by side, each with a PREFECT_HOME and servers of its own:
    each spends most of its minutes waiting out a lease (60 s at the least), so one after another
    they would hold a test worker for five minutes doing nothing. Each scenario's failure is
    reported under its name."""
    def scenario(index: int) -> None:
        with started_in(tmp_path / f"home-{index}") as runs:
            SCENARIOS[index](runs)

    with ThreadPoolExecutor(max_workers=len(SCENARIOS), thread_name_prefix="slot-scenario") as pool:
        futures = {SCENARIOS[i].__name__: pool.submit(scenario, i) for i in range(len(SCENARIOS))}
    failures = []
    for name, future in futures.items():
        error = future.exception()
        if error is not None:
            failures.append(f"{name}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
