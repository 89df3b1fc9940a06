"""Test host fixtures (winrm): WS-Management test hosts pywinrm talks to for real.

Real: HTTP and HTTPS (certificates from a throwaway CA, validated by the client), the WS-Man
SOAP envelopes, Basic and NTLM authentication (with channel binding over HTTPS), NTLM message
encryption over HTTP, the shell lifecycle (Create, Command, Send, Receive, Signal, Delete) and
its OperationTimeout fault, a host going down and coming back (tests/hosts/wsman_server.py).

Simulated: PowerShell and Windows itself. There is no Windows here; scripts are answered by
handlers that stand in for Windows, and plain shell text sent by transport tests runs under
`sh` (tests/hosts/wsman_sim.py says exactly how).

Fixtures:
  winrm_server            session: HTTPS + NTLM (channel binding checked), CA bundle for the client
  winrm_http_ntlm_server  session: plain HTTP + NTLM with message encryption
  winrm_http_basic_server session: plain HTTP + Basic (AllowUnencrypted on, as a lab listener)
  winrm_host              a HostConfig for winrm_server (password as an env: reference)
  wsman_host_factory      make(**WsmanTestHost options) -> a started host, stopped at session end
  fresh_winrm_server      a private HTTPS + NTLM host for one test (reboots, extra handlers)
  wsman_pki               the CA and server certificate the HTTPS hosts use
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from configs.models import HostConfig
from tests.hosts.wsman_auth import NtlmUserStore
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_tls import CertificateAuthority, ServerTls, issue_server_cert, make_ca

HostFactory = Callable[..., WsmanTestHost]


@dataclass(frozen=True)
class WsmanPki:
    ca: CertificateAuthority
    server: ServerTls
    directory: Path


@pytest.fixture(scope="session")
def wsman_pki(tmp_path_factory: pytest.TempPathFactory) -> WsmanPki:
    directory = tmp_path_factory.mktemp("wsman-pki")
    ca = make_ca(directory)
    return WsmanPki(ca=ca, server=issue_server_cert(ca, directory / "server"), directory=directory)


@pytest.fixture(scope="session")
def ntlm_user_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NtlmUserStore]:
    store = NtlmUserStore(tmp_path_factory.mktemp("wsman-ntlm") / "ntlm-users")
    store.activate()
    yield store
    store.deactivate()


@pytest.fixture(scope="session")
def wsman_host_factory(wsman_pki: WsmanPki, ntlm_user_store: NtlmUserStore) -> Iterator[HostFactory]:
    started: list[WsmanTestHost] = []
    env_names: list[str] = []

    def make(**options: Any) -> WsmanTestHost:
        index = len(started)
        password = secrets.token_urlsafe(16)
        env_name = f"PATCHDRILL_TEST_WINRM_PASSWORD_{os.getpid()}_{index}"
        os.environ[env_name] = password
        env_names.append(env_name)
        scheme = options.pop("scheme", "https")
        defaults: dict[str, Any] = {
            "user": f"patchdrill{index}", "password": password, "password_env": env_name, "scheme": scheme,
            "ntlm_store": ntlm_user_store,
        }
        if scheme == "https":
            defaults.update(tls=wsman_pki.server, ca_bundle=wsman_pki.ca.bundle)
        host = WsmanTestHost(**{**defaults, **options})
        started.append(host)
        return host.start()

    yield make
    for host in started:
        host.stop()
    for name in env_names:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def winrm_server(wsman_host_factory: HostFactory) -> WsmanTestHost:
    return wsman_host_factory(scheme="https", auth=("ntlm",))


@pytest.fixture(scope="session")
def winrm_http_ntlm_server(wsman_host_factory: HostFactory) -> WsmanTestHost:
    return wsman_host_factory(scheme="http", auth=("ntlm",))


@pytest.fixture(scope="session")
def winrm_http_basic_server(wsman_host_factory: HostFactory) -> WsmanTestHost:
    return wsman_host_factory(scheme="http", auth=("basic",))


@pytest.fixture
def winrm_host(winrm_server: WsmanTestHost) -> HostConfig:
    return winrm_server.host_config()


@pytest.fixture
def fresh_winrm_server(wsman_host_factory: HostFactory) -> Iterator[WsmanTestHost]:
    host = wsman_host_factory(scheme="https", auth=("ntlm",))
    yield host
    host.stop()
