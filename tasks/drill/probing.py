"""Probes in a drill: the primary's steady state (from the controller and on the primary, as the
patch pipeline's health checks run) and the copy's probes, run on the DR target inside the
copy's network namespace, which nothing outside it can reach.

Command templates in a copy's probes are filled like its start/stop commands ({root},
{disk:NAME}); a copy's probes are retried until they pass or the member's ready wait runs out,
since an application takes a moment to listen after it starts.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping

from configs.models import HostConfig
from configs.plans import Probe
from configs.policies import CommandProbe, HttpProbe, ServiceProbe, TcpProbe
from configs.secrets import redact
from connectors.base import Connector, ConnectorError
from tasks.drill.evidence import ProbePhase, ProbeRecord, utcnow
from tasks.patching.health import check_health, describe

#: Seconds between two rounds of a copy's probes while it starts.
RETRY_INTERVAL = 0.5

_HTTP_GET = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])); print(r.status)\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code)\n"
    "except Exception as e:\n"
    "    print('error', type(e).__name__, e); sys.exit(3)\n"
)
_TCP_CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close(); print('open')\n"
    "except OSError as e:\n"
    "    print('closed', e.strerror or type(e).__name__); sys.exit(3)\n"
)


def primary_probes(member: str, phase: ProbePhase, host: HostConfig, connector: Connector,
                   probes: list[Probe]) -> list[ProbeRecord]:
    """The primary's steady-state probes, as its health checks run (read-only)."""
    at = utcnow()
    return [ProbeRecord(member=member, phase=phase, probe=r.probe, ok=r.ok, detail=r.detail,
                        seconds=round(r.seconds, 3), at=at) for r in check_health(host, connector, probes)]


def _fill(text: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _inside(namespace: str | None, argv: list[str]) -> str:
    command = shlex.join(argv)
    return f"ip netns exec {shlex.quote(namespace)} {command}" if namespace else command


def run_copy_probe(connector: Connector, probe: Probe, namespace: str | None,
                   values: Mapping[str, str]) -> tuple[bool, str]:
    """One probe of the copy, run on its target (inside its namespace when it has one)."""
    if isinstance(probe, TcpProbe):
        address = probe.address or "127.0.0.1"
        result = connector.run(_inside(namespace, ["python3", "-c", _TCP_CONNECT, address, str(probe.port),
                                                   str(probe.timeout_seconds)]), timeout=probe.timeout_seconds + 30)
        return result.ok, f"{address}:{probe.port} " + (result.stdout.strip() or result.stderr.strip()[-200:])
    if isinstance(probe, HttpProbe):
        url = probe.url.replace("{address}", "127.0.0.1")
        result = connector.run(_inside(namespace, ["python3", "-c", _HTTP_GET, url, str(probe.timeout_seconds)]),
                               timeout=probe.timeout_seconds + 30)
        status = result.stdout.strip()
        ok = result.ok and status == str(probe.expect_status)
        return ok, f"{url} answered {status or result.stderr.strip()[-200:]}" + (
            "" if ok else f", expected {probe.expect_status}")
    if isinstance(probe, CommandProbe):
        command = _fill(probe.command, values)
        result = connector.run(_inside(namespace, ["sh", "-c", command]), timeout=probe.timeout_seconds)
        ok = result.exit_code == probe.expect_exit
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        return ok, f"exited {result.exit_code}" + ("" if ok else f", expected {probe.expect_exit}: {tail}")
    assert isinstance(probe, ServiceProbe)
    result = connector.run(f"systemctl is-active -- {shlex.quote(probe.name)} || true", timeout=probe.timeout_seconds)
    state = result.stdout.strip() or "unknown"
    ok = (state == "active") == (probe.expect_state == "running")
    return ok, f"service {probe.name} is {state}"


def copy_probes(member: str, connector: Connector, probes: list[Probe], namespace: str | None,
                values: Mapping[str, str], wait_seconds: float,
                stopped: Callable[[], bool] = lambda: False) -> list[ProbeRecord]:
    """Every probe of the copy, retried as a round until all pass or wait_seconds ran out; the
    last round is what the evidence keeps."""
    deadline = time.monotonic() + wait_seconds
    while True:
        records = []
        for probe in probes:
            started = time.monotonic()
            try:
                ok, detail = run_copy_probe(connector, probe, namespace, values)
            except ConnectorError as exc:
                ok, detail = False, f"could not run: {exc.message}"
            records.append(ProbeRecord(member=member, phase="copy", probe=describe(probe), ok=ok,
                                       detail=redact(detail), seconds=round(time.monotonic() - started, 3),
                                       at=utcnow()))
        if all(r.ok for r in records) or time.monotonic() >= deadline or stopped():
            return records
        time.sleep(RETRY_INTERVAL)
