"""WinRmConnector against the WS-Management test host (tests/hosts/wsman_server.py).

pywinrm, HTTP(S), NTLM/Basic, message encryption and the shell protocol are real; what runs
behind them is simulated (tests/hosts/wsman_sim.py): plain shell commands below reach `sh`
through the simulation's fallback, and the shipped .ps1 scripts reach their simulated Windows
handlers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from structlog.testing import capture_logs
from typer.testing import CliRunner

from configs.models import HostConfig
from connectors import settings_for
from connectors.base import (
    AuthenticationFailed,
    CommandFailed,
    ConnectorError,
    HostKeyRejected,
    HostTimeout,
    HostUnreachable,
    RetryPolicy,
)
from connectors.powershell import clean_clixml, ps_arguments
from connectors.winrm import WinRmConnector
from cli.app import app
from tests.hosts.wsman_auth import channel_bindings
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult
from tests.hosts.wsman_tls import make_ca

FAST_RETRY = RetryPolicy(attempts=3, initial=0.01, maximum=0.02, deadline=30)


@pytest.fixture
def connector(winrm_host: HostConfig) -> Iterator[WinRmConnector]:
    with WinRmConnector(settings_for(winrm_host), retry=FAST_RETRY) as conn:
        yield conn


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# commands -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_command_output_and_exit_code(connector: WinRmConnector) -> None:
    result = connector.run("echo hello; echo oops >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 3)
    with pytest.raises(CommandFailed) as failed:
        connector.run("exit 4", check=True)
    assert failed.value.exit_code == 4 and failed.value.host == connector.name


@pytest.mark.integration
def test_powershell_errors_arrive_as_plain_text(fresh_winrm_server: WsmanTestHost) -> None:
    script = "Write-Error 'disk C: is full'"
    fresh_winrm_server.handlers.insert(0, lambda text, args: SimResult(
        stdout="partial\r\n", errors=["disk C: is full", "    + CategoryInfo : NotSpecified: (:) [Write-Error]"],
        exit_code=1) if text.strip() == script else None)
    with WinRmConnector(settings_for(fresh_winrm_server.host_config())) as conn:
        result = conn.run(script)
    assert result.exit_code == 1
    assert result.stdout == "partial\r\n"
    assert result.stderr == "disk C: is full\n    + CategoryInfo : NotSpecified: (:) [Write-Error]"


@pytest.mark.integration
def test_ten_megabytes_of_output_arrive_whole_and_in_order(connector: WinRmConnector) -> None:
    lines = 1024 * 1024  # ten bytes each: exactly 10 MiB
    result = connector.run(f"seq -f %09.0f 1 {lines}", check=True)
    assert len(result.stdout) == 10 * 1024 * 1024
    assert result.stdout.splitlines() == [f"{n:09d}" for n in range(1, lines + 1)]


@pytest.mark.integration
def test_non_ascii_text_survives_both_ways(connector: WinRmConnector) -> None:
    text = "Grüße aus Köln — 東京 ✓ ünïcødé"
    assert connector.run(f"printf '%s' '{text}'", check=True).stdout == text
    quoted = "it's ‘quoted’ and ünïcødé"
    assert connector.run('printf "%s" "$GREETING"', env={"GREETING": quoted}, check=True).stdout == quoted


@pytest.mark.integration
def test_scripts_longer_than_a_command_line_run_from_stdin(connector: WinRmConnector) -> None:
    filler = "\n".join(f"# filler line {n} " + "x" * 60 for n in range(300))  # ~24 KB of script
    result = connector.run(f"echo start\n{filler}\necho end", check=True)
    assert result.stdout == "start\nend\n"
    # the caller's stdin follows the script on the same stream
    piped = connector.run(f"{filler}\ncat", stdin="eins\nzwei ✓\n".encode(), check=True)
    assert piped.stdout == "eins\nzwei ✓\n"


@pytest.mark.integration
def test_stdin_reaches_a_short_command(connector: WinRmConnector) -> None:
    assert connector.run("tr a-z A-Z", stdin=b"shout\n", check=True).stdout == "SHOUT\n"


@pytest.mark.integration
def test_one_connector_serves_several_threads(connector: WinRmConnector) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(lambda n: connector.run(f"echo {n}", check=True).stdout, range(12)))
    assert outputs == [f"{n}\n" for n in range(12)]


@pytest.mark.integration
def test_command_past_its_timeout_raises_and_is_stopped(connector: WinRmConnector, winrm_server: WsmanTestHost) -> None:
    with pytest.raises(HostTimeout) as timed_out:
        connector.run("sleep 30", timeout=2)
    assert "still running after 2s" in str(timed_out.value)
    # the connector signalled terminate: the host holds no command any more
    assert not [shell.commands for shell in winrm_server.service.shells.values() if shell.commands]
    assert connector.run("echo still usable", check=True).stdout == "still usable\n"


@pytest.mark.integration
def test_operation_timeout_faults_are_normal_during_long_commands(winrm_server: WsmanTestHost) -> None:
    before = winrm_server.operation_timeouts
    with WinRmConnector(settings_for(winrm_server.host_config()), operation_timeout=1) as conn:
        result = conn.run("sleep 3; echo done", timeout=60, check=True)
    assert result.stdout == "done\n"
    assert winrm_server.operation_timeouts > before


@pytest.mark.integration
def test_a_lost_shell_is_reopened(fresh_winrm_server: WsmanTestHost) -> None:
    with WinRmConnector(settings_for(fresh_winrm_server.host_config())) as conn:
        conn.run("true", check=True)
        fresh_winrm_server.service.drop_all()  # as when WinRM restarts or the shell idles out
        assert conn.run("echo again", check=True).stdout == "again\n"


# files ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_put_and_get_round_trip_a_binary_file(connector: WinRmConnector, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64 + os.urandom(600 * 1024)  # several upload chunks, every byte value
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    remote = remote_dir / "payload.bin"

    connector.put(local, str(remote))
    assert remote.read_bytes() == payload
    assert [p.name for p in remote_dir.iterdir()] == ["payload.bin"]  # no partial file left

    back = tmp_path / "back.bin"
    connector.get(str(remote), back)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    connector.put(empty, str(remote_dir / "empty"))
    connector.get(str(remote_dir / "empty"), tmp_path / "empty-back")
    assert (tmp_path / "empty-back").read_bytes() == b""


@pytest.mark.integration
def test_copies_over_the_size_limit_are_refused(winrm_host: HostConfig, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 4096)
    with WinRmConnector(settings_for(winrm_host), max_transfer_bytes=1024) as conn:
        with pytest.raises(ConnectorError, match="over the 1024-byte limit") as refused:
            conn.put(big, str(tmp_path / "copy.bin"))
        assert "upload URL" in str(refused.value)
        with pytest.raises(ConnectorError, match="over the 1024-byte limit"):
            conn.get(str(big), tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()


@pytest.mark.integration
def test_get_of_a_missing_file_names_it(connector: WinRmConnector, tmp_path: Path) -> None:
    with pytest.raises(CommandFailed, match="does not exist"):
        connector.get(str(tmp_path / "nope.txt"), tmp_path / "local.txt")


# security -------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("server", ["winrm_server", "winrm_http_basic_server"])
def test_wrong_password_fails_fast_without_leaking_it(server: str, request: pytest.FixtureRequest,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    host: WsmanTestHost = request.getfixturevalue(server)
    wrong = "Wrong-Passw0rd-4711"
    monkeypatch.setenv(host.password_env, wrong)
    config = host.host_config()
    with capture_logs() as logs, pytest.raises(AuthenticationFailed) as failed:
        WinRmConnector(settings_for(config), retry=FAST_RETRY).run("echo never")
    message = str(failed.value)
    assert host.user in message and config.winrm_auth in message and config.name in message
    assert wrong not in message and host.password not in message
    assert not [e for e in logs if e["event"] == "winrm.retry"]
    assert wrong not in repr(logs) and host.password not in repr(logs)


@pytest.mark.integration
def test_basic_over_http_needs_allow_insecure_transport(winrm_http_basic_server: WsmanTestHost) -> None:
    lab = winrm_http_basic_server.host_config(name="lab-win")
    assert lab.allow_insecure_transport and lab.winrm_auth == "basic" and lab.winrm_scheme == "http"
    # A HostConfig built in code skips the schema's own check: the connector must refuse too.
    unsafe = HostConfig.model_construct(**{**dict(lab), "allow_insecure_transport": False})
    with pytest.raises(ConnectorError, match="allow_insecure_transport") as refused:
        WinRmConnector(settings_for(unsafe))
    assert refused.value.host == "lab-win"
    with WinRmConnector(settings_for(lab)) as conn:
        assert conn.run("echo basic", check=True).stdout == "basic\n"


@pytest.mark.integration
def test_ntlm_over_http_is_encrypted(winrm_http_ntlm_server: WsmanTestHost) -> None:
    config = winrm_http_ntlm_server.host_config()
    assert not config.allow_insecure_transport
    with WinRmConnector(settings_for(config)) as conn:
        assert conn.run("echo sealed", check=True).stdout == "sealed\n"
    # the http NTLM host refuses unencrypted bodies, so an answer at all proves the sealing
    assert not [r for r in winrm_http_ntlm_server.rejections if "unencrypted" in r]


@pytest.mark.integration
def test_ntlm_channel_binding_is_checked_over_https(fresh_winrm_server: WsmanTestHost) -> None:
    """A relayed NTLM exchange carries the bindings of another TLS channel: refused."""
    fresh_winrm_server.bindings = channel_bindings(b"the certificate of some other server")
    with pytest.raises(AuthenticationFailed):
        WinRmConnector(settings_for(fresh_winrm_server.host_config()), retry=FAST_RETRY).run("echo never")
    assert any("bindings" in reason for reason in fresh_winrm_server.rejections)


@pytest.mark.integration
def test_untrusted_certificate_is_a_clear_non_retried_error(winrm_server: WsmanTestHost, tmp_path: Path) -> None:
    stranger = make_ca(tmp_path, "some other CA")
    for bundle in (str(stranger.bundle), None):
        config = winrm_server.host_config(winrm_ca_bundle=bundle)
        with capture_logs() as logs, pytest.raises(HostKeyRejected) as rejected:
            WinRmConnector(settings_for(config), retry=FAST_RETRY).run("echo never")
        assert "not trusted" in str(rejected.value) and "winrm_ca_bundle" in str(rejected.value)
        assert not [e for e in logs if e["event"] == "winrm.retry"]
    insecure_lab = winrm_server.host_config(winrm_ca_bundle=None, winrm_verify_tls=False)
    with WinRmConnector(settings_for(insecure_lab)) as conn:
        assert conn.run("echo unverified", check=True).stdout == "unverified\n"


@pytest.mark.integration
def test_unverified_tls_is_warned_once_per_host(winrm_server: WsmanTestHost) -> None:
    names = [f"win-unverified-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with capture_logs() as logs:
        for name in (names[0], names[0], names[1]):
            # A connector per pass and a shell re-opened after a drop: still one warning per host.
            with WinRmConnector(settings_for(winrm_server.host_config(name, winrm_ca_bundle=None, winrm_verify_tls=False))) as conn:
                conn.run("echo a", check=True)
                conn._discard()
                conn.run("echo b", check=True)
    warnings = [e for e in logs if e["event"] == "winrm.tls_unverified"]
    assert [e["host"] for e in warnings] == names
    assert all(e["log_level"] == "warning" and f"host {e['host']}: winrm_verify_tls is false" in e["detail"]
               for e in warnings)
    with capture_logs() as logs, WinRmConnector(settings_for(winrm_server.host_config(f"win-verified-{uuid.uuid4().hex[:8]}"))) as conn:
        conn.run("echo verified", check=True)
    assert not [e for e in logs if e["event"] == "winrm.tls_unverified"]


@pytest.mark.integration
def test_hosts_ping_warns_once_for_each_host_without_tls_verification(winrm_server: WsmanTestHost, tmp_path: Path) -> None:
    """The user's path: `patchdrill hosts ping` shows one warning line naming each such host."""
    names = [f"win-ping-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    hosts = [winrm_server.host_config(name, winrm_ca_bundle=None, winrm_verify_tls=False).model_dump(exclude_defaults=True)
             for name in names]
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": hosts}))
    result = CliRunner().invoke(app, ["hosts", "ping", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert all(row["reachable"] for row in json.loads(result.stdout))
    for name in names:
        assert [line for line in result.stderr.splitlines() if "winrm_verify_tls is false" in line and name in line] != []
        assert sum(f"host {name}: winrm_verify_tls is false" in line for line in result.stderr.splitlines()) == 1


@pytest.mark.integration
def test_missing_ca_bundle_file_is_named(winrm_server: WsmanTestHost, tmp_path: Path) -> None:
    config = winrm_server.host_config(winrm_ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(ConnectorError, match="winrm_ca_bundle .*missing.pem"):
        WinRmConnector(settings_for(config)).run("echo never")


@pytest.mark.integration
def test_host_down_is_retried_then_unreachable(winrm_server: WsmanTestHost) -> None:
    config = winrm_server.host_config(name="gone", port=_free_port())
    with capture_logs() as logs, pytest.raises(HostUnreachable) as down:
        WinRmConnector(settings_for(config), retry=FAST_RETRY).run("echo never")
    assert "Connection refused" in str(down.value) and down.value.host == "gone"
    assert [e["attempt"] for e in logs if e["event"] == "winrm.retry"] == [1, 2]


# identity -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_boot_identity_changes_across_a_reboot(fresh_winrm_server: WsmanTestHost) -> None:
    with WinRmConnector(settings_for(fresh_winrm_server.host_config()), retry=FAST_RETRY) as conn:
        before = conn.boot_identity()
        assert before.os_family == "windows" and before.os_name == fresh_winrm_server.windows.caption
        assert before.boot_id.endswith("Z") and before.boot_id == before.extra["last_boot_up_time"]

        fresh_winrm_server.reboot(down_for=1.0)
        after = conn.wait_until_up(timeout=60, interval=0.2, not_boot_id=before.boot_id)
        assert after.boot_id != before.boot_id and after.boot_id > before.boot_id
        assert conn.run("echo back", check=True).stdout == "back\n"


@pytest.mark.integration
def test_boot_identity_of_a_down_host_is_not_retried(winrm_server: WsmanTestHost) -> None:
    config = winrm_server.host_config(port=_free_port())
    with capture_logs() as logs, pytest.raises(HostUnreachable):
        WinRmConnector(settings_for(config), retry=FAST_RETRY).boot_identity()
    assert not [e for e in logs if e["event"] == "winrm.retry"]


# pure helpers ---------------------------------------------------------------------------------

def test_clixml_is_cleaned_into_console_text() -> None:
    stderr = (
        "#< CLIXML\r\n"
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        '<Obj S="progress" RefId="0"><MS><PR N="Record"><AV>Preparing modules</AV></PR></MS></Obj>'
        '<S S="Error">first &lt;line&gt;_x000D__x000A_</S><S S="Warning">careful_x000A_</S>'
        '<S S="Error">path C:\\my_x005F_x0041_dir_x000D__x000A_</S></Objs>'
        "native tool said this\r\n"
        "#< CLIXML\r\n"
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        '<S S="Error">cut &amp; short_x000D__x000A_</S><S S="Err'
    )
    assert clean_clixml(stderr) == (
        "first <line>\nWARNING: careful\npath C:\\my_x0041_dir\nnative tool said this\ncut & short"
    )
    assert clean_clixml("plain text\n") == "plain text\n"


def test_script_arguments_are_literals() -> None:
    assert ps_arguments(["-Path", "C:\\it's here", "-Force", "$(evil)", "‘x’"]) == (
        "-Path 'C:\\it''s here' -Force '$(evil)' '‘‘x’’'"
    )


def test_a_non_winrm_host_is_refused() -> None:
    with pytest.raises(ValueError, match="'box'.*WinRmConnector takes WinRmSettings.*not SshSettings"):
        WinRmConnector(settings_for(HostConfig(name="box", transport="ssh", user="root")))


def test_kerberos_without_its_extra_is_a_clear_error() -> None:
    import winrm.transport

    config = HostConfig(name="kdc-win", transport="winrm", os_family="windows", user="svc@EXAMPLE.COM",
                        winrm_auth="kerberos")
    if winrm.transport.HAVE_KERBEROS:
        pytest.skip("the kerberos extra is installed here")
    with pytest.raises(ConnectorError, match=r"patchdrill\[kerberos\]"):
        WinRmConnector(settings_for(config))
