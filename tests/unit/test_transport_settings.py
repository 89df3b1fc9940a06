"""Each transport declares its own settings; a host's config maps onto them, and a connector
sees nothing else of the host (maintenance windows, update domains, disks, groups)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from configs.models import HostConfig
from connectors import open_connector, settings_for
from connectors.base import AuthenticationFailed, RetryPolicy
from connectors.local import LocalConnector, LocalSettings
from connectors.ssh import SshConnector, SshSettings
from connectors.winrm import WinRmConnector, WinRmSettings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Value-that-must-stay-hidden"
#: What a host's config holds that no transport needs.
DOMAIN_FIELDS = {"maintenance_windows", "update_domain", "disks", "groups", "tags", "timezone", "os_family"}


def _busy_host(transport: str, **fields: object) -> HostConfig:
    """A host with every domain field set, so a leak into the settings would show."""
    return HostConfig(name=f"{transport}-1", transport=transport, update_domain=3, groups=["web"], tags={"a": "b"},
                      timezone="Europe/Paris", maintenance_windows=[{"start": "01:00", "duration_minutes": 60}],
                      disks=[{"name": "data", "path": "/dev/sdb"}], **fields)  # type: ignore[arg-type]


def test_each_transport_gets_its_own_settings_and_none_of_the_domain(tmp_path: Path) -> None:
    local = settings_for(_busy_host("local"))
    ssh = settings_for(_busy_host("ssh", user="root", address="web1", port=2222, ssh_key="keys/id",
                                  known_hosts="kh", ssh_config="/etc/ssh/cfg", password="env:PW"), tmp_path)
    winrm = settings_for(_busy_host("winrm", os_family="windows", user="adm", password="file:pw.txt",
                                    winrm_scheme="http", winrm_ca_bundle="ca.pem"), tmp_path)

    assert local == LocalSettings(name="local-1")
    assert isinstance(ssh, SshSettings) and isinstance(winrm, WinRmSettings)
    for settings in (local, ssh, winrm):
        assert not DOMAIN_FIELDS & {f.name for f in dataclasses.fields(settings)}
    # Relative paths are the config directory's; absolute ones stay as written.
    assert (ssh.key_file, ssh.known_hosts, ssh.ssh_config) == (tmp_path / "keys/id", tmp_path / "kh", Path("/etc/ssh/cfg"))
    assert (ssh.address, ssh.port, ssh.user) == ("web1", 2222, "root")
    assert winrm.ca_bundle == tmp_path / "ca.pem"
    assert (winrm.scheme, winrm.port) == ("http", 5985)  # the scheme's default port, decided once here
    # Credentials stay references, resolved against the config's directory when read.
    assert (str(ssh.password), str(winrm.password)) == ("env:PW", "file:pw.txt")
    assert winrm.password is not None and winrm.password.base_dir == tmp_path


def test_a_connector_is_opened_from_its_settings_alone(tmp_path: Path) -> None:
    conn = open_connector(LocalSettings(name="here"))
    assert isinstance(conn, LocalConnector) and conn.run("echo $((6*7))", check=True).stdout == "42\n"
    ssh = open_connector(settings_for(HostConfig(name="s", transport="ssh", user="u")))
    win = open_connector(settings_for(HostConfig(name="w", transport="winrm", os_family="windows", user="u",
                                                 password="env:PW")))
    assert isinstance(ssh, SshConnector) and isinstance(win, WinRmConnector)
    with pytest.raises(ValueError, match="'here'.*SshConnector takes SshSettings.*not LocalSettings"):
        SshConnector(LocalSettings(name="here"))  # type: ignore[arg-type]


def test_resolved_secrets_never_appear_in_settings_reprs_or_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_TEST_PW", SECRET)
    (tmp_path / "pass.txt").write_text(SECRET + "\n")
    ssh = settings_for(HostConfig(name="s", transport="ssh", user="u", address="127.0.0.1", port=1, ssh_agent=False,
                                  password="env:PD_TEST_PW", ssh_key_passphrase="file:pass.txt",
                                  known_hosts=str(tmp_path / "kh"), connect_timeout=1), tmp_path)
    winrm = settings_for(HostConfig(name="w", transport="winrm", os_family="windows", user="u",
                                    password="env:PD_TEST_PW"), tmp_path)
    assert isinstance(ssh, SshSettings) and isinstance(winrm, WinRmSettings)
    # Read the way a connection reads them: the values are there, the settings never hold them.
    assert ssh.password is not None and ssh.password.value() == SECRET
    assert ssh.key_passphrase is not None and ssh.key_passphrase.value() == SECRET
    with capture_logs() as events:
        # Nothing listens on port 1: the connection reads the password, then fails to connect.
        with pytest.raises(Exception) as failed:
            SshConnector(ssh, retry=RetryPolicy(attempts=1)).connect()
    shown = [repr(ssh), str(ssh), repr(winrm), str(winrm), repr(dataclasses.asdict(ssh)), str(failed.value),
             repr(events)]
    assert not [text for text in shown if SECRET in text]
    assert "env:PD_TEST_PW" in repr(ssh) and "file:pass.txt" in repr(ssh)


def test_an_unreadable_credential_names_its_field_and_reference(tmp_path: Path) -> None:
    settings = settings_for(HostConfig(name="s", transport="ssh", user="u", ssh_agent=False,
                                       password="env:PD_TEST_UNSET_VARIABLE"), tmp_path)
    with pytest.raises(AuthenticationFailed, match="s: field password: .*PD_TEST_UNSET_VARIABLE"):
        SshConnector(settings, retry=RetryPolicy(attempts=1)).connect()


@pytest.mark.parametrize("module", ["local", "ssh", "winrm", "known_hosts", "ssh_route", "powershell"])
def test_transports_import_nothing_of_a_hosts_config(module: str) -> None:
    """A transport needs only its settings: the host's config model stays in connectors/__init__."""
    tree = ast.parse((ROOT / "connectors" / f"{module}.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "configs.models" not in imported
