"""Hosts behind a bastion: real sshd servers in a network namespace the tests cannot reach.

    bastion_lab   module   BastionLab: an `outer` bastion the test reaches over a veth pair, and
                           an `inner` bastion and a `target` that listen only on the namespace's
                           own loopback (127.0.0.2, 127.0.0.3), so the only way in is through
                           `outer` (and, for two hops, `inner`).

From the test's side the namespace's loopback does not exist: 127.0.0.3 there is the machine's
own loopback, where nothing listens on the target's port. Needs root and iproute2 (`ip netns`).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hosts.sshd_server import SshdHost, make_key, require_tools

# Ports inside a fresh namespace are all free; the range stays clear of well-known services.
PORTS = (20000, 60000)
SUBNET_ATTEMPTS = 8


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class NamespacedSshdHost(SshdHost):
    """An SshdHost whose sshd runs inside network namespace `netns`, on a port chosen up front
    (the machine's free ports say nothing about the namespace's, and its addresses are not ours)."""

    netns: str = ""

    def _command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super()._command()]

    def start(self) -> None:
        if not self.port:
            self.port = random.randint(*PORTS)
        super().start()
        self.known_hosts.write_text(self.known_hosts_line)


@dataclass
class BastionLab:
    netns: str
    outside_address: str
    outer: NamespacedSshdHost
    inner: NamespacedSshdHost
    target: NamespacedSshdHost
    workdir: Path
    bastion_key: Path
    hosts: list[SshdHost] = field(default_factory=list)

    @property
    def known_hosts_lines(self) -> str:
        return "".join(h.known_hosts_line for h in (self.outer, self.inner, self.target))

    def log_offsets(self) -> dict[str, int]:
        """Where each host's log ends now, to read only what a test caused."""
        return {h.name: h.log_path.stat().st_size for h in (self.outer, self.inner, self.target)}

    @staticmethod
    def log_since(host: SshdHost, offsets: dict[str, int]) -> str:
        return host.log_path.read_bytes()[offsets[host.name]:].decode(errors="replace")


def _veth(netns: str) -> tuple[str, str, str]:
    """A veth pair into netns on a random /30; returns (host side name, our address, its address)."""
    outside_name, inside_name = f"{netns[-8:]}h", f"{netns[-8:]}n"
    _ip("link", "add", outside_name, "type", "veth", "peer", "name", inside_name)
    _ip("link", "set", inside_name, "netns", netns)
    for _ in range(SUBNET_ATTEMPTS):
        # Parallel test runs on the machine each pick their own subnet; retry on a clash.
        base = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.{random.randrange(0, 256, 4)}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        ours, theirs = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
        if _ip("addr", "add", f"{ours}/30", "dev", outside_name, check=False).returncode == 0:
            break
    else:
        raise RuntimeError(f"no free 10.x/30 subnet for the veth pair of {netns}")
    _ip("link", "set", outside_name, "up")
    _ip("netns", "exec", netns, "ip", "addr", "add", f"{theirs}/30", "dev", inside_name)
    _ip("netns", "exec", netns, "ip", "link", "set", inside_name, "up")
    return outside_name, ours, theirs


@pytest.fixture(scope="module")
def bastion_lab(tmp_path_factory: pytest.TempPathFactory, ssh_client_key: Path) -> Iterator[BastionLab]:
    require_tools()
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise RuntimeError("the bastion lab needs root and iproute2's 'ip' to make a network namespace")
    netns = f"pdtj{secrets.token_hex(4)}"
    workdir = tmp_path_factory.mktemp("bastion-lab")
    workdir.chmod(0o700)
    _ip("netns", "add", netns)
    outside_name = ""
    hosts: list[NamespacedSshdHost] = []
    try:
        _ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        outside_name, ours, theirs = _veth(netns)

        def make(name: str, address: str) -> NamespacedSshdHost:
            host = NamespacedSshdHost(name=name, address=address, workdir=workdir / name,
                                      client_key=ssh_client_key, netns=netns)
            hosts.append(host)
            host.start()
            return host

        bastion_key = make_key(workdir / "bastion_id", "bastion-only")
        outer = make("outer", theirs)
        inner = make("inner", "127.0.0.2")
        target = make("target", "127.0.0.3")
        # The bastions let in only the key the ssh config names (IdentityFile), not the host's ssh_key.
        for bastion in (outer, inner):
            bastion.authorized_keys.write_text(bastion_key.with_suffix(".pub").read_text())
        yield BastionLab(netns=netns, outside_address=ours, outer=outer, inner=inner, target=target,
                         workdir=workdir, bastion_key=bastion_key, hosts=list(hosts))
    finally:
        for host in hosts:
            host.close()
        _ip("netns", "del", netns, check=False)
        if outside_name:
            _ip("link", "del", outside_name, check=False)
