"""How many hosts one worker handles: a daily assessment run by one Prefect worker over N SSH hosts.

    uv run python bench/worker_capacity.py [--sizes 10,25,50,100] [--forks 25] [--keep]

Not a test: it prints figures and asserts nothing. The stack is `make server`'s (cli/lab_server.py:
a real Prefect server on SQLite, the `patchdrill` process pool, one worker, every deployment) on
a free port with its own PREFECT_HOME; the hosts are the fan-out benchmark's (bench/fanout_hosts.py:
real sshd processes on loopback aliases, each with a sandboxed apt whose lists `apt-get update`
refreshes from a local repository). For each size N the bench starts the `patch-assess-daily`
deployment as the scheduler would, with a config listing the first N hosts, and waits for the run
to end. Per size it prints:

- wall: from creating the run to its final state (what an operator waits for: the worker's poll,
  the flow run's process start, the fan-out, the report);
- run: the flow run's own duration as the server recorded it;
- worker CPU: user+system seconds of the worker and the flow-run process it started (read from
  /proc: the worker waits for its flow runs, so their time lands in its children's counters);
- hosts CPU: what the sshd hosts spent (the same machine plays the fleet, so this is load the
  worker would not carry in production);
- the machine's load average when the run ended, since the machine may be shared.

Every host must be assessed; a run that missed hosts says so.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout_hosts import REPO_ROOT, fleet  # noqa: E402
from fanout_vs_ansible import hosts_cpu_seconds, write_patchdrill_config  # noqa: E402

from cli.lab_server import LabStack  # noqa: E402

DEPLOYMENT = "patch-assess-daily"
RUN_TIMEOUT_SECONDS = 1800
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    hosts: int
    wall: float
    run: float
    worker_cpu: float
    hosts_cpu: float
    assessed: int
    load: float
    problem: str = ""


def process_tree_cpu(pid: int) -> float:
    """User+system seconds of a process and of the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: utime, stime, cutime, cstime are fields 14-17 of proc(5).
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assess(client: Any, deployment_id: Any, config: Path, forks: int) -> tuple[float, Any]:
    started = time.monotonic()
    run = client.create_flow_run_from_deployment(deployment_id, parameters={"config_path": str(config),
                                                                            "forks": forks})
    deadline = started + RUN_TIMEOUT_SECONDS
    while not (run := client.read_flow_run(run.id)).state.is_final() and time.monotonic() < deadline:
        time.sleep(0.5)
    return time.monotonic() - started, run


def assessed_hosts(client: Any, run: Any) -> int:
    """Hosts the run's assessment table lists without an error."""
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    rows = [row for a in artifacts if a.type == "table" for row in json.loads(a.data)]
    failed = {row["host"] for row in rows if row.get("reason") and not row.get("update")}
    return len({row["host"] for row in rows} - failed)


def measure(sizes: list[int], forks: int, keep: bool) -> list[Measured]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    results = []
    with fleet(max(sizes), keep=keep) as hosts, tempfile.TemporaryDirectory(prefix="patchdrill-capacity-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(Path(scratch) / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_WORKER_QUERY_SECONDS="1")
        stack = LabStack(free_port(), Path(scratch) / "logs", env)
        try:
            stack.start()
            worker = stack.processes[-1].pid
            with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}), \
                    get_client(sync_client=True) as client:
                deployment = next(d for d in client.read_deployments() if d.name == DEPLOYMENT)
                # One small run first: the worker's first flow-run process pays imports once.
                assess(client, deployment.id, write_patchdrill_config(hosts, Path(scratch) / "warm.yaml",
                                                                      hosts.hosts[:1]), forks)
                for size in sizes:
                    config = write_patchdrill_config(hosts, Path(scratch) / f"fleet-{size}.yaml", hosts.hosts[:size])
                    cpu_before, hosts_before = process_tree_cpu(worker), hosts_cpu_seconds(hosts)
                    wall, run = assess(client, deployment.id, config, forks)
                    done = Measured(size, wall, run.total_run_time.total_seconds(),
                                    process_tree_cpu(worker) - cpu_before, hosts_cpu_seconds(hosts) - hosts_before,
                                    assessed_hosts(client, run), os.getloadavg()[0])
                    if not run.state.is_completed():
                        done.problem = f"{run.state.type.value}: {run.state.message}"
                    results.append(done)
                    print(f"  {size} hosts: {wall:.1f} s", file=sys.stderr, flush=True)
        finally:
            stack.stop()
    return results


def report(results: list[Measured], forks: int) -> str:
    lines = [f"one worker, `{DEPLOYMENT}` (refreshes package lists), forks {forks}, {os.cpu_count()} CPUs",
             "", f"{'hosts':>6} {'wall s':>8} {'run s':>8} {'s/host':>7} {'worker CPU s':>13} {'hosts CPU s':>12} "
             f"{'assessed':>9} {'load':>5}"]
    for m in results:
        lines.append(f"{m.hosts:>6} {m.wall:>8.1f} {m.run:>8.1f} {m.wall / m.hosts:>7.2f} {m.worker_cpu:>13.1f} "
                     f"{m.hosts_cpu:>12.1f} {m.assessed:>9} {m.load:>5.1f}" + (f"  {m.problem}" if m.problem else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,50,100", help="fleet sizes, comma separated")
    parser.add_argument("--forks", type=int, default=25, help="hosts in flight at once (the flow's forks)")
    parser.add_argument("--keep", action="store_true", help="keep the hosts' directory")
    args = parser.parse_args(argv)
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    os.chdir(REPO_ROOT)
    print(report(measure(sizes, args.forks, args.keep), args.forks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
