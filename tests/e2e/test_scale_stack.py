"""Past one machine, as `make server DB=postgres WORKERS=2` starts it: a real Prefect server on
its own PostgreSQL cluster (Debian's postgresql; a missing one fails here, `make test` installs
it), two workers on the `patchdrill` pool, every deployment of deployments/prefect.yaml.

One stack serves the module. Each worker runs one flow run at a time (`--worker-limit 1`), so
two runs in flight together are on two workers: what the product's update-domain and host
concurrency limits must then hold across. The patched hosts are real sshd servers, each with
its own sandboxed real apt (tests/e2e/test_patch_run.py's lab hosts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tests.e2e.test_lab_stack import _free_port
from tests.hosts.lab_stack import processes_with
from tests.e2e.test_patch_run import LabMaker, baseline_now, lab_host, reboot_watcher, write_config  # noqa: F401
from tests.hosts.postgres import scratch_directory

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
WAITING = "waiting for a concurrency slot"


@dataclass
class ScaleStack:
    process: subprocess.Popen[str]
    port: int
    home: Path
    logs: Path
    db_dir: Path
    output: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


@pytest.fixture(scope="module")
def scale_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleStack]:
    home = tmp_path_factory.mktemp("prefect-home")
    # Under root the cluster belongs to the postgres user, who cannot enter pytest's tmp_path.
    db_dir = scratch_directory("patchdrill-lab-pg-")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_RUNNER_POLL_FREQUENCY="2",
               # A run refused a slot retries after the limit's average hold, capped here (30 s by
               # default): the test holds its slots long, and the same code path retries sooner.
               PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="1")
    output = home / "lab-server.out"
    with output.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "cli.lab_server", "--port", str(port), "--db", "postgres",
                                    "--db-dir", str(db_dir / "pg"), "--workers", "2", "--worker-limit", "1",
                                    "--log-dir", str(home / "logs")],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
    deadline = time.monotonic() + 300
    while "Ctrl-C stops" not in output.read_text():
        assert process.poll() is None, output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(1)
    yield ScaleStack(process, port, home, home / "logs", db_dir / "pg", output)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=90)
    for pid in processes_with(f"PREFECT_HOME={home}"):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(db_dir, ignore_errors=True)


def test_make_server_passes_db_and_workers_through() -> None:
    done = subprocess.run(["make", "-n", "--no-print-directory", "server", "DB=postgres", "WORKERS=2", "PORT=4999"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert "-m cli.lab_server --port 4999 --db postgres --workers 2" in done.stdout


def test_the_server_keeps_its_state_in_its_own_postgres_cluster(scale_stack: ScaleStack) -> None:
    from cli.lab_postgres import ROLE, server_binaries

    port = int(scale_stack.output.read_text().split("PostgreSQL on 127.0.0.1:")[1].split(",")[0])
    count = subprocess.run([str(server_binaries() / "psql"), "-X", "-t", "-A", "-h", str(scale_stack.db_dir / "run"),
                            "-p", str(port), "-U", ROLE, "-d", "prefect", "-c", "SELECT count(*) FROM deployment"],
                           capture_output=True, text=True, check=True)
    assert int(count.stdout) >= 10  # every deployment of deployments/prefect.yaml
    # The server's SQLite file was never made: the state is in PostgreSQL alone.
    assert not list(scale_stack.home.glob("*.db"))
    password = (scale_stack.db_dir / "password").read_text().strip()
    assert (scale_stack.db_dir / "password").stat().st_mode & 0o077 == 0
    for log in [scale_stack.output, *scale_stack.logs.iterdir()]:
        assert password not in log.read_text(errors="replace"), log


def _logs(client: Any, run_id: UUID) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return "\n".join(entry.message for entry in found)


def _until_waiting(client: Any, runs: list[Any], limit: str) -> None:
    """Until every run has logged that it waits for `limit` (held by the test meanwhile)."""
    deadline = time.monotonic() + 300
    while True:
        logs = [_logs(client, run.id) for run in runs]
        if all(WAITING in text and f"limit={limit}" in text for text in logs):
            return
        states = [client.read_flow_run(run.id).state for run in runs]
        assert not any(state.is_final() for state in states), (states, logs)
        assert time.monotonic() < deadline, f"not every run waited for {limit}: {logs}"
        time.sleep(1)



# Holds the slots the way a run does, in a process of its own on the stack's API alone: this
# test process also serves the session's test server, and a lease taken here may be acquired on
# one server and renewed on the other.
_HOLDER = """
import sys
from tasks.patching.slots import exclusive
held = {name: exclusive([name], timeout_seconds=60) for name in sys.argv[1:]}
for slot in held.values():
    slot.__enter__()
print("held", flush=True)
for line in sys.stdin:
    held.pop(line.strip()).__exit__(None, None, None)
    print("released", flush=True)
for slot in held.values():
    slot.__exit__(None, None, None)
"""


class _SlotHolder:
    def __init__(self, api_url: str, names: list[str]) -> None:
        env = {**os.environ, "PREFECT_API_URL": api_url}
        self.process = subprocess.Popen([sys.executable, "-c", _HOLDER, *names], cwd=REPO, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _answer(self, expected: str) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line == expected, f"slot holder said {line!r} (exit {self.process.poll()})"

    def __enter__(self) -> "_SlotHolder":
        self._answer("held")
        return self

    def release(self, name: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        self._answer("released")

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _final_run(client: Any, run: Any) -> Any:
    deadline = time.monotonic() + 300
    while not (run := client.read_flow_run(run.id)).state.is_final() and time.monotonic() < deadline:
        time.sleep(1)
    return run


@dataclass
class Hold:
    limit: str
    run: str
    acquired: datetime
    released: datetime


def _slot_holds(client: Any, since: datetime, runs: set[str], expected: set[str]) -> list[Hold]:
    """Every slot the runs held, from the server's `prefect.concurrency-limit.acquired` and
    `.released` events (a release names its acquisition in `follows`), once each limit of
    `expected` shows a hold by each run."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.monotonic() + 120
    while True:
        page = client.read_events(filter=EventFilter(
            occurred=EventOccurredFilter(since=since, until=datetime.now(timezone.utc)),
            event=EventNameFilter(prefix=["prefect.concurrency-limit."])), limit=50)
        events = list(page.events)
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events += page.events
        acquired = {e.id: e for e in events if e.event.endswith(".acquired")}
        holds = []
        for release in (e for e in events if e.event.endswith(".released")):
            start = acquired.get(release.follows) if release.follows else None
            run = next((r.id.removeprefix("prefect.flow-run.") for r in release.related
                        if r.id.startswith("prefect.flow-run.")), "")
            if start is not None and run in runs:
                holds.append(Hold(release.resource.name or "", run, start.occurred, release.occurred))
        if all({h.run for h in holds if h.limit == limit} == runs for limit in expected):
            return holds
        assert time.monotonic() < deadline, f"the server recorded these holds only: {holds}"
        time.sleep(1)


def test_two_workers_share_runs_and_no_slot_is_held_twice_at_once(
        scale_stack: ScaleStack, lab_host: LabMaker, tmp_path: Path) -> None:
    """Two patch runs on two workers contend for update domain 1 and host alpha: the test holds
    both slots until each run is waiting on it, then lets go; the server's record of who held
    which slot when shows the holds one after another, never overlapping."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.patching.slots import host_limit_name, reboot_limit_name

    alpha, beta = lab_host("alpha", 1), lab_host("beta", 1)
    cfg = write_config(tmp_path / "fleet.yaml", [alpha.config(), beta.config()],
                       {"baseline_months": baseline_now(), "reboot": "Never"})
    host_slot, domain_slot = host_limit_name("alpha"), reboot_limit_name(1)
    since = datetime.now(timezone.utc)

    def start(client: Any, deployment: str, **parameters: Any) -> Any:
        chosen = next(d for d in client.read_deployments() if d.name == deployment)
        return client.create_flow_run_from_deployment(chosen.id, parameters={"config_path": str(cfg), **parameters})

    with temporary_settings(updates={PREFECT_API_URL: scale_stack.api_url}), get_client(sync_client=True) as client, \
            _SlotHolder(scale_stack.api_url, [host_slot, domain_slot]) as holder:
        patch = {"groups": ["lab"], "policy": "default", "approved": True}
        first = start(client, "patch-web-monthly", hosts=["alpha"], **patch)
        second = start(client, "patch-web-monthly", hosts=["alpha", "beta"], **patch)
        # Released in turn, each while both runs wait on it: first the host, then the domain.
        for releasing in (host_slot, domain_slot):
            _until_waiting(client, [first, second], releasing)
            holder.release(releasing)
        runs = [_final_run(client, run) for run in (first, second)]
        holds = _slot_holds(client, since, {str(r.id) for r in runs}, {host_slot, domain_slot})

    logs = "".join(log.read_text(errors="replace")[-2000:] for log in scale_stack.logs.glob("worker*.log"))
    for run in runs:
        assert run.state.is_completed(), f"{run.name}: {run.state.type} {run.state.message}\n{logs}"
    workers = [run.labels.get("prefect.worker.name") for run in runs]
    assert set(workers) == {"patchdrill-worker-1", "patchdrill-worker-2"}, workers
    assert alpha.versions()["demo-web"] == beta.versions()["demo-web"] == "1.1"
    for limit in (host_slot, domain_slot):
        ordered = sorted((h for h in holds if h.limit == limit), key=lambda h: h.acquired)
        assert {h.run for h in ordered} == {str(runs[0].id), str(runs[1].id)}
        for earlier, later in zip(ordered, ordered[1:]):
            assert earlier.released <= later.acquired, f"{limit} held twice at once: {earlier} and {later}"


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=patchdrill test", "-c", "user.email=test@patchdrill.invalid",
                           "-c", "init.defaultBranch=main", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_worker_runs_the_flow_it_clones_from_a_git_repository(scale_stack: ScaleStack, tmp_path: Path) -> None:
    """`make deploy GIT=…`'s pull step on a real worker: the run's code and config come from a
    bare repository (a clone of this one), at a commit the worker's own checkout does not have."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    bare, checkout = tmp_path / "patchdrill.git", tmp_path / "checkout"
    _git("clone", "--quiet", "--bare", str(REPO), str(bare), cwd=tmp_path)
    _git("clone", "--quiet", f"file://{bare}", str(checkout), cwd=tmp_path)
    branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=checkout)
    # A config only the pushed commit has: a run that finds it read the clone.
    (checkout / "configs" / "pulled.yaml").write_text((REPO / "configs" / "lab.yaml").read_text())
    _git("add", "configs/pulled.yaml", cwd=checkout)
    _git("commit", "--quiet", "-m", "a config only the repository has", cwd=checkout)
    _git("push", "--quiet", "origin", branch, cwd=checkout)
    assert not (REPO / "configs" / "pulled.yaml").exists()

    env = {**os.environ, "PREFECT_API_URL": scale_stack.api_url, "PREFECT_HOME": str(scale_stack.home)}
    deployed = subprocess.run([sys.executable, "-m", "cli.deploy", "--git-repository", f"file://{bare}",
                               "--git-branch", branch, "--name", "inventory-check"],
                              cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with temporary_settings(updates={PREFECT_API_URL: scale_stack.api_url}), get_client(sync_client=True) as client:
        deployment = next(d for d in client.read_deployments() if d.name == "inventory-check")
        [clone, workdir] = deployment.pull_steps
        assert clone["prefect.deployments.steps.git_clone"]["repository"] == f"file://{bare}"
        assert "clone-patchdrill.directory" in workdir["prefect.deployments.steps.set_working_directory"]["directory"]
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config_path": "configs/pulled.yaml"})
        run = _final_run(client, run)
        logs = _logs(client, run.id)
    worker_logs = "".join(log.read_text(errors="replace")[-3000:] for log in scale_stack.logs.glob("worker*.log"))
    assert run.state.is_completed(), f"{run.state.type} {run.state.message}\n{logs}\n{worker_logs}"
    assert run.labels.get("prefect.worker.name", "").startswith("patchdrill-worker-")


def test_a_cluster_directory_postgres_cannot_reach_is_one_clear_line(tmp_path: Path) -> None:
    """Under root the cluster runs as the postgres user, who cannot enter pytest's 0700 tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to the postgres user")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "cli.lab_server", "--port", str(port), "--db", "postgres",
                           "--db-dir", str(tmp_path / "pg"), "--log-dir", str(tmp_path / "logs")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"make server: the postgres user cannot reach {tmp_path / 'pg' / 'run'}: a parent "
                                   "directory is not searchable by others (chmod o+x it, or keep the repository "
                                   "elsewhere)")
    assert processes_with(f"PREFECT_HOME={tmp_path / 'home'}") == []


def test_ctrl_c_stops_the_workers_the_server_and_the_database(scale_stack: ScaleStack) -> None:
    """Last in this module: SIGINT to the supervisor's process group, as a terminal's Ctrl-C."""
    port = int(scale_stack.output.read_text().split("PostgreSQL on 127.0.0.1:")[1].split(",")[0])
    assert len(processes_with(f"PREFECT_HOME={scale_stack.home}")) >= 4  # postgres, server, two workers
    os.killpg(scale_stack.process.pid, signal.SIGINT)
    assert scale_stack.process.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while (left := processes_with(f"PREFECT_HOME={scale_stack.home}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
    for listening in (scale_stack.port, port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listening), timeout=5).close()
    # A clean shutdown, not a kill: the cluster starts again without recovery.
    assert "database system is shut down" in (scale_stack.logs / "postgres.log").read_text()
