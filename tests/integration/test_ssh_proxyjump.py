"""Hosts behind bastions: ProxyJump and the OpenSSH client config, through real sshd servers.

The target and the inner bastion listen only inside a network namespace (tests/hosts/
sshd_bastion.py): a direct connection cannot reach them, so every passing connection went
through the bastions, and their own logs say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from configs.models import HostConfig
from connectors import settings_for
from connectors.base import AuthenticationFailed, HostKeyRejected, HostUnreachable, RetryPolicy
from connectors.ssh import SshConnector
from cli.app import app
from tests.hosts.sshd_bastion import BastionLab, bastion_lab  # noqa: F401 - the fixture
from tests.hosts.sshd_server import make_key

pytestmark = pytest.mark.integration

QUICK_RETRY = RetryPolicy(attempts=2, initial=0.01, maximum=0.05, deadline=30)


def _ssh_config(lab: BastionLab, path: Path, *, target_jump: str = "outer") -> Path:
    """An OpenSSH client config naming the hosts by alias, as an operator's ~/.ssh/config would."""
    path.write_text(
        "Host outer\n"
        f"  HostName {lab.outer.address}\n  Port {lab.outer.port}\n  User root\n"
        f"  IdentityFile {lab.bastion_key}\n"
        "Host inner\n"
        f"  HostName {lab.inner.address}\n  Port {lab.inner.port}\n"
        f"  IdentityFile {lab.bastion_key}\n  ProxyJump outer\n"
        "Host target\n"
        f"  HostName {lab.target.address}\n  Port {lab.target.port}\n  ProxyJump {target_jump}\n"
    )
    return path


def _host(lab: BastionLab, tmp_path: Path, **overrides: Any) -> HostConfig:
    known = tmp_path / "known_hosts"
    if not known.exists():
        known.write_text(lab.known_hosts_lines)
    fields: dict[str, Any] = {
        "name": "behind", "address": "target", "transport": "ssh", "user": "root",
        "ssh_key": str(lab.target.client_key), "ssh_agent": False, "known_hosts": str(known),
        "ssh_config": str(_ssh_config(lab, tmp_path / "ssh_config")), "connect_timeout": 5.0,
    }
    return HostConfig.model_validate({**fields, **overrides})


def test_the_target_cannot_be_reached_directly(bastion_lab: BastionLab, tmp_path: Path) -> None:
    """The premise of every other test here: without the bastion there is no way in."""
    direct = bastion_lab.target.host_config(known_hosts=str(tmp_path / "kh"))
    with pytest.raises(HostUnreachable, match=f"cannot connect to {bastion_lab.target.address}"):
        SshConnector(settings_for(direct), retry=RetryPolicy(attempts=1)).connect()


def test_proxyjump_from_the_ssh_config_reaches_the_target_through_the_bastion(
        bastion_lab: BastionLab, tmp_path: Path) -> None:
    lab = bastion_lab
    offsets = lab.log_offsets()
    source = tmp_path / "payload.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    with capture_logs() as events, SshConnector(settings_for(_host(lab, tmp_path))) as connector:
        # SSH_CONNECTION is "client-ip client-port server-ip server-port" as the target saw it.
        seen = connector.run("echo $SSH_CONNECTION", check=True).stdout.split()
        assert connector.run("echo again", check=True).stdout == "again\n"
        connector.put(source, str(tmp_path / "copied.bin"))
        connector.get(str(tmp_path / "copied.bin"), tmp_path / "back.bin")
    assert (seen[2], seen[3]) == (lab.target.address, str(lab.target.port))
    # The target's client is inside the namespace: the bastion, connecting over its loopback.
    assert seen[0] == "127.0.0.1"
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    # The bastion let in the IdentityFile key (the only one it authorizes), from outside the namespace.
    assert f"Accepted publickey for root from {lab.outside_address}" in lab.log_since(lab.outer, offsets)
    assert "Accepted publickey for root from 127.0.0.1" in lab.log_since(lab.target, offsets)
    assert lab.log_since(lab.inner, offsets) == ""
    connected = [e for e in events if e["event"] == "ssh.connected"]
    assert len(connected) == 1 and connected[0]["via"] == [f"{lab.outer.address}:{lab.outer.port}"]


@pytest.mark.parametrize("target_jump", ["inner", "root@{outer},{inner}"], ids=["chained-in-config", "two-hop-list"])
def test_two_jump_hosts_in_a_row(bastion_lab: BastionLab, tmp_path: Path, target_jump: str) -> None:
    """Both ways OpenSSH writes two hops: a hop whose own entry has a ProxyJump, and a list."""
    lab = bastion_lab
    jump = target_jump.format(outer=f"{lab.outer.address}:{lab.outer.port}",
                              inner=f"[{lab.inner.address}]:{lab.inner.port}")
    config = _host(lab, tmp_path)
    _ssh_config(lab, Path(config.ssh_config or ""), target_jump=jump)
    bastions = (lab.outer, lab.inner)
    authorized = [b.authorized_keys.read_text() for b in bastions]
    if "," in jump:
        # Hops named by address carry no IdentityFile: the bastions must let the host's key in too.
        for bastion in bastions:
            bastion.authorize(lab.target.client_key.with_suffix(".pub"))
    offsets = lab.log_offsets()
    try:
        with SshConnector(settings_for(config)) as connector:
            assert connector.run("echo through two", check=True).stdout == "through two\n"
    finally:
        for bastion, keys in zip(bastions, authorized):
            bastion.authorized_keys.write_text(keys)
    assert f"Accepted publickey for root from {lab.outside_address}" in lab.log_since(lab.outer, offsets)
    assert "Accepted publickey for root from 127.0.0.1" in lab.log_since(lab.inner, offsets)
    assert "Accepted publickey for root from 127.0.0.1" in lab.log_since(lab.target, offsets)


def test_a_wrong_bastion_host_key_is_refused_naming_the_bastion(bastion_lab: BastionLab, tmp_path: Path) -> None:
    lab = bastion_lab
    impostor = make_key(tmp_path / "impostor", "impostor").with_suffix(".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"{lab.outer.known_hosts_name} {impostor[0]} {impostor[1]}\n"
                     + lab.inner.known_hosts_line + lab.target.known_hosts_line)
    before = known.read_text()
    offsets = lab.log_offsets()
    config = _host(lab, tmp_path, accept_unknown_host_key=True)
    with capture_logs() as events, pytest.raises(HostKeyRejected) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert message.startswith(f"behind: jump host outer: WARNING: HOST KEY FOR {lab.outer.known_hosts_name} HAS CHANGED")
    assert lab.outer.fingerprint in message and "\n" not in message
    assert not [e for e in events if e["event"] == "ssh.retry"]
    assert known.read_text() == before
    # Refused before authenticating, and the target never saw a connection.
    assert "Accepted" not in lab.log_since(lab.outer, offsets)
    assert lab.log_since(lab.target, offsets) == ""


def test_an_unknown_bastion_is_refused_or_recorded_like_any_host(bastion_lab: BastionLab, tmp_path: Path) -> None:
    lab = bastion_lab
    known = tmp_path / "known_hosts"
    known.write_text(lab.target.known_hosts_line)
    with pytest.raises(HostKeyRejected) as caught:
        SshConnector(settings_for(_host(lab, tmp_path)), retry=QUICK_RETRY).connect()
    assert str(caught.value).startswith(f"behind: jump host outer: unknown host key for {lab.outer.known_hosts_name}")
    with SshConnector(settings_for(_host(lab, tmp_path, accept_unknown_host_key=True))) as connector:
        assert connector.run("echo ok", check=True).stdout == "ok\n"
    assert known.read_text() == lab.target.known_hosts_line + lab.outer.known_hosts_line


def test_a_bastion_that_cannot_reach_the_target_is_a_transient_fault(bastion_lab: BastionLab, tmp_path: Path) -> None:
    lab = bastion_lab
    config = _host(lab, tmp_path)
    # Port 1 inside the namespace: nothing listens there, so the bastion's own connect is refused.
    Path(config.ssh_config or "").write_text(
        Path(config.ssh_config or "").read_text().replace(f"Port {lab.target.port}", "Port 1"))
    known = Path(config.known_hosts or "")
    with capture_logs() as events, pytest.raises(HostUnreachable) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert f"jump host outer ({lab.outer.address}:{lab.outer.port}) cannot reach {lab.target.address}:1" in message
    assert "after 2 attempts" in message and known.exists()
    assert len([e for e in events if e["event"] == "ssh.retry"]) == 1


def _fleet(tmp_path: Path, lab: BastionLab, ssh_config: str) -> Path:
    (tmp_path / "known_hosts").write_text(lab.known_hosts_lines)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "storage: {kind: local, path: store}\nhosts:\n"
        "  - {name: behind, transport: ssh, address: target, user: root, ssh_agent: false,\n"
        f"     ssh_key: {lab.target.client_key}, known_hosts: known_hosts, ssh_config: {ssh_config},\n"
        "     connect_timeout: 5}\n")
    return fleet


def test_hosts_ping_reaches_a_host_behind_a_bastion_with_a_config_relative_ssh_config(
        bastion_lab: BastionLab, tmp_path: Path) -> None:
    """The user's path: the fleet file names an ssh config beside it; `hosts ping` goes through."""
    _ssh_config(bastion_lab, tmp_path / "ssh_config")
    result = CliRunner().invoke(app, ["hosts", "ping", "--config", str(_fleet(tmp_path, bastion_lab, "ssh_config")),
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["reachable"] is True


def test_hosts_ping_names_a_missing_ssh_config(bastion_lab: BastionLab, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["hosts", "ping", "--config", str(_fleet(tmp_path, bastion_lab, "absent")),
                                      "--json"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [row] = json.loads(result.stdout)
    assert row["reachable"] is False
    assert row["error"] == f"behind: field ssh_config: file {str(tmp_path / 'absent')!r} does not exist"


def test_the_hosts_password_is_never_offered_to_a_bastion(
        bastion_lab: BastionLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = bastion_lab
    monkeypatch.setenv("PATCHDRILL_TEST_TARGET_PASSWORD", "target-only-secret")
    config = _host(lab, tmp_path, password="env:PATCHDRILL_TEST_TARGET_PASSWORD")
    # Without its IdentityFile the bastion (which authorizes only that key) refuses everything offered.
    Path(config.ssh_config or "").write_text(
        Path(config.ssh_config or "").read_text().replace(f"  IdentityFile {lab.bastion_key}\n", ""))
    offsets = lab.log_offsets()
    with pytest.raises(AuthenticationFailed) as caught:
        SshConnector(settings_for(config), retry=QUICK_RETRY).connect()
    message = str(caught.value)
    assert message.startswith("behind: jump host outer: user 'root' was refused by")
    assert f"tried: key file {lab.target.client_key}" in message and "password" not in message
    assert "password" not in lab.log_since(lab.outer, offsets).lower()
