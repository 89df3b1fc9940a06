"""Every probe kind against real parts: an HTTP(S) server, a real sshd host, a real PostgreSQL,
sqlite3, and a network namespace (as a drill's isolated copy runs in).

The sshd hosts are this machine reached over SSH, so "on the host" and "on the controller" see
the same network; the namespace tests are where the difference shows: only a probe run inside
the namespace (the context's prefix) reaches a listener in it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import os
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter

from configs.models import HostConfig
from configs.probes import (
    ChecksumProbe,
    CommandProbe,
    HttpProbe,
    Probe,
    ScriptProbe,
    SqlProbe,
    TcpProbe,
)
from connectors import connect
from connectors.base import CommandResult, Connector, Script
from connectors.local import LocalConnector
from tasks.probes import WINDOWS_SCRIPT, ProbeContext, ProbeResult, run_probe, run_probes
from tests.hosts.postgres import PgCluster, checksum_query, table_with_rows
from tests.hosts.sshd_server import SshdHost, free_port
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler
from tests.hosts.wsman_tls import issue_server_cert, make_ca

pytestmark = pytest.mark.integration
# Generous: the machine may be shared and busy; nothing here measures speed.
SLOW = 60.0
PROBE: TypeAdapter[Probe] = TypeAdapter(Probe)


# --------------------------------------------------------------------------- parts


class _App(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, body = {"/healthz": (200, b"ready: 42 orders\n"), "/broken": (503, b"down for maintenance\n")}.get(
            self.path, (404, b"no such page\n"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class WebApp:
    http: str
    https: str
    ca_bundle: Path
    other_ca: Path


def _serve(server: http.server.ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def web_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebApp]:
    """A real HTTP and HTTPS server; the HTTPS certificate is signed by a private CA."""
    directory = tmp_path_factory.mktemp("web")
    ca, other = make_ca(directory / "ca"), make_ca(directory / "other", name="someone else's CA")
    tls = issue_server_cert(ca, directory / "server")
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    secure = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        _serve(server)
    yield WebApp(http=f"http://127.0.0.1:{plain.server_address[1]}", https=f"https://localhost:{secure.server_address[1]}",
                 ca_bundle=ca.bundle, other_ca=other.bundle)
    for server in (plain, secure):
        server.shutdown()
        server.server_close()


class RecordingConnector(Connector):
    """The real connector, with every command line and stdin it was handed kept for inspection."""

    def __init__(self, inner: Connector) -> None:
        self.inner, self.name, self.os_family = inner, inner.name, inner.os_family
        self.commands: list[str] = []
        self.stdins: list[bytes] = []

    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        self.commands.append(command)
        self.stdins.append(stdin or b"")
        return self.inner.run(command, timeout=timeout, check=check, env=env, stdin=stdin)

    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        self.commands.append(" ".join([str(script), *(args or [])]))
        return self.inner.run_script(script, args, timeout=timeout, check=check)

    def put(self, local: Path, remote: str) -> None:
        self.inner.put(local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.inner.get(remote, local)

    def boot_identity(self):  # type: ignore[no-untyped-def]
        return self.inner.boot_identity()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def on_ssh(sshd_host: SshdHost) -> Iterator[ProbeContext]:
    config = sshd_host.host_config(connect_timeout=SLOW)
    with connect(config) as conn:
        yield ProbeContext.for_host(config, RecordingConnector(conn))


def _check(ctx: ProbeContext, *probes: Probe) -> list[ProbeResult]:
    results = run_probes(ctx, list(probes))
    assert all(r.seconds >= 0 and r.probe for r in results)
    return results


def _controller() -> ProbeContext:
    host = HostConfig(name="controller", transport="local", address="127.0.0.1")
    return ProbeContext.for_host(host, LocalConnector(host))


# --------------------------------------------------------------------------- HTTP(S) and TCP


def test_http_status_and_body_from_the_controller(web_app: WebApp) -> None:
    ctx = _controller()
    ok, wrong_body, regex, broken, untrusted, other_ca, unverified = _check(
        ctx,
        HttpProbe(url=f"{web_app.http}/healthz", expect_body="ready", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.http}/healthz", expect_body="stopped", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", expect_body=r"ready: \d+ orders", body_match="regex",
                  ca_bundle=str(web_app.ca_bundle), timeout_seconds=SLOW, name="shop over TLS"),
        HttpProbe(url=f"{web_app.http}/broken", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", ca_bundle=str(web_app.other_ca), timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", verify_tls=False, timeout_seconds=SLOW),
    )
    assert ok.ok and regex.ok and unverified.ok, (ok, regex, unverified)
    assert regex.probe == "shop over TLS" and ok.probe.startswith("http ") and ok.kind == "http"
    assert not wrong_body.ok and "without a body containing 'stopped'" in wrong_body.detail
    assert wrong_body.observed == "ready: 42 orders\n"
    assert not broken.ok and "answered 503, expected 200" in broken.detail
    assert not untrusted.ok and "certificate" in untrusted.detail.lower()
    assert not other_ca.ok and "certificate" in other_ca.detail.lower()


def test_http_and_tcp_run_on_the_host_when_asked(on_ssh: ProbeContext, web_app: WebApp, sshd_host: SshdHost) -> None:
    closed = free_port("127.0.0.1")
    ok, wrong_body, broken, tls, untrusted, tcp_open, tcp_closed = _check(
        on_ssh,
        HttpProbe(url=f"{web_app.http}/healthz", expect_body="42 orders", where="host", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.http}/healthz", expect_body="^down", body_match="regex", where="host", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.http}/broken", expect_status=200, where="host", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", ca_bundle=str(web_app.ca_bundle), where="host", timeout_seconds=SLOW),
        HttpProbe(url=f"{web_app.https}/healthz", where="host", timeout_seconds=SLOW),
        TcpProbe(port=sshd_host.port, where="host", timeout_seconds=SLOW),
        TcpProbe(address="127.0.0.1", port=closed, where="host", timeout_seconds=5),
    )
    assert ok.ok and tls.ok and tcp_open.ok, (ok, tls, tcp_open)
    assert "(from ssh-shared)" in ok.detail and "(from ssh-shared)" in tcp_open.detail
    assert not wrong_body.ok and "without a body matching '^down'" in wrong_body.detail
    assert not broken.ok and "answered 503, expected 200" in broken.detail
    assert not untrusted.ok and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
    assert not tcp_closed.ok and f"127.0.0.1:{closed} from ssh-shared" in tcp_closed.detail
    # They went through the host script over SSH, not a socket of this process.
    assert isinstance(on_ssh.connector, RecordingConnector)
    assert sum("probe_host.py" in c for c in on_ssh.connector.commands) == 7


# --------------------------------------------------------------------------- commands and scripts


def test_command_exit_code_and_output(on_ssh: ProbeContext) -> None:
    passes, wrong_output, wrong_exit, too_slow = _check(
        on_ssh,
        CommandProbe(command="echo 'replication lag: 0'", expect_output=r"lag: 0$", timeout_seconds=SLOW),
        CommandProbe(command="echo 'replication lag: 93'", expect_output=r"lag: 0$", timeout_seconds=SLOW),
        CommandProbe(command="echo broken >&2; exit 4", timeout_seconds=SLOW),
        CommandProbe(command="sleep 30", timeout_seconds=1),
    )
    assert passes.ok and passes.observed == "replication lag: 0"
    assert not too_slow.ok and too_slow.detail.startswith("could not run:") and "within 1s" in too_slow.detail
    assert not wrong_output.ok and "does not match 'lag: 0$': replication lag: 93" in wrong_output.detail
    assert not wrong_exit.ok and wrong_exit.detail == "exited 4, expected 0: broken"


def test_script_from_the_controller_runs_on_the_host_and_leaves_nothing(on_ssh: ProbeContext, tmp_path: Path) -> None:
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "app.sh").write_text('echo "pid $$ args: $*"\n[ "$1" = ok ]\n')
    (tmp_path / "checks" / "app.py").write_text("import sys, platform\nprint('python on', platform.system(), sys.argv[1:])\n")
    ctx = ProbeContext(name=on_ssh.name, address=on_ssh.address, connector=on_ssh.connector, base_dir=tmp_path)
    sh_ok, sh_fails, py_ok, missing, bad_kind = _check(
        ctx,
        ScriptProbe(script="checks/app.sh", args=["ok", "two words"], expect_output=r"args: ok two words", timeout_seconds=SLOW),
        ScriptProbe(script="checks/app.sh", args=["no"], timeout_seconds=SLOW),
        ScriptProbe(script=str(tmp_path / "checks" / "app.py"), args=["x"], expect_output="python on Linux", timeout_seconds=SLOW),
        ScriptProbe(script="checks/gone.sh", timeout_seconds=SLOW),
        ScriptProbe(script=str(_write(tmp_path / "checks" / "app.rb", "puts 1\n")), timeout_seconds=SLOW),
    )
    assert sh_ok.ok and py_ok.ok, (sh_ok, py_ok)
    assert "['x']" in (py_ok.observed or "")
    assert not sh_fails.ok and sh_fails.detail.startswith("exited 1, expected 0")
    assert not missing.ok and missing.detail.startswith("could not run: no script") and "gone.sh" in missing.detail
    assert not bad_kind.ok and "expected .sh or .py" in bad_kind.detail


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- SQL


def test_sql_probe_reads_postgresql_through_psql_on_the_host(on_ssh: ProbeContext, postgres_cluster: PgCluster) -> None:
    table_with_rows(postgres_cluster, "probe_orders", 250)
    count, digest = postgres_cluster.sql(checksum_query("probe_orders")).split("|")
    fields = postgres_cluster.probe_fields()
    value, rows, wrong, bad_sql = _check(
        on_ssh,
        PROBE.validate_python({"kind": "sql", **fields, "query": "SELECT count(*) FROM probe_orders", "expect": 250}),
        PROBE.validate_python({"kind": "sql", **fields, "query": checksum_query("probe_orders"),
                               "expect_rows": [[count, digest]], "timeout_seconds": SLOW}),
        PROBE.validate_python({"kind": "sql", **fields, "query": "SELECT count(*) FROM probe_orders", "expect": 249}),
        PROBE.validate_python({"kind": "sql", **fields, "query": "SELECT * FROM no_such_table"}),
    )
    assert value.ok and value.detail == "returned '250'" and value.observed == '[["250"]]'
    assert rows.ok and rows.observed == f'[["250", "{digest}"]]'
    assert not wrong.ok and "returned '250', expected '249'" in wrong.detail
    assert not bad_sql.ok and 'relation "no_such_table" does not exist' in bad_sql.detail


def test_a_database_password_travels_on_stdin_and_never_shows(on_ssh: ProbeContext, postgres_cluster: PgCluster,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    password = "Tr0ub4dor-probe-" + os.urandom(6).hex()
    postgres_cluster.sql("DROP ROLE IF EXISTS prober; "
                         f"CREATE ROLE prober LOGIN PASSWORD '{password}'; GRANT pg_read_all_data TO prober")
    monkeypatch.setenv("PD_TEST_PROBER_PASSWORD", password)
    monkeypatch.setenv("PD_TEST_WRONG_PASSWORD", password[::-1])
    tcp = {"kind": "sql", "host": "127.0.0.1", "port": postgres_cluster.port, "user": "prober", "database": "postgres",
           "query": "SELECT current_user", "timeout_seconds": SLOW}
    good, wrong, unset = _check(
        on_ssh,
        PROBE.validate_python({**tcp, "password": "env:PD_TEST_PROBER_PASSWORD", "expect": "prober"}),
        PROBE.validate_python({**tcp, "password": "env:PD_TEST_WRONG_PASSWORD"}),
        PROBE.validate_python({**tcp, "password": "env:PD_TEST_NO_SUCH_VARIABLE"}),
    )
    assert good.ok, good
    assert not wrong.ok and "password authentication failed" in wrong.detail
    assert not unset.ok and "PD_TEST_NO_SUCH_VARIABLE" in unset.detail and "is not set" in unset.detail
    recorder = on_ssh.connector
    assert isinstance(recorder, RecordingConnector)
    for secret in (password, password[::-1]):
        assert all(secret not in command for command in recorder.commands)
        assert all(secret not in f"{r.probe} {r.detail} {r.observed}" for r in (good, wrong, unset))
    assert (password + "\n").encode() in recorder.stdins


def test_sqlite3_and_a_missing_client_on_the_host(on_ssh: ProbeContext, tmp_path: Path) -> None:
    database = tmp_path / "app.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes(body) VALUES (?)", [("first, with a comma",), ('a "quoted" one',)])
    rows, missing_file, no_client = _check(
        on_ssh,
        SqlProbe(engine="sqlite3", database=str(database), query="SELECT id, body FROM notes ORDER BY id",
                 expect_rows=[["1", "first, with a comma"], ["2", 'a "quoted" one']], timeout_seconds=SLOW),
        SqlProbe(engine="sqlite3", database=str(tmp_path / "nope" / "x.db"), query="SELECT 1", timeout_seconds=SLOW),
        # sqlcmd is not installed here: a client that is missing is a failed probe, not an error.
        SqlProbe(engine="sqlserver", host="127.0.0.1", query="SELECT 1", timeout_seconds=SLOW),
    )
    assert rows.ok, rows
    assert not missing_file.ok and "sqlite3 exited" in missing_file.detail
    assert not no_client.ok and no_client.detail.startswith("sqlcmd exited 127")


# --------------------------------------------------------------------------- checksum


def test_checksum_compares_restored_files_with_the_point(on_ssh: ProbeContext, tmp_path: Path) -> None:
    point = {"etc/app.conf": b"port = 8080\n", "var/data.bin": os.urandom(3 << 20)}
    restored = tmp_path / "restored"
    for relative, content in point.items():
        (restored / relative).parent.mkdir(parents=True, exist_ok=True)
        (restored / relative).write_bytes(content)

    def expected(probe: ChecksumProbe) -> dict[str, str]:
        # What a drill does with the repository: the point's content, hashed, mapped to the copy.
        return {str(restored / p): hashlib.sha256(point[p]).hexdigest() for p in probe.paths}

    ctx = ProbeContext(name=on_ssh.name, address=on_ssh.address, connector=on_ssh.connector, expected_digests=expected)
    probe = ChecksumProbe(disk="data", paths=list(point), timeout_seconds=SLOW)
    assert run_probe(ctx, probe).ok
    (restored / "var/data.bin").write_bytes(b"changed after the point")
    (restored / "etc/app.conf").unlink()
    failed = run_probe(ctx, probe)
    assert not failed.ok
    assert failed.detail == f"missing: {restored}/etc/app.conf; differ from the point: {restored}/var/data.bin"
    without_point = run_probe(on_ssh, probe)
    assert not without_point.ok and "checksum probes run in drills" in without_point.detail


# --------------------------------------------------------------------------- a host that cannot be probed


def test_an_unreachable_host_fails_every_host_side_probe_without_raising(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    host = HostConfig(name="gone", transport="ssh", address="127.0.0.1", port=port, user="root",
                      connect_timeout=2, accept_unknown_host_key=True, known_hosts=str(tmp_path / "kh"))
    probes: list[Probe] = [
        TcpProbe(port=port, where="host"), HttpProbe(url="http://{address}/", where="host"),
        CommandProbe(command="true"), ScriptProbe(script=str(_write(tmp_path / "s.sh", "true\n"))),
        SqlProbe(query="select 1"), ChecksumProbe(paths=["a"]),
    ]
    with connect(host) as conn:
        ctx = ProbeContext.for_host(host, conn, expected_digests=lambda probe: {"/a": "00"})
        results = run_probes(ctx, probes)
    assert [r.ok for r in results] == [False] * len(probes)
    assert all(r.detail.startswith("could not run:") for r in results), [r.detail for r in results]


# --------------------------------------------------------------------------- network namespace


@dataclass(frozen=True)
class Namespace:
    name: str
    port: int  # an HTTP server listens on 127.0.0.1:port inside the namespace only


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    """A network namespace with only loopback, and an HTTP server inside it (needs root and iproute2)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"pd-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    server = None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        (tmp_path / "index.html").write_text("inside the namespace\n")
        port = free_port("127.0.0.1")
        server = subprocess.Popen(["ip", "netns", "exec", name, "python3", "-m", "http.server", str(port),
                                   "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_inside(name, port, server)
        yield Namespace(name=name, port=port)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", name], check=True)


def _wait_inside(name: str, port: int, server: subprocess.Popen[bytes]) -> None:
    knock = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"
    deadline = time.monotonic() + SLOW
    while subprocess.run(["ip", "netns", "exec", name, "python3", "-c", knock], capture_output=True).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server in namespace {name} did not start")
        time.sleep(0.1)


def test_probes_inside_a_namespace_reach_its_copy_and_not_the_host(namespace: Namespace, on_ssh: ProbeContext,
                                                                   sshd_host: SshdHost, postgres_cluster: PgCluster) -> None:
    inside = ProbeContext(name=on_ssh.name, address="127.0.0.1", connector=on_ssh.connector,
                          prefix=f"ip netns exec {namespace.name}")
    copy_http = HttpProbe(url="http://{address}:%d/" % namespace.port, expect_body="inside the namespace", timeout_seconds=SLOW)
    copy_tcp = TcpProbe(port=namespace.port, timeout_seconds=SLOW)
    primary = TcpProbe(address=sshd_host.address, port=sshd_host.port, timeout_seconds=5)
    in_http, in_tcp, in_primary, in_command = _check(
        inside, copy_http, copy_tcp, primary, CommandProbe(command="ip -o link show", expect_output="lo:", timeout_seconds=SLOW))
    assert in_http.ok and in_tcp.ok, (in_http, in_tcp)
    assert not in_primary.ok, "the isolated copy reached the production address"
    assert in_command.ok and "eth" not in (in_command.observed or "")
    # A database on the host's network is out of reach too (a Unix socket would not be: the
    # namespace isolates the network, not the file system).
    primary_db = SqlProbe(host="127.0.0.1", port=postgres_cluster.port, user="postgres", query="SELECT 1",
                          timeout_seconds=5)
    from_inside, from_outside = run_probe(inside, primary_db), run_probe(on_ssh, primary_db)
    assert not from_inside.ok and "Connection refused" in from_inside.detail
    # Outside, the server answers (and asks for the password this probe does not give).
    assert "no password supplied" in from_outside.detail
    assert run_probe(inside, primary_db.model_copy(update={"host": str(postgres_cluster.socket_dir)})).ok
    # The same probes from outside the namespace: the copy is out of reach, the primary is not.
    out_http, out_tcp, out_primary = _check(on_ssh, copy_http.model_copy(update={"url": f"http://127.0.0.1:{namespace.port}/"}),
                                            copy_tcp.model_copy(update={"address": "127.0.0.1"}), primary)
    assert not out_http.ok and not out_tcp.ok and out_primary.ok


# --------------------------------------------------------------------------- Windows hosts


class SimulatedProbeHost:
    """What probe_host.ps1 would print on Windows, made in Python: no PowerShell runs here, so
    the WinRM transport and the runner's Windows side are real and the host's check is not."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def respond(self, named: dict[str, str]) -> SimResult:
        self.calls.append(named)
        if named["Check"] == "tcp":
            try:
                with socket.create_connection((named["Address"], int(named["Port"])), timeout=float(named["Timeout"])):
                    answer: dict[str, object] = {"ok": True}
            except OSError as exc:
                answer = {"ok": False, "error": str(exc.strerror)}
        elif named["Check"] == "http":
            response = httpx.get(named["Url"], timeout=float(named["Timeout"]), verify=named["Verify"] == "1")
            answer = {"status": response.status_code, "body": response.text}
        else:
            answer = {"digests": {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).exists() else None
                                  for p in json.loads(named["PathsJson"])}}
        return SimResult(stdout=json.dumps(answer) + "\r\n")


def test_a_windows_sql_probe_hands_sqlcmd_its_password_on_stdin(fresh_winrm_server: WsmanTestHost,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlcmd is simulated (no SQL Server here): the handler sees the PowerShell the host would
    run, and answers as sqlcmd does with -h -1 -W -s ','."""
    password = "Win-" + os.urandom(6).hex()
    monkeypatch.setenv("PD_TEST_SQLCMD_PASSWORD", password)
    seen: list[str] = []

    def sqlcmd(script: str, args: list[str]) -> SimResult | None:
        if "sqlcmd" not in script:
            return None
        seen.append(script)
        return SimResult(stdout="42,shop\r\n")

    fresh_winrm_server.handlers[:0] = [sqlcmd]
    config = fresh_winrm_server.host_config("win-sql", connect_timeout=SLOW)
    probe = SqlProbe(engine="sqlserver", host="sql-1", port=1433, user="probe", database="shop",
                     password="env:PD_TEST_SQLCMD_PASSWORD", query="SELECT count(*), DB_NAME() FROM orders",
                     expect_rows=[["42", "shop"]], timeout_seconds=SLOW)
    with connect(config) as conn:
        result = run_probe(ProbeContext.for_host(config, conn), probe)
    assert result.ok, result
    [script] = seen
    assert password not in script and "$env:SQLCMDPASSWORD = [Console]::In.ReadLine()" in script
    assert "-S 'sql-1,1433'" in script and "-U 'probe'" in script and "SET NOCOUNT ON; SELECT count(*)" in script


def test_windows_hosts_check_through_probe_host_ps1(fresh_winrm_server: WsmanTestHost, web_app: WebApp,
                                                     tmp_path: Path) -> None:
    simulated = SimulatedProbeHost()
    fresh_winrm_server.handlers[:0] = [script_handler(WINDOWS_SCRIPT, simulated.respond)]
    data = _write(tmp_path / "app.ini", "[app]\nport=8080\n")
    closed = free_port("127.0.0.1")
    config = fresh_winrm_server.host_config("win-probe", connect_timeout=SLOW)
    with connect(config) as conn:
        ctx = ProbeContext.for_host(config, conn, expected_digests=lambda probe: {
            str(data): hashlib.sha256(data.read_bytes()).hexdigest()})
        tcp_open, tcp_closed, body, digests, no_ca, not_ps1 = _check(
            ctx,
            TcpProbe(address="127.0.0.1", port=fresh_winrm_server.port, where="host", timeout_seconds=SLOW),
            TcpProbe(address="127.0.0.1", port=closed, where="host", timeout_seconds=5),
            HttpProbe(url=f"{web_app.http}/healthz", expect_body="42 orders", where="host", timeout_seconds=SLOW),
            ChecksumProbe(paths=["app.ini"], timeout_seconds=SLOW),
            HttpProbe(url=f"{web_app.https}/healthz", ca_bundle=str(web_app.ca_bundle), where="host"),
            ScriptProbe(script=str(_write(tmp_path / "check.sh", "true\n"))),
        )
        in_namespace = run_probe(ProbeContext.for_host(config, conn, prefix="ip netns exec x"), CommandProbe(command="hostname"))
    assert tcp_open.ok and body.ok and digests.ok, (tcp_open, body, digests)
    assert not tcp_closed.ok and f"127.0.0.1:{closed} from win-probe" in tcp_closed.detail
    assert [c["Check"] for c in simulated.calls] == ["tcp", "tcp", "http", "sha256"]
    assert simulated.calls[0] == {"Check": "tcp", "Address": "127.0.0.1", "Port": str(fresh_winrm_server.port),
                                  "Timeout": f"{SLOW:g}"}
    assert not no_ca.ok and "import the CA into the host's certificate store" in no_ca.detail
    assert not not_ps1.ok and "expected .ps1" in not_ps1.detail
    assert not in_namespace.ok and "Linux hosts only" in in_namespace.detail
