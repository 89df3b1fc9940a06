"""One drill per plan at a time without a Prefect server: two `patchdrill drill run` processes,
each on a temporary API of its own (no PREFECT_API_URL, a PREFECT_HOME each), share nothing but
the store, and the plan's lease there makes the second wait and say so. A holder killed with
SIGKILL does not block the waiting run, and a run that waits too long fails with one line.

Everything is real: the subprocesses, their temporary Prefect servers, the sshd primary and DR
target, the network namespace, the local store holding the leases (tests/e2e/test_drill_run.py's
lab, plans and helpers, reused as they are).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from cli.app import app
from tasks.drill.evidence import DrillEvidence
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.e2e.test_drill_run import (  # noqa: F401 - drill_lab is a fixture
    HANG_GUARD, PATCHDRILL, DrillLab, drill_lab, plan,
)

pytestmark = pytest.mark.e2e
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def prefect_homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """A PREFECT_HOME per concurrent process: their servers' SQLite databases must not be shared.
    Each command starts the background server of its home (cli/api.py); they are stopped after
    the module, with the warm processes beside them, so nothing is left running."""
    homes = [tmp_path_factory.mktemp(f"prefect-home-{i}") for i in range(2)]
    yield homes
    for home in homes:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
        subprocess.run([str(PATCHDRILL), "server", "stop"], env=env, capture_output=True, timeout=HANG_GUARD,
                       check=False)


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_alone(cfg: Path, name: str, home: Path, log: Path,
                launched: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """`patchdrill drill run` with no Prefect server configured: it runs on its home's background
    server. Both run with `--yes`."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(PATCHDRILL), "drill", "run", name, "--config", str(cfg), "--yes"],
                                   env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    launched.append(process)
    return process


def with_copy_root(lab: DrillLab, first: Path, name: str, suffix: str, where: Path) -> Path:
    """The first's config with a copy root of its own."""
    where.write_text(first.read_text().replace(str(lab.copy_root(name)), str(lab.copy_root(name + suffix))))
    return where


def leases(lab: DrillLab, name: str) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (lab.root / "store" / "slots" / "drill" / name).glob("*.json")]


@pytest.mark.timeout(900)  # two temporary Prefect servers start here: slow on a loaded machine
def test_two_drill_runs_without_a_server_exclude_each_other_and_a_killed_holder_does_not_block(
        prefect_server: None, drill_lab: DrillLab, prefect_homes: list[Path], tmp_path: Path,  # noqa: F811
        launched: list[subprocess.Popen[bytes]], cli: Cli) -> None:  # noqa: F811
    """Both runs start together; whichever takes the lease first sits in its probe (waiting for a
    file nobody makes yet) and the other waits meanwhile, saying for whom. A third run gives up
    after its bounded wait. Then the holder is killed with SIGKILL: the waiter finds the lease's
    process dead, removes it, says so, and runs."""
    name = "slot-alone"
    gate = tmp_path / "gate"
    gated = plan(drill_lab, name, probes=[{"kind": "command", "command": f"test -e {gate}"}], ready_wait=600)
    configs = [drill_lab.config(name, gated)]
    configs.append(with_copy_root(drill_lab, configs[0], name, "-2", tmp_path / "second.yaml"))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [start_alone(cfg, name, home, log, launched) for cfg, home, log in zip(configs, prefect_homes, logs)]

    def waiting() -> list[int]:
        return [i for i, log in enumerate(logs) if "waiting for the plan's drill slot" in log.read_text(errors="replace")]

    deadline = time.monotonic() + HANG_GUARD * 3
    while not waiting():
        assert all(r.poll() is None for r in runs), [log.read_text(errors="replace")[-2000:] for log in logs]
        assert time.monotonic() < deadline, "neither run said it waits"
        time.sleep(0.2)
    [waiter] = waiting()
    holder = 1 - waiter
    [held_by] = [str(lease["run_id"]) for lease in leases(drill_lab, name)]
    said = logs[waiter].read_text(errors="replace")
    assert f"drill run {held_by}" in said and f"pid {runs[holder].pid}" in said and "the process is running" in said
    waiter_root = drill_lab.copy_root(name) if waiter == 0 else drill_lab.copy_root(name + "-2")
    assert not waiter_root.exists()  # it waits before creating anything

    # A third run (in process, on the test server, whose concurrency limit is free) waits a bounded time.
    third_cfg = with_copy_root(drill_lab, configs[0], name, "-3", tmp_path / "third.yaml")
    code, out, err = cli("drill", "run", name, "--config", str(third_cfg), "--yes", "--slot-timeout", "0.05", "--json")
    assert code == 1, out + err
    third = DrillEvidence.model_validate_json(out)
    assert third.outcome == "failed" and third.steps == []
    assert third.notes[-1].startswith(f"another drill of plan {name} held its slot for 0.05 min: drill run {held_by}: ")
    assert third.notes[-1].endswith("; not started") and "Traceback" not in out + err
    assert not drill_lab.copy_root(name + "-3").exists()

    os.killpg(runs[holder].pid, signal.SIGKILL)  # the controller dies holding the slot
    runs[holder].wait()
    gate.touch()  # the waiter's own probe can pass once it runs
    assert runs[waiter].wait(timeout=HANG_GUARD) == 0, logs[waiter].read_text(errors="replace")[-3000:]
    said = logs[waiter].read_text(errors="replace")
    assert "removed a stale drill slot lease" in said and f"pid {runs[holder].pid}" in said
    assert "the process is dead" in said
    started = next(line for line in said.splitlines() if "drill.start" in line).split("run_id=")[1].split()[0]
    assert DrillEvidence.model_validate_json(_evidence_file(drill_lab, started).read_text()).outcome == "passed"
    assert leases(drill_lab, name) == []

    cleaned = CliRunner().invoke(app, ["drill", "cleanup", held_by, "--config", str(configs[holder])])
    assert cleaned.exit_code == 0, cleaned.output


def _evidence_file(lab: DrillLab, run_id: str) -> Path:
    [found] = (lab.root / "store" / "evidence").rglob(f"{run_id}.json")
    return found
