"""The lab host's package manager: a sandboxed apt root under .lab/apt, so a lab patch run uses
the real apt-get and dpkg without ever touching this machine's own packages (DESIGN.md, "Real
apt and dpkg without touching the machine's own packages").

`make server` gives it no sources: an assessment finds nothing. `make demo` gives it a flat
repository of its own (.lab/apt-repo, a security Release, as a Debian security mirror has) with
packages it builds here with dpkg-deb, so its patch run has an update to install; nothing is
fetched from a network.

The local transport runs apt-get and dpkg-query in the controller's own environment, so a
process that patches the lab host sets `environment()` first.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / ".lab"
REPOSITORY = LAB / "apt-repo"
#: What a security mirror's Release says: how apt (and so the assessment) tells security updates apart.
SECURITY_RELEASE = {"Origin": "Debian", "Label": "Debian-Security", "Suite": "stable-security",
                    "Codename": "bookworm-security", "Version": "12"}


class LabAptError(RuntimeError):
    """A packaging command failed; the message names it and what it printed."""


def lab_apt_root() -> Path:
    return LAB / "apt"


def environment() -> dict[str, str]:
    """apt's config and dpkg-query's admin directory (which ignores APT_CONFIG) for the sandbox."""
    return {"APT_CONFIG": str(lab_apt_root() / "etc" / "apt" / "apt.conf"),
            "DPKG_ADMINDIR": str(lab_apt_root() / "var" / "lib" / "dpkg")}


def dpkg_options(root: Path) -> list[str]:
    """What dpkg needs to install into the sandbox at `root` and nowhere else."""
    # Without chrootless, maintainer scripts would run chrooted into a root with no shell.
    options = [f"--root={root}", f"--admindir={root}/var/lib/dpkg", f"--log={root}/var/log/dpkg.log",
               "--force-script-chrootless"]
    return options if os.geteuid() == 0 else [*options, "--force-not-root"]


def write_sandbox(root: Path, repositories: list[Path], config: Path) -> None:
    """An apt root at `root` whose sources are the flat `repositories` (none: apt-get update
    and -s upgrade succeed and find nothing), configured by the apt.conf written at `config`."""
    for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                "var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "var/log/apt", "var/lib/dpkg/info",
                "var/lib/dpkg/updates"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    status = root / "var" / "lib" / "dpkg" / "status"
    if not status.exists():
        status.write_text("")
    (root / "etc" / "apt" / "sources.list").write_text(
        "".join(f"deb [trusted=yes] file:{repository} ./\n" for repository in repositories))
    options = " ".join(f'"{option}";' for option in dpkg_options(root))
    config.write_text(
        f'Dir "{root}/";\n'
        f'Dir::State::status "{status}";\n'
        f"DPkg::Options {{ {options} }};\n"
        'Acquire::Languages "none";\nDPkg::Use-Pty "false";\n'
        # Reading a file: repository as root would otherwise drop to the _apt user and warn.
        'APT::Sandbox::User "root";\n'
    )


def make_lab_apt_root(repository: Path | None = None) -> None:
    """The lab host's sandbox: no sources, or the one flat `repository`."""
    root = lab_apt_root()
    write_sandbox(root, [repository] if repository is not None else [], root / "etc" / "apt" / "apt.conf")


def _run(argv: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabAptError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def build_package(name: str, version: str, directory: Path, *, description: str, postinst: str | None = None,
                  build_root: Path = LAB / "apt-build") -> Path:
    """A small Architecture: all package with no dependencies, built with dpkg-deb."""
    tree = build_root / f"{name}_{version}"
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "share" / name).mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "share" / name / "version").write_text(version + "\n")
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: patchdrill lab <lab@example.invalid>\nDescription: {description}\n")
    if postinst is not None:
        (tree / "DEBIAN" / "postinst").write_text(postinst)
        (tree / "DEBIAN" / "postinst").chmod(0o755)
    directory.mkdir(parents=True, exist_ok=True)
    deb = directory / f"{name}_{version}_all.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
    return deb


def install_package(deb: Path, root: Path | None = None) -> None:
    """Install straight with dpkg into the sandbox: the host's state before any update."""
    _run(["dpkg", *dpkg_options(root or lab_apt_root()), "-i", str(deb)])


def index_repository(directory: Path, release: dict[str, str] = SECURITY_RELEASE) -> None:
    """Packages and a Release (a security one by default) for the flat repository, with apt-ftparchive."""
    (directory / "Packages").write_text(_run(["apt-ftparchive", "packages", "."], cwd=directory))
    options = [f"-oAPT::FTPArchive::Release::{key}={value}" for key, value in release.items()]
    (directory / "Release").write_text(_run(["apt-ftparchive", *options, "release", "."], cwd=directory))


__all__ = ["LabAptError", "REPOSITORY", "SECURITY_RELEASE", "build_package", "dpkg_options", "environment",
           "index_repository", "install_package", "lab_apt_root", "make_lab_apt_root", "write_sandbox"]
