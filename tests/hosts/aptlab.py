"""A sandboxed apt root: real apt-get and dpkg installing small generated packages.

Nothing touches the machine's own packages: APT_CONFIG points apt at a private root, dpkg gets
--root/--admindir through DPkg::Options, and dpkg-query reads DPKG_ADMINDIR. Two flat
repositories are built with apt-ftparchive; one carries a security Release (Label
Debian-Security, Suite stable-security), which is how apt tells security updates apart.
The sandbox and the packages are made by cli/lab_apt.py, as the lab host's are for `make demo`.
An SSH test host passes `AptLab.env` with sshd's SetEnv (`AptLab.sshd_setenv`).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import pytest

from cli import lab_apt

Repository = Literal["main", "security"]
_RELEASES: dict[Repository, dict[str, str]] = {
    "main": {"Origin": "Debian", "Label": "Debian", "Suite": "stable", "Codename": "bookworm", "Version": "12"},
    "security": lab_apt.SECURITY_RELEASE,
}
# The postinst of a kernel-like package: what Debian's kernel packages do to ask for a reboot.
# With --force-script-chrootless dpkg runs it on the real root and says where its root is.
REBOOT_POSTINST = '#!/bin/sh\nset -e\nmkdir -p "$DPKG_ROOT/run"\ntouch "$DPKG_ROOT/run/reboot-required"\n'


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class AptLab:
    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def admindir(self) -> Path:
        return self.root / "var/lib/dpkg"

    @property
    def apt_config(self) -> Path:
        return self.base / "apt.conf"

    def repository(self, which: Repository) -> Path:
        return self.base / f"repo-{which}"

    @property
    def env(self) -> dict[str, str]:
        """What a session on the lab host needs: apt's config, dpkg-query's admindir, dpkg's root."""
        return {"APT_CONFIG": str(self.apt_config), "DPKG_ADMINDIR": str(self.admindir), "DPKG_ROOT": str(self.root)}

    @property
    def sshd_setenv(self) -> str:
        return "SetEnv " + " ".join(f"{key}={value}" for key, value in self.env.items())

    def create(self) -> "AptLab":
        # The sandbox the lab host's patch runs use too (cli/lab_apt.py), with two repositories.
        lab_apt.write_sandbox(self.root, [self.repository(r) for r in _RELEASES], self.apt_config)
        (self.root / "run").mkdir(exist_ok=True)
        for repository in _RELEASES:
            self.repository(repository).mkdir(parents=True, exist_ok=True)
            self._index(repository)
        return self

    def build(self, name: str, version: str, directory: Path, *, postinst: str | None = None) -> Path:
        return lab_apt.build_package(name, version, directory, description=f"{name} test package", postinst=postinst,
                                     build_root=self.base / "build")

    def install_base(self, name: str, version: str) -> None:
        """Install a package straight with dpkg: the host's state before any update."""
        lab_apt.install_package(self.build(name, version, self.base / "base"), self.root)

    def publish(self, repository: Repository, name: str, version: str, *, postinst: str | None = None) -> None:
        self.build(name, version, self.repository(repository), postinst=postinst)
        self._index(repository)

    def _index(self, repository: Repository) -> None:
        lab_apt.index_repository(self.repository(repository), _RELEASES[repository])

    def apt_get(self, *args: str) -> str:
        return _run(["apt-get", "-q", *args], env={**self.env, "LC_ALL": "C"})

    def installed_version(self, name: str) -> str | None:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}\\t${db:Status-Abbrev}", name],
                              env={**os.environ, **self.env}, capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        version, _, status = proc.stdout.partition("\t")
        return version if status.startswith("ii") else None


@pytest.fixture
def aptlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AptLab]:
    """A lab host state: four packages at 1.0, security and regular updates published.

    security: demo-web 1.1, demo-kernel 1.1 (its postinst asks for a reboot)
    main:     demo-web 1.2, demo-db 1.2, demo-tools 1.1
    demo-web thus has a security fix (1.1) that a newer regular release (1.2) supersedes.
    """
    lab = AptLab(tmp_path_factory.mktemp("aptlab")).create()
    for name in ("demo-web", "demo-db", "demo-kernel", "demo-tools"):
        lab.install_base(name, "1.0")
    lab.publish("security", "demo-web", "1.1")
    lab.publish("security", "demo-kernel", "1.1", postinst=REBOOT_POSTINST)
    lab.publish("main", "demo-web", "1.2")
    lab.publish("main", "demo-db", "1.2")
    lab.publish("main", "demo-tools", "1.1")
    lab.apt_get("update")
    yield lab
