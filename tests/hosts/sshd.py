"""Test host fixtures (sshd): real OpenSSH servers on 127.0.0.x loopback addresses.

    sshd_fleet            session   SshdFleet; .create(name, extra_config=None, namespace=False,
                                    user="root") -> SshdHost, kept until the session ends
    sshd_factory          function  same call signature; the hosts it made stop after the test
    sshd_host             session   one shared plain host (do not stop or reboot it)
    ssh_host_config       session   sshd_host.config: a ready HostConfig (root, throwaway key)
    ssh_client_key        session   the throwaway private key every host authorizes
    sshd_password_user    session   LocalUser(name, password): a real account for password auth

Each host has its own address (127.0.0.11, .12, …), a free port, a throwaway ed25519 host key
and a known_hosts file holding just that key. See tests/hosts/sshd_server.py for SshdHost.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from configs.models import HostConfig
from tests.hosts.sshd_server import ConfigValue, SshdHost, make_key, require_tools
from tests.hosts.sshd_users import LocalUser, create_user, delete_user

FIRST_HOST_OCTET = 11


class SshdMaker(Protocol):
    def __call__(self, name: str, *, extra_config: dict[str, ConfigValue] | None = None,
                 namespace: bool = False, user: str = "root") -> SshdHost: ...


class SshdFleet:
    """Makes sshd hosts, each on the next free 127.0.0.x address, and stops them all at the end."""

    def __init__(self, workdir: Path, client_key: Path) -> None:
        self.workdir = workdir
        self.client_key = client_key
        self.hosts: list[SshdHost] = []
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def _next_address(self) -> tuple[int, str]:
        number = next(self._numbers)
        # Skip .0 and .255 in each /24 so every address is an ordinary host address.
        third, fourth = divmod(FIRST_HOST_OCTET - 1 + number, 254)
        return number, f"127.0.{third}.{fourth + 1}"

    def create(self, name: str, *, extra_config: dict[str, ConfigValue] | None = None,
               namespace: bool = False, user: str = "root") -> SshdHost:
        with self._lock:
            number, address = self._next_address()
        host = SshdHost(name=name, address=address, workdir=self.workdir / f"{number:03d}-{name}",
                        client_key=self.client_key, extra_config=dict(extra_config or {}),
                        namespace=namespace, user=user)
        with self._lock:
            self.hosts.append(host)
        host.start()
        return host

    def close(self) -> None:
        errors = []
        for host in self.hosts:
            try:
                host.close()
            except Exception as exc:  # noqa: BLE001 - stop every host, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def ssh_client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools()
    keys = tmp_path_factory.mktemp("ssh-client")
    keys.chmod(0o700)
    return make_key(keys / "id_ed25519", "patchdrill-tests")


@pytest.fixture(scope="session")
def sshd_fleet(tmp_path_factory: pytest.TempPathFactory, ssh_client_key: Path) -> Iterator[SshdFleet]:
    workdir = tmp_path_factory.mktemp("sshd-hosts")
    workdir.chmod(0o700)
    fleet = SshdFleet(workdir, ssh_client_key)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def sshd_factory(sshd_fleet: SshdFleet) -> Iterator[SshdMaker]:
    made: list[SshdHost] = []

    def make(name: str, *, extra_config: dict[str, ConfigValue] | None = None,
             namespace: bool = False, user: str = "root") -> SshdHost:
        host = sshd_fleet.create(name, extra_config=extra_config, namespace=namespace, user=user)
        made.append(host)
        return host

    yield make
    for host in made:
        host.close()


@pytest.fixture(scope="session")
def sshd_host(sshd_fleet: SshdFleet) -> SshdHost:
    return sshd_fleet.create("ssh-shared")


@pytest.fixture(scope="session")
def ssh_host_config(sshd_host: SshdHost) -> HostConfig:
    return sshd_host.config


@pytest.fixture(scope="session")
def sshd_password_user() -> Iterator[LocalUser]:
    user = create_user()
    try:
        yield user
    finally:
        delete_user(user)
