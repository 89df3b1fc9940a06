"""Health probes run after a host was patched (and rebooted): is it doing its job again?

TCP and HTTP probes run from the controller, as a load balancer or a user would reach the
host; service and command probes run on the host through its connector. Every probe has its
own timeout, and a probe that cannot even run (host gone, timeout) is a failed probe, never an
exception: the rollout's failure budget counts it like any other failure.
"""

from __future__ import annotations

import shlex
import socket
import time
from dataclasses import dataclass

import httpx

from configs.models import HostConfig
from configs.policies import CommandProbe, HealthProbe, HttpProbe, ServiceProbe, TcpProbe
from configs.secrets import redact
from connectors.base import Connector, ConnectorError
from connectors.powershell import ps_quote


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    ok: bool
    detail: str
    seconds: float


def describe(probe: HealthProbe) -> str:
    if isinstance(probe, TcpProbe):
        return f"tcp {probe.address or '{address}'}:{probe.port}"
    if isinstance(probe, HttpProbe):
        return f"http {probe.url} → {probe.expect_status}"
    if isinstance(probe, ServiceProbe):
        return f"service {probe.name} {probe.expect_state}"
    return f"command {probe.command!r} → exit {probe.expect_exit}"


def _tcp(host: HostConfig, probe: TcpProbe) -> tuple[bool, str]:
    address = probe.address or host.address
    try:
        with socket.create_connection((address, probe.port), timeout=probe.timeout_seconds):
            return True, f"{address}:{probe.port} accepts connections"
    except OSError as exc:
        return False, f"{address}:{probe.port}: {exc.strerror or type(exc).__name__}"


def _http(host: HostConfig, probe: HttpProbe) -> tuple[bool, str]:
    url = probe.url.replace("{address}", host.address)
    try:
        response = httpx.get(url, timeout=probe.timeout_seconds, follow_redirects=False)
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__}: {exc}"
    ok = response.status_code == probe.expect_status
    return ok, f"{url} answered {response.status_code}" + ("" if ok else f", expected {probe.expect_status}")


def _service_command(host: HostConfig, name: str) -> str:
    if host.os_family == "windows":
        return f"(Get-Service -Name {ps_quote(name)} -ErrorAction Stop).Status.ToString().ToLower()"
    # `is-active` prints active/inactive/failed…; only "active" counts as running.
    return f"systemctl is-active -- {shlex.quote(name)} || true"


def _service(host: HostConfig, connector: Connector, probe: ServiceProbe) -> tuple[bool, str]:
    result = connector.run(_service_command(host, probe.name), timeout=probe.timeout_seconds)
    state = result.stdout.strip().splitlines()[-1].strip().lower() if result.stdout.strip() else "unknown"
    running = state in ("active", "running")
    ok = running if probe.expect_state == "running" else not running
    return ok, f"service {probe.name} is {state}" + ("" if ok else f", expected {probe.expect_state}")


def _command(connector: Connector, probe: CommandProbe) -> tuple[bool, str]:
    result = connector.run(probe.command, timeout=probe.timeout_seconds)
    ok = result.exit_code == probe.expect_exit
    if ok:
        return True, f"exited {result.exit_code}"
    tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
    return False, f"exited {result.exit_code}, expected {probe.expect_exit}" + (f": {tail}" if tail else "")


def run_probe(host: HostConfig, connector: Connector, probe: HealthProbe) -> ProbeResult:
    started = time.monotonic()
    try:
        if isinstance(probe, TcpProbe):
            ok, detail = _tcp(host, probe)
        elif isinstance(probe, HttpProbe):
            ok, detail = _http(host, probe)
        elif isinstance(probe, ServiceProbe):
            ok, detail = _service(host, connector, probe)
        else:
            ok, detail = _command(connector, probe)
    except ConnectorError as exc:
        ok, detail = False, f"could not run: {exc.message}"
    return ProbeResult(probe=describe(probe), ok=ok, detail=redact(detail), seconds=time.monotonic() - started)


def check_health(host: HostConfig, connector: Connector, probes: list[HealthProbe]) -> list[ProbeResult]:
    """Every probe, in order; all run even after one fails, so the report shows the whole picture."""
    return [run_probe(host, connector, probe) for probe in probes]


def failure_summary(results: list[ProbeResult]) -> str:
    failed = [r for r in results if not r.ok]
    return "; ".join(f"{r.probe}: {r.detail}" for r in failed)


__all__ = ["ProbeResult", "check_health", "describe", "failure_summary", "run_probe"]
