"""SshConnector against real OpenSSH servers (tests/hosts/sshd.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
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
from connectors.ssh import SshConnector
from cli.app import app
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import SshdHost, make_key
from tests.hosts.sshd_users import LocalUser

pytestmark = pytest.mark.integration

# Quick, bounded retries so "host down" tests finish fast but still retry for real.
QUICK_RETRY = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, deadline=30)
PASSWORD_VAR = "PATCHDRILL_TEST_SSH_PASSWORD"


@pytest.fixture
def ssh(ssh_host_config: HostConfig) -> Iterator[SshConnector]:
    connector = SshConnector(settings_for(ssh_host_config))
    yield connector
    connector.close()


# -- commands -------------------------------------------------------------------------------


def test_run_returns_stdout_stderr_and_exit_code(ssh: SshConnector) -> None:
    result = ssh.run("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not result.ok
    assert result.host == ssh.name
    assert result.seconds > 0


def test_check_raises_command_failed_with_stderr(ssh: SshConnector) -> None:
    with pytest.raises(CommandFailed) as caught:
        ssh.run("echo 'disk full' >&2; exit 5", check=True)
    assert caught.value.exit_code == 5
    assert "disk full" in str(caught.value)
    assert ssh.name in str(caught.value)


def test_connection_is_reused_between_commands(ssh: SshConnector) -> None:
    ssh.run("true", check=True)
    with capture_logs() as events:
        assert ssh.run("echo again", check=True).stdout == "again\n"
    assert not [e for e in events if e["event"] == "ssh.connected"]


def test_threads_share_one_lazily_made_connection(ssh_host_config: HostConfig) -> None:
    with capture_logs() as events, SshConnector(settings_for(ssh_host_config)) as connector:
        with ThreadPoolExecutor(max_workers=4) as pool:
            outputs = list(pool.map(lambda n: connector.run(f"echo {n}", check=True).stdout, range(8)))
    assert outputs == [f"{n}\n" for n in range(8)]
    assert len([e for e in events if e["event"] == "ssh.connected"]) == 1


def test_ten_megabytes_on_stdout_while_stderr_also_fills(ssh: SshConnector) -> None:
    command = (
        "head -c 2000000 /dev/zero | tr '\\0' e >&2 & "
        "head -c 10485760 /dev/zero | tr '\\0' o; wait"
    )
    result = ssh.run(command, timeout=120, check=True)
    assert len(result.stdout) == 10 * 1024 * 1024 and set(result.stdout) == {"o"}
    assert len(result.stderr) == 2_000_000 and set(result.stderr) == {"e"}


def test_non_ascii_text_round_trips_and_bad_bytes_are_replaced(ssh: SshConnector) -> None:
    text = "Grüße — 東京 ✓ ÆØÅ"
    echoed = ssh.run("cat", stdin=text.encode("utf-8"), check=True)
    assert echoed.stdout == text
    printed = ssh.run(f"printf '%s' '{text}'", check=True)
    assert printed.stdout == text
    broken = ssh.run("printf 'a\\377b'", check=True)
    assert broken.stdout == "a\ufffdb"


def test_large_stdin_with_large_output_does_not_deadlock(ssh: SshConnector) -> None:
    data = os.urandom(2 * 1024 * 1024)
    # od writes three bytes per byte it reads, so both directions are busy at once.
    result = ssh.run("od -An -v -tx1", stdin=data, timeout=120, check=True)
    assert bytes.fromhex(result.stdout) == data
    # A command that ignores its stdin must not leave the connector waiting to send it.
    assert ssh.run("echo ignored", stdin=data, timeout=120).stdout == "ignored\n"


def test_command_killed_by_a_signal_reports_minus_one(ssh: SshConnector) -> None:
    result = ssh.run("echo before; kill -9 $$")
    assert (result.exit_code, result.stdout) == (-1, "before\n")


def test_connection_lost_mid_command_is_unreachable_and_not_rerun(ssh: SshConnector, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    # Killing the session's own sshd process drops the connection under the running command.
    with pytest.raises(HostUnreachable) as caught:
        ssh.run(f"echo x >> {marker}; kill -9 $PPID; sleep 5")
    assert "not re-run" in caught.value.message
    assert marker.read_text() == "x\n"
    assert ssh.run("echo reconnected", check=True).stdout == "reconnected\n"


def test_command_timeout_raises_host_timeout_and_connection_stays_usable(ssh: SshConnector) -> None:
    with pytest.raises(HostTimeout) as caught:
        ssh.run("sleep 30", timeout=0.5)
    assert "not re-run" in caught.value.message
    assert "sleep 30" in caught.value.message
    assert ssh.run("echo still here", check=True).stdout == "still here\n"


def test_env_reaches_the_whole_command_without_accept_env(ssh: SshConnector) -> None:
    env = {"PD_A": "two words", "PD_B": "it's $HOME; `x`"}
    result = ssh.run('cd / && printf "%s|%s|%s" "$PD_A" "$PD_B" "$(pwd)"', env=env, check=True)
    assert result.stdout == "two words|it's $HOME; `x`|/"
    with pytest.raises(ValueError, match="PD-BAD"):
        ssh.run("true", env={"PD-BAD": "1"})


def test_sshd_set_env_reaches_sessions(sshd_factory: SshdMaker) -> None:
    host = sshd_factory("ssh-setenv", extra_config={"SetEnv": {"APT_CONFIG": "/tmp/x y", "DPKG_ADMINDIR": "/tmp/z"}})
    with SshConnector(settings_for(host.config)) as connector:
        result = connector.run('printf "%s|%s" "$APT_CONFIG" "$DPKG_ADMINDIR"', check=True)
    assert result.stdout == "/tmp/x y|/tmp/z"


# -- scripts --------------------------------------------------------------------------------


def test_run_script_feeds_sh_and_python_on_stdin(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    (tmp_path / "count.sh").write_text('printf "%s\\n" "$#" "$@"; echo "from $0" >&2\n')
    (tmp_path / "hello.py").write_text("import sys\nprint('|'.join(sys.argv))\n")
    (tmp_path / "nope.ps1").write_text("Write-Output 1\n")
    with SshConnector(settings_for(ssh_host_config)) as connector:
        shell = connector.run_script(tmp_path / "count.sh", ["a b", "it's", "-x"], check=True)
        python = connector.run_script(tmp_path / "hello.py", ["ü", "--flag"], check=True)
        with pytest.raises(ValueError, match="nope.ps1"):
            connector.run_script(tmp_path / "nope.ps1")
        with pytest.raises(FileNotFoundError, match="missing.sh"):
            connector.run_script(tmp_path / "missing.sh")
    assert shell.stdout == "3\na b\nit's\n-x\n"
    # $0 "sh" and argv[0] "-" show the scripts came in on stdin, not from a file on the host.
    assert "from sh" in shell.stderr
    assert python.stdout == "-|ü|--flag\n"


def test_run_script_runs_a_scripts_text_as_handed(ssh_host_config: HostConfig) -> None:
    """A transport runs what it is handed: text is run as it is (sh, or python3 when its first
    line names python), looked up nowhere."""
    with SshConnector(settings_for(ssh_host_config)) as connector:
        shell = connector.run_script('printf "%s|" "$@"; echo "from $0"', ["a b", "it's"], check=True)
        python = connector.run_script("#!/usr/bin/env python3\nimport sys\nprint(sys.argv[1:])\n", ["ü"], check=True)
        named = connector.run_script("windows_update.ps1", check=False)
    assert shell.stdout == "a b|it's|from sh\n"
    assert python.stdout == "['ü']\n"
    # A bare name is text, not a file to look up: sh reports the command it could not find.
    assert named.exit_code == 127 and "windows_update.ps1" in named.stderr


# -- files ----------------------------------------------------------------------------------


def test_put_and_get_round_trip_binary_without_leftovers(ssh: SshConnector, tmp_path: Path) -> None:
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    source.chmod(0o640)
    ssh.put(source, f"{remote_dir}/blob.bin")
    ssh.put(source, f"{remote_dir}/blob.bin")  # replacing an existing file is atomic too
    fetched = tmp_path / "fetched.bin"
    ssh.get(f"{remote_dir}/blob.bin", fetched)
    assert fetched.read_bytes() == source.read_bytes()
    listing = ssh.run(f"ls -A {remote_dir}; stat -c %a {remote_dir}/blob.bin", check=True).stdout.split()
    assert listing == ["blob.bin", "640"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "fetched.bin", "remote"]


def test_file_errors_name_host_and_path(ssh: SshConnector, tmp_path: Path) -> None:
    with pytest.raises(ConnectorError) as missing:
        ssh.get(f"{tmp_path}/no-such-file", tmp_path / "out")
    assert ssh.name in str(missing.value) and "no-such-file" in str(missing.value)
    assert not (tmp_path / "out").exists()
    source = tmp_path / "x"
    source.write_bytes(b"x")
    with pytest.raises(ConnectorError, match="no-such-dir"):
        ssh.put(source, f"{tmp_path}/no-such-dir/x")


# -- authentication and host keys ----------------------------------------------------------


def test_wrong_key_is_refused_without_retry(sshd_host: SshdHost, tmp_path: Path) -> None:
    stranger = make_key(tmp_path / "stranger", "not-authorized")
    config = sshd_host.host_config(ssh_key=str(stranger))
    with capture_logs() as events, pytest.raises(AuthenticationFailed) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert "'root'" in message and str(stranger) in message and "ssh-ed25519" in message
    assert not [e for e in events if e["event"] == "ssh.retry"]


def test_missing_key_file_is_reported_before_connecting(tmp_path: Path) -> None:
    config = HostConfig(name="nokey", address="127.0.0.1", port=1, transport="ssh", user="root",
                        ssh_key="keys/absent", ssh_agent=False)
    with pytest.raises(AuthenticationFailed) as caught:
        SshConnector(settings_for(config, tmp_path)).connect()
    assert "ssh_key" in str(caught.value) and str(tmp_path / "keys/absent") in str(caught.value)


def test_encrypted_key_with_passphrase_file_relative_to_config(sshd_factory: SshdMaker, tmp_path: Path) -> None:
    host = sshd_factory("ssh-passphrase")
    passphrase = "correct horse battery"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(tmp_path / "locked")], check=True)
    (tmp_path / "passphrase.txt").write_text(passphrase + "\n")
    host.authorize(tmp_path / "locked.pub")
    config = host.host_config(ssh_key="locked", ssh_key_passphrase="file:passphrase.txt")
    with SshConnector(settings_for(config, tmp_path)) as connector:
        assert connector.run("echo in", check=True).stdout == "in\n"
    (tmp_path / "wrong.txt").write_text("not it\n")
    wrong = host.host_config(ssh_key="locked", ssh_key_passphrase="file:wrong.txt")
    with pytest.raises(AuthenticationFailed) as caught:
        SshConnector(settings_for(wrong, tmp_path)).connect()
    assert "ssh_key_passphrase" in str(caught.value) and "not it" not in str(caught.value)
    with pytest.raises(AuthenticationFailed, match="ssh_key_passphrase"):
        SshConnector(settings_for(host.host_config(ssh_key="locked"), tmp_path)).connect()


@pytest.fixture
def ssh_agent(tmp_path: Path, ssh_client_key: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        # ssh-add fails until the agent listens; a bounded number of tries, not a timer.
        for _ in range(200):
            if subprocess.run(["ssh-add", "-q", str(ssh_client_key)], env=env, capture_output=True).returncode == 0:
                break
        else:
            pytest.fail(f"ssh-agent at {socket_path} never accepted the test key")
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        yield socket_path
    finally:
        agent.terminate()
        agent.wait()


def test_agent_keys_log_in(sshd_host: SshdHost, ssh_agent: Path) -> None:
    with SshConnector(settings_for(sshd_host.host_config(ssh_key=None, ssh_agent=True))) as connector:
        assert connector.run("echo agent", check=True).stdout == "agent\n"


def test_no_credentials_at_all_is_explained(sshd_host: SshdHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(AuthenticationFailed, match="no credentials for user 'root'"):
        SshConnector(settings_for(sshd_host.host_config(ssh_key=None, ssh_agent=True))).connect()


@pytest.fixture
def password_host(sshd_factory: SshdMaker, sshd_password_user: LocalUser) -> SshdHost:
    return sshd_factory("ssh-password", extra_config={"PasswordAuthentication": True}, user=sshd_password_user.name)


def _everything_logged(events: list[dict], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return "\n".join([repr(events), caplog.text, captured.out, captured.err])


def test_password_login_works_and_secret_stays_out_of_errors_and_logs(
        password_host: SshdHost, sshd_password_user: LocalUser, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    secret = sshd_password_user.password
    monkeypatch.setenv(PASSWORD_VAR, secret)
    config = password_host.host_config(ssh_key=None, password=f"env:{PASSWORD_VAR}")
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events, SshConnector(settings_for(config)) as connector:
        assert connector.run("id -un", check=True).stdout.strip() == sshd_password_user.name
        with pytest.raises(CommandFailed) as failed:
            connector.run(f"echo {secret} >&2; exit 1", check=True)
    assert secret not in str(failed.value) and "***" in str(failed.value)
    assert f"Accepted password for {sshd_password_user.name}" in password_host.log_path.read_text()
    assert secret not in _everything_logged(events, caplog, capsys)
    # After a real login the settings still hold the reference only.
    assert secret not in repr(connector.settings) and f"env:{PASSWORD_VAR}" in repr(connector.settings)


def test_wrong_password_fails_clearly_and_never_shows_the_secret(
        password_host: SshdHost, sshd_password_user: LocalUser, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "wrong-" + sshd_password_user.password[::-1]
    monkeypatch.setenv(PASSWORD_VAR, wrong)
    config = password_host.host_config(ssh_key=None, password=f"env:{PASSWORD_VAR}")
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events, pytest.raises(AuthenticationFailed) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).run("true")
    message = str(caught.value)
    assert sshd_password_user.name in message and f"password from env:{PASSWORD_VAR}" in message
    assert wrong not in message and wrong not in repr(caught.value.args)
    assert wrong not in _everything_logged(events, caplog, capsys)
    assert not [e for e in events if e["event"] == "ssh.retry"]


def test_unknown_host_key_is_rejected_with_fingerprint_and_fix(sshd_host: SshdHost, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with capture_logs() as events, pytest.raises(HostKeyRejected) as caught:
        SshConnector(settings_for(sshd_host.host_config(known_hosts=str(empty))), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert sshd_host.name in message and sshd_host.known_hosts_name in message
    assert sshd_host.fingerprint in message
    assert "ssh-keyscan" in message and "accept_unknown_host_key" in message
    assert empty.read_text() == ""
    assert not [e for e in events if e["event"] == "ssh.retry"]


def test_accepting_an_unknown_key_records_it_for_openssh_and_later_runs(sshd_host: SshdHost, tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    with SshConnector(settings_for(sshd_host.host_config(known_hosts=str(known), accept_unknown_host_key=True))) as first:
        first.run("true", check=True)
    # OpenSSH itself finds the recorded key under the [address]:port name.
    found = subprocess.run(["ssh-keygen", "-F", sshd_host.known_hosts_name, "-f", str(known)],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0 and sshd_host.known_hosts_line.split()[2] in found.stdout
    with SshConnector(settings_for(sshd_host.host_config(known_hosts=str(known)))) as strict:
        assert strict.run("echo ok", check=True).stdout == "ok\n"
    assert known.read_text().count("\n") == 1


def test_changed_host_key_is_rejected_even_when_accepting_unknown_keys(sshd_host: SshdHost, tmp_path: Path) -> None:
    impostor = make_key(tmp_path / "impostor", "impostor").with_suffix(".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"{sshd_host.known_hosts_name} {impostor[0]} {impostor[1]}\n")
    before = known.read_text()
    config = sshd_host.host_config(known_hosts=str(known), accept_unknown_host_key=True)
    with pytest.raises(HostKeyRejected) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert "MAN-IN-THE-MIDDLE" in message and sshd_host.fingerprint in message and "ssh-keygen -R" in message
    assert known.read_text() == before


def _public(path: Path) -> str:
    """'type base64' of a public key, as a known_hosts line carries it."""
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def test_known_hosts_with_marker_and_broken_lines_still_verifies_the_host(sshd_host: SshdHost, tmp_path: Path) -> None:
    """Certificate-authority and revocation lines, as OpenSSH sites write them, beside the host's
    own line: paramiko alone stops at the first marker with InvalidHostKey."""
    ca = make_key(tmp_path / "ca", "ca")
    stolen = make_key(tmp_path / "stolen", "stolen")
    known = tmp_path / "known_hosts"
    known.write_text(
        "# site keys\n"
        f"@cert-authority *.corp.example {_public(ca)}\n"
        f"@revoked * {_public(stolen)}\n"
        "not a known_hosts line\n"
        + sshd_host.known_hosts_line
    )
    with SshConnector(settings_for(sshd_host.host_config(known_hosts=str(known)))) as conn:
        assert conn.run("echo ok", check=True).stdout == "ok\n"
    # Host names hashed, as HashKnownHosts writes them (ssh-keygen -H refuses the broken line).
    known.write_text(known.read_text().replace("not a known_hosts line\n", ""))
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert sshd_host.known_hosts_name not in known.read_text() and "@cert-authority" in known.read_text()
    with SshConnector(settings_for(sshd_host.host_config(known_hosts=str(known)))) as conn:
        assert conn.run("echo ok", check=True).stdout == "ok\n"


def test_revoked_host_key_is_refused_before_authenticating(sshd_factory: SshdMaker, tmp_path: Path) -> None:
    host = sshd_factory("ssh-revoked")
    known = tmp_path / "known_hosts"
    # Recorded and revoked at once: the revocation wins, as in OpenSSH.
    known.write_text(host.known_hosts_line + f"@revoked * {_public(host.host_key)}\n")
    before = known.read_text()
    for accept_unknown in (False, True):
        config = host.host_config(known_hosts=str(known), accept_unknown_host_key=accept_unknown)
        with capture_logs() as events, pytest.raises(HostKeyRejected) as caught:
            SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
        message = str(caught.value)
        assert "REVOKED HOST KEY DETECTED" in message and host.fingerprint in message and "line 2" in message
        assert not [e for e in events if e["event"] == "ssh.retry"]
    assert known.read_text() == before
    # sshd saw key exchanges, never a login attempt.
    assert "Accepted" not in host.log_path.read_text() and "Failed" not in host.log_path.read_text()


def test_revoked_key_is_never_recorded_as_a_new_host(sshd_host: SshdHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked 10.9.9.9 {_public(sshd_host.host_key)}\n")
    config = sshd_host.host_config(known_hosts=str(known), accept_unknown_host_key=True)
    with pytest.raises(HostKeyRejected, match="REVOKED HOST KEY DETECTED"):
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    assert known.read_text().count("\n") == 1


def test_a_host_known_only_through_a_certificate_authority_says_why_it_is_unknown(
        sshd_host: SshdHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {_public(make_key(tmp_path / 'ca', 'ca'))}\n")
    with pytest.raises(HostKeyRejected) as caught:
        SshConnector(settings_for(sshd_host.host_config(known_hosts=str(known))), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert "unknown host key" in message and "@cert-authority lines (line 1) are not used" in message


def test_hosts_ping_reads_marker_lines_and_refuses_a_revoked_key(sshd_host: SshdHost, tmp_path: Path) -> None:
    """The user's path: `patchdrill hosts ping` on such files answers with rows, never a traceback."""
    runner = CliRunner()
    known = tmp_path / "known_hosts"
    config = tmp_path / "fleet.yaml"
    config.write_text(
        "storage: {kind: local, path: store}\nhosts:\n"
        f"  - {{name: {sshd_host.name}, transport: ssh, address: {sshd_host.address}, port: {sshd_host.port},\n"
        f"     user: {sshd_host.user}, ssh_key: {sshd_host.client_key}, ssh_agent: false, known_hosts: known_hosts,\n"
        "     connect_timeout: 5}\n"
    )
    known.write_text(f"@cert-authority * {_public(make_key(tmp_path / 'ca', 'ca'))}\n" + sshd_host.known_hosts_line)
    result = runner.invoke(app, ["hosts", "ping", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["reachable"] is True

    known.write_text(known.read_text() + f"@revoked * {_public(sshd_host.host_key)}\n")
    result = runner.invoke(app, ["hosts", "ping", "--config", str(config), "--json"])
    # A refused host is a row and exit code 2, as for any host that cannot be reached.
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [row] = json.loads(result.stdout)
    assert row["reachable"] is False and row["error"].startswith(f"{sshd_host.name}: REVOKED HOST KEY DETECTED")


# -- host down, back up, rebooted ----------------------------------------------------------


def test_unknown_name_is_unreachable_after_retries(ssh_client_key: Path) -> None:
    config = HostConfig(name="ghost", address="no-such-host.invalid", transport="ssh", user="root",
                        ssh_key=str(ssh_client_key), ssh_agent=False)
    with pytest.raises(HostUnreachable) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    assert "cannot resolve address 'no-such-host.invalid'" in str(caught.value) and "after 3 attempts" in str(caught.value)


def test_silent_server_is_a_handshake_timeout(ssh_client_key: Path) -> None:
    """A real listening socket that never speaks SSH: the kernel completes the TCP handshake."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = HostConfig(name="mute", address="127.0.0.1", port=silent.getsockname()[1], transport="ssh",
                            user="root", ssh_key=str(ssh_client_key), ssh_agent=False,
                            connect_timeout=0.3)
        with capture_logs() as events, pytest.raises(HostTimeout) as caught:
            SshConnector(settings_for(config), retry=RetryPolicy(attempts=2, initial=0.01, maximum=0.01)).connect()
    assert "did not complete the SSH handshake within 0.3s" in str(caught.value) and "after 2 attempts" in str(caught.value)
    assert len([e for e in events if e["event"] == "ssh.retry"]) == 1



def test_host_down_is_retried_then_unreachable_and_recovers(sshd_factory: SshdMaker) -> None:
    host = sshd_factory("ssh-flaky")
    connector = SshConnector(settings_for(host.config), retry=QUICK_RETRY)
    assert connector.run("echo up", check=True).stdout == "up\n"
    host.stop()
    with capture_logs() as events, pytest.raises(HostUnreachable) as caught:
        connector.run("echo again")
    retries = [e for e in events if e["event"] == "ssh.retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    message = str(caught.value)
    assert host.name in message and f"{host.address}:{host.port}" in message and "after 3 attempts" in message
    host.start()
    assert connector.run("echo back", check=True).stdout == "back\n"
    connector.close()


def test_wait_until_up_sees_a_new_boot_after_reboot(sshd_factory: SshdMaker) -> None:
    host = sshd_factory("ssh-reboot", namespace=True)
    with SshConnector(settings_for(host.config), retry=QUICK_RETRY) as connector:
        before = connector.boot_identity()
        assert before.boot_id == host.boot_id
        assert before.os_family == "linux" and before.os_name
        connector.run("touch /run/reboot-required", check=True)
        assert (host.run_dir / "reboot-required").exists()
        host.reboot(down_for=0.3)
        after = connector.wait_until_up(60, interval=0.1, not_boot_id=before.boot_id)
        assert after.boot_id == host.boot_id != before.boot_id
        assert connector.run("test -e /run/reboot-required").exit_code == 1


def test_wait_until_up_times_out_when_the_host_never_reboots(ssh: SshConnector) -> None:
    current = ssh.boot_identity().boot_id
    with pytest.raises(HostTimeout, match="did not reboot"):
        ssh.wait_until_up(0.3, interval=0.1, not_boot_id=current)


def test_each_host_has_its_own_address_and_boot_id(sshd_factory: SshdMaker) -> None:
    hosts = [sshd_factory(f"ssh-multi-{n}", namespace=True) for n in range(2)]
    identities = []
    for host in hosts:
        with SshConnector(settings_for(host.config)) as connector:
            identities.append(connector.boot_identity().boot_id)
    assert len({h.address for h in hosts}) == 2
    assert identities == [h.boot_id for h in hosts] and identities[0] != identities[1]
