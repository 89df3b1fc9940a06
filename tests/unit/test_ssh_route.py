"""How a host's fields and an OpenSSH client config combine into a route (pure parsing)."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest

from connectors.ssh_route import MAX_HOPS, Endpoint, RouteError, load_ssh_config, resolve_route


def _config(text: str) -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_text(text)


def test_host_fields_win_over_the_config_and_fill_from_it() -> None:
    config = _config("Host db\n  HostName 10.0.0.5\n  Port 2222\n  User ops\n  IdentityFile ~/.ssh/db_key\n")
    route = resolve_route(config, "db", port=None, user=None)
    assert route.target == Endpoint("db", "10.0.0.5", 2222, "ops", (Path("~/.ssh/db_key").expanduser(),))
    assert route.jumps == ()
    explicit = resolve_route(config, "db", port=22, user="patchdrill").target
    assert (explicit.hostname, explicit.port, explicit.user) == ("10.0.0.5", 22, "patchdrill")


def test_proxyjump_list_with_users_ports_and_ipv6() -> None:
    config = _config("Host app\n  ProxyJump ops@gw.example:2200,[fd00::7]:2022,ssh://last\n")
    route = resolve_route(config, "app", port=None, user="patchdrill")
    assert [(j.hostname, j.port, j.user) for j in route.jumps] == [
        ("gw.example", 2200, "ops"), ("fd00::7", 2022, "patchdrill"), ("last", 22, "patchdrill")]


def test_the_first_hop_follows_its_own_proxyjump_and_none_means_direct() -> None:
    config = _config("Host app\n  ProxyJump inner\nHost inner\n  ProxyJump outer\n  User in\n"
                     "Host outer\n  HostName 192.0.2.1\nHost direct\n  ProxyJump none\n")
    route = resolve_route(config, "app", port=None, user="u")
    assert [(j.alias, j.hostname, j.user) for j in route.jumps] == [("outer", "192.0.2.1", "u"), ("inner", "inner", "in")]
    assert resolve_route(config, "direct", port=None, user="u").jumps == ()


def test_a_proxyjump_loop_is_an_error_not_a_hang() -> None:
    config = _config("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n")
    with pytest.raises(RouteError, match=f"longer than {MAX_HOPS} hops"):
        resolve_route(config, "a", port=None, user="u")


@pytest.mark.parametrize("text, fault", [
    ("Host x\n  Port many\n", "port that is not a number"),
    ("Host x\n  ProxyJump gw:abc\n", "'gw:abc' has a port that is not a number"),
    ("Host x\n  ProxyJump u@\n", "names no host"),
    ("Host x\n  ProxyCommand nc %h %p\n", "ProxyCommand, which patchdrill does not run"),
])
def test_bad_entries_say_what_is_wrong(text: str, fault: str) -> None:
    with pytest.raises(RouteError, match=fault):
        resolve_route(_config(text), "x", port=None, user="u")


def test_a_configured_file_must_exist_and_the_default_may_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RouteError, match=f"field ssh_config: file '{tmp_path / 'nope'}' does not exist"):
        load_ssh_config(tmp_path / "nope")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_route(load_ssh_config(None), "h", port=None, user="u").target.hostname == "h"
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host h\n  HostName 198.51.100.9\n")
    assert resolve_route(load_ssh_config(None), "h", port=None, user="u").target.hostname == "198.51.100.9"
