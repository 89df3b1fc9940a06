"""Run probes (configs/probes.py): after a host was patched, and against a drill's restored copy.

Prefect-free, so the patch pipeline's health check and a drill's steady-state checks share it.

Where each kind runs: TCP and HTTP from the controller, as a load balancer or a user would reach
the host, unless the probe says `where: host` or the context carries a command prefix (a copy
in its own network namespace answers only there): then a small host script
(host_scripts/probe_host.py, .ps1 on Windows) makes the same check on the host. Service,
command, script, SQL and checksum probes always run on the host through its connector, inside
the prefix when there is one.

A probe that cannot even run (host gone, timeout, a missing client, an unreadable secret) is a
failed probe, never an exception: a rollout's failure budget and a drill's verdict count it
like any other failure. Every detail passes through `redact`, and a database password reaches
its client on standard input, so it is on no command line, in no result and no log.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from configs.models import HostConfig
from configs.probes import (
    ChecksumProbe,
    CommandProbe,
    HttpProbe,
    Probe,
    ScriptProbe,
    ServiceProbe,
    SqlProbe,
    TcpProbe,
)
from configs.secrets import SecretError, redact, resolve
from connectors.agent import ScriptAgent, run_afresh
from connectors.base import (
    CommandResult, Connector, ConnectorError, is_own_host_script, posix_interpreter,
)
from connectors.powershell import ps_arguments, ps_quote

HOST_SCRIPTS = Path(__file__).with_name("host_scripts")
LINUX_SCRIPT = HOST_SCRIPTS / "probe_host.py"
WINDOWS_SCRIPT = HOST_SCRIPTS / "probe_host.ps1"
#: Seconds a host-side check may take beyond the probe's own timeout: starting the interpreter
#: and the connector's round trip are not the probed service's fault.
HOST_OVERHEAD_SECONDS = 15.0
#: How much of a command's output a result keeps.
OBSERVED_LIMIT = 4096

#: Gives a checksum probe's expected digests: {path on the host: sha256 hex} of the files as
#: the recovery point holds them. The drill supplies it (it owns the repository access).
ExpectedDigests = Callable[[ChecksumProbe], Mapping[str, str]]


@dataclass(frozen=True)
class ProbeContext:
    """Whom the probes check, and how to reach them."""

    name: str
    address: str
    connector: Connector
    os_family: str = "linux"
    #: Runs every host-side check inside it, e.g. "ip netns exec drill-web-01" (Linux only).
    prefix: str = ""
    #: Relative script paths are read from here (the config file's directory).
    base_dir: Path | None = None
    expected_digests: ExpectedDigests | None = None
    #: Runs the project's host-side checks behind the prefix without a new interpreter each.
    agent: ScriptAgent | None = None

    @classmethod
    def for_host(cls, host: HostConfig, connector: Connector, *, prefix: str = "", base_dir: Path | None = None,
                 expected_digests: ExpectedDigests | None = None) -> "ProbeContext":
        return cls(name=host.name, address=host.address, connector=connector, os_family=host.os_family,
                   prefix=prefix, base_dir=base_dir, expected_digests=expected_digests)

    @property
    def on_windows(self) -> bool:
        return self.os_family == "windows"


@dataclass(frozen=True)
class ProbeResult:
    probe: str
    kind: str
    ok: bool
    detail: str
    seconds: float
    #: What the probe read, for SQL (the rows, as JSON) and command/script output.
    observed: str | None = None


class _CannotRun(Exception):
    """The check could not be made at all; the message is the failed probe's detail."""


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    detail: str
    observed: str | None = None


# --------------------------------------------------------------------------- running on the host


def _run(ctx: ProbeContext, command: str, timeout: float, stdin: bytes | None = None) -> CommandResult:
    """A shell command on the host, inside the context's prefix when it has one."""
    _refuse_prefix_on_windows(ctx)
    if ctx.prefix:
        command = f"{ctx.prefix} sh -c {shlex.quote(command)}"
    return ctx.connector.run(command, timeout=timeout, stdin=stdin)


def _run_script(ctx: ProbeContext, script: Path, args: list[str], timeout: float) -> CommandResult:
    _refuse_prefix_on_windows(ctx)
    if ctx.on_windows:
        if script.suffix.lower() != ".ps1":
            raise _CannotRun(f"script {script.name!r} cannot run on a Windows host: expected .ps1")
        return ctx.connector.run_script(script, args, timeout=timeout)
    try:
        interpreter = posix_interpreter(script)
    except ValueError as exc:
        raise _CannotRun(str(exc)) from None
    if ctx.agent is not None and is_own_host_script(script):
        return ctx.agent.run_script(script, args, timeout=timeout)
    if not ctx.prefix:
        return ctx.connector.run_script(script, args, timeout=timeout)
    return run_afresh(ctx.connector, script, args, prefix=ctx.prefix, timeout=timeout, interpreter=interpreter)


def _refuse_prefix_on_windows(ctx: ProbeContext) -> None:
    if ctx.prefix and ctx.on_windows:
        raise _CannotRun("a command prefix (network namespace) applies to Linux hosts only")


def _host_check(ctx: ProbeContext, check: str, values: dict[str, str], timeout: float) -> dict[str, object]:
    """One check of the host script: `values` in the order probe_host.py reads them, named
    (-Key value) for probe_host.ps1."""
    if ctx.on_windows:
        script, args = WINDOWS_SCRIPT, ["-Check", check, *(a for key, value in values.items() for a in (f"-{key}", value))]
    else:
        script, args = LINUX_SCRIPT, [check, *values.values()]
    result = _run_script(ctx, script, args, timeout + HOST_OVERHEAD_SECONDS)
    lines = result.stdout.strip().splitlines()
    if result.exit_code != 0 or not lines:
        raise _CannotRun(f"the host-side check exited {result.exit_code}: {_tail(result.stderr or result.stdout)}")
    try:
        answer = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise _CannotRun(f"the host-side check printed no result: {_tail(result.stdout)}") from None
    if not isinstance(answer, dict):
        raise _CannotRun("the host-side check printed no result")
    return answer


def _on_host(ctx: ProbeContext, probe: TcpProbe | HttpProbe) -> bool:
    return probe.where == "host" or bool(ctx.prefix)


# --------------------------------------------------------------------------- the kinds


def _tcp(ctx: ProbeContext, probe: TcpProbe) -> _Outcome:
    address = probe.address or ctx.address
    target = f"{address}:{probe.port}"
    if _on_host(ctx, probe):
        answer = _host_check(ctx, "tcp", {"Address": address, "Port": str(probe.port), "Timeout": f"{probe.timeout_seconds:g}"},
                             probe.timeout_seconds)
        if answer.get("ok") is True:
            return _Outcome(True, f"{target} accepts connections (from {ctx.name})")
        return _Outcome(False, f"{target} from {ctx.name}: {answer.get('error', 'refused')}")
    try:
        with socket.create_connection((address, probe.port), timeout=probe.timeout_seconds):
            return _Outcome(True, f"{target} accepts connections")
    except OSError as exc:
        return _Outcome(False, f"{target}: {exc.strerror or type(exc).__name__}")


def _tls(probe: HttpProbe) -> ssl.SSLContext | bool:
    if not probe.verify_tls:
        return False
    if probe.ca_bundle:
        try:
            return ssl.create_default_context(cafile=probe.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise _CannotRun(f"cannot read ca_bundle {probe.ca_bundle!r}: {exc}") from None
    return True


def _http(ctx: ProbeContext, probe: HttpProbe) -> _Outcome:
    url = probe.url.replace("{address}", ctx.address)
    if _on_host(ctx, probe):
        if ctx.on_windows and probe.ca_bundle:
            raise _CannotRun("ca_bundle is not supported on Windows hosts: import the CA into the host's certificate store")
        values = {"Url": url, "Timeout": f"{probe.timeout_seconds:g}", "Verify": "1" if probe.verify_tls else "0"}
        if probe.ca_bundle:
            values["CaBundle"] = probe.ca_bundle
        answer = _host_check(ctx, "http", values, probe.timeout_seconds)
        if "error" in answer:
            return _Outcome(False, f"{url} from {ctx.name}: {answer['error']}")
        status, body = answer.get("status"), answer.get("body")
        if not isinstance(status, int) or not isinstance(body, str):
            raise _CannotRun("the host-side check printed no status")
        return _judge_http(probe, url, status, body, f" (from {ctx.name})")
    try:
        response = httpx.get(url, timeout=probe.timeout_seconds, follow_redirects=False, verify=_tls(probe))
    except httpx.HTTPError as exc:
        return _Outcome(False, f"{url}: {type(exc).__name__}: {exc}")
    return _judge_http(probe, url, response.status_code, response.text, "")


def _judge_http(probe: HttpProbe, url: str, status: int, body: str, source: str) -> _Outcome:
    if status != probe.expect_status:
        return _Outcome(False, f"{url} answered {status}, expected {probe.expect_status}{source}")
    if probe.expect_body is not None:
        found = (re.search(probe.expect_body, body) is not None if probe.body_match == "regex"
                 else probe.expect_body in body)
        if not found:
            how = "matching" if probe.body_match == "regex" else "containing"
            return _Outcome(False, f"{url} answered {status} without a body {how} {probe.expect_body!r}{source}: "
                            f"{_tail(body, 1)!r}", observed=body[:OBSERVED_LIMIT])
    return _Outcome(True, f"{url} answered {status}{source}")


def _service(ctx: ProbeContext, probe: ServiceProbe) -> _Outcome:
    if ctx.on_windows:
        command = f"(Get-Service -Name {ps_quote(probe.service)} -ErrorAction Stop).Status.ToString().ToLower()"
    else:
        # `is-active` prints active/inactive/failed…; only "active" counts as running.
        command = f"systemctl is-active -- {shlex.quote(probe.service)} || true"
    result = _run(ctx, command, probe.timeout_seconds)
    state = result.stdout.strip().splitlines()[-1].strip().lower() if result.stdout.strip() else "unknown"
    running = state in ("active", "running")
    ok = running if probe.expect_state == "running" else not running
    return _Outcome(ok, f"service {probe.service} is {state}" + ("" if ok else f", expected {probe.expect_state}"))


def _judge_exit(result: CommandResult, expect_exit: int, expect_output: str | None) -> _Outcome:
    observed = result.stdout.strip()[-OBSERVED_LIMIT:]
    if result.exit_code != expect_exit:
        tail = _tail(result.stderr or result.stdout)
        return _Outcome(False, f"exited {result.exit_code}, expected {expect_exit}" + (f": {tail}" if tail else ""), observed)
    if expect_output is not None and re.search(expect_output, result.stdout) is None:
        return _Outcome(False, f"exited {result.exit_code} but its output does not match {expect_output!r}: "
                        f"{_tail(result.stdout) or '(no output)'}", observed)
    return _Outcome(True, f"exited {result.exit_code}", observed)


def _command(ctx: ProbeContext, probe: CommandProbe) -> _Outcome:
    return _judge_exit(_run(ctx, probe.command, probe.timeout_seconds), probe.expect_exit, probe.expect_output)


def _script(ctx: ProbeContext, probe: ScriptProbe) -> _Outcome:
    path = Path(probe.script).expanduser()
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    if not path.is_file():
        raise _CannotRun(f"no script {str(path)!r} on the controller")
    result = _run_script(ctx, path, probe.args, probe.timeout_seconds)
    return _judge_exit(result, probe.expect_exit, probe.expect_output)


def _checksum(ctx: ProbeContext, probe: ChecksumProbe) -> _Outcome:
    if ctx.expected_digests is None:
        raise _CannotRun("no recovery point to compare with: checksum probes run in drills")
    expected = dict(ctx.expected_digests(probe))
    if not expected:
        raise _CannotRun("the recovery point gave no digests for these paths")
    answer = _host_check(ctx, "sha256", {"PathsJson": json.dumps(list(expected))}, probe.timeout_seconds)
    found = answer.get("digests")
    if not isinstance(found, dict):
        raise _CannotRun("the host-side check printed no digests")
    missing = [path for path in expected if found.get(path) is None]
    differ = [path for path in expected if found.get(path) is not None and found[path] != expected[path].lower()]
    if missing or differ:
        parts = ([f"missing: {_few(missing)}"] if missing else []) + ([f"differ from the point: {_few(differ)}"] if differ else [])
        return _Outcome(False, "; ".join(parts))
    return _Outcome(True, f"{len(expected)} file(s) equal the recovery point")


# --------------------------------------------------------------------------- SQL


def _sql_command(ctx: ProbeContext, probe: SqlProbe, with_password: bool) -> str:
    """The client's command line: no secret in it, the password (when any) is read from stdin."""
    seconds = str(max(1, math.ceil(probe.timeout_seconds)))
    if probe.engine == "sqlite3":
        assert probe.database is not None  # the model requires it
        return shlex.join(["sqlite3", "-batch", "-bail", "-csv", "-cmd", f".timeout {int(probe.timeout_seconds * 1000)}",
                           probe.database, probe.query])
    if probe.engine == "postgresql":
        argv = ["psql", "-X", "-w", "-q", "-t", "--csv", "-v", "ON_ERROR_STOP=1"]
        for flag, value in (("-h", probe.host), ("-p", probe.port), ("-U", probe.user), ("-d", probe.database)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["-c", probe.query]
        read = "IFS= read -r PGPASSWORD && export PGPASSWORD && " if with_password else ""
        return f"{read}PGCONNECT_TIMEOUT={seconds} exec {shlex.join(argv)}"
    server = probe.host or "localhost"
    if probe.port is not None:
        server += f",{probe.port}"
    # NOCOUNT keeps "(N rows affected)" out of the rows; -h -1 drops the header, -W trailing blanks.
    argv = ["sqlcmd", "-S", server, "-b", "-h", "-1", "-W", "-s", ",", "-l", seconds,
            "-Q", f"SET NOCOUNT ON; {probe.query}"]
    if probe.database:
        argv += ["-d", probe.database]
    argv += ["-U", probe.user] if probe.user else ["-E"]
    if ctx.on_windows:
        read = "$env:SQLCMDPASSWORD = [Console]::In.ReadLine()\n" if with_password else ""
        return f"{read}& {ps_arguments(argv)}\nexit $LASTEXITCODE"
    read = "IFS= read -r SQLCMDPASSWORD && export SQLCMDPASSWORD && " if with_password else ""
    return f"{read}exec {shlex.join(argv)}"


def _rows(probe: SqlProbe, output: str) -> list[list[str]]:
    text = output.strip("\r\n")
    if not text:
        return []
    if probe.engine == "sqlserver":
        return [line.rstrip("\r").split(",") for line in text.splitlines()]
    return [row for row in csv.reader(io.StringIO(text))]


def _sql(ctx: ProbeContext, probe: SqlProbe) -> _Outcome:
    password = None
    if probe.password:
        try:
            password = resolve(probe.password, base_dir=ctx.base_dir)
        except SecretError as exc:
            raise _CannotRun(f"password: {exc}") from None
    command = _sql_command(ctx, probe, password is not None)
    stdin = (password + "\n").encode("utf-8") if password is not None else None
    result = _run(ctx, command, probe.timeout_seconds + HOST_OVERHEAD_SECONDS, stdin=stdin)
    if result.exit_code != 0:
        return _Outcome(False, f"{_client(probe)} exited {result.exit_code}: {_tail(result.stderr or result.stdout) or '(no output)'}")
    rows = _rows(probe, result.stdout)
    observed = json.dumps(rows)
    if probe.expect is not None:
        ok = rows == [[probe.expect]]
        got = rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else observed
        return _Outcome(ok, f"returned {got!r}" + ("" if ok else f", expected {probe.expect!r}"), observed)
    if probe.expect_rows is not None:
        ok = rows == probe.expect_rows
        return _Outcome(ok, f"returned {len(rows)} row(s)" + ("" if ok else f" {_short(observed)}, expected {_short(json.dumps(probe.expect_rows))}"),
                        observed)
    return _Outcome(True, f"ran, {len(rows)} row(s)", observed)


def _client(probe: SqlProbe) -> str:
    return {"postgresql": "psql", "sqlite3": "sqlite3", "sqlserver": "sqlcmd"}[probe.engine]


# --------------------------------------------------------------------------- entry points

_KINDS: dict[type, Callable[[ProbeContext, Probe], _Outcome]] = {
    TcpProbe: _tcp, HttpProbe: _http, ServiceProbe: _service, CommandProbe: _command,  # type: ignore[dict-item]
    ScriptProbe: _script, SqlProbe: _sql, ChecksumProbe: _checksum,  # type: ignore[dict-item]
}


def run_probe(ctx: ProbeContext, probe: Probe) -> ProbeResult:
    """One probe; never raises for a probe that fails or cannot run."""
    started = time.monotonic()
    try:
        outcome = _KINDS[type(probe)](ctx, probe)
    except _CannotRun as exc:
        outcome = _Outcome(False, f"could not run: {exc}")
    except ConnectorError as exc:
        outcome = _Outcome(False, f"could not run: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run is a failed probe (module doc)
        outcome = _Outcome(False, f"could not run: {type(exc).__name__}: {exc}")
    return ProbeResult(probe=redact(probe.label), kind=probe.kind, ok=outcome.ok, detail=redact(outcome.detail),
                       seconds=time.monotonic() - started,
                       observed=redact(outcome.observed) if outcome.observed is not None else None)


def run_probes(ctx: ProbeContext, probes: Sequence[Probe]) -> list[ProbeResult]:
    """Every probe, in order; all run even after one fails, so the report shows the whole picture."""
    return [run_probe(ctx, probe) for probe in probes]


def check_health(host: HostConfig, connector: Connector, probes: Sequence[Probe], *,
                 base_dir: Path | None = None) -> list[ProbeResult]:
    """The patch pipeline's health check: the host's probes against the host itself."""
    return run_probes(ProbeContext.for_host(host, connector, base_dir=base_dir), probes)


def failure_summary(results: Sequence[ProbeResult]) -> str:
    return "; ".join(f"{r.probe}: {r.detail}" for r in results if not r.ok)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _few(paths: list[str], limit: int = 5) -> str:
    return ", ".join(paths[:limit]) + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


__all__ = ["ExpectedDigests", "ProbeContext", "ProbeResult", "check_health", "failure_summary", "run_probe",
           "run_probes"]
