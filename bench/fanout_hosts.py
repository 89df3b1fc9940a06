"""A throwaway fleet for the fan-out benchmark: N real sshd hosts on loopback aliases.

Each host is its own /usr/sbin/sshd (tests/hosts/sshd_server.SshdHost: absolute path,
`-D -e -f cfg`, `UsePAM no`, its own throwaway host key) listening on 127.0.0.X; all of
127.0.0.0/8 is loopback on Linux, so no interface is touched. Every host also gets its own
sandboxed apt root (the tests' AptLab layout), handed to every SSH session through sshd's
SetEnv, so that:

- `apt-get update` in an assessment reads a local flat repository instead of the Internet and
  never waits on the machine's own apt lock (100 hosts on one machine would otherwise share
  one /var/lib/apt/lists);
- both tools query the same package database: apt and dpkg-query read APT_CONFIG and
  DPKG_ADMINDIR, and so does python-apt, which Ansible's package_facts uses.

Every root holds the machine's real dpkg status (hundreds of packages, so package queries do
real-sized work) plus four demo packages, three of which have updates in the repositories
(one of them a security update), so an assessment finds something on every host.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # The bench runs as a script; the project and its test-host helpers live one level up.
    sys.path.insert(0, str(REPO_ROOT))

from tests.hosts.aptlab import AptLab  # noqa: E402
from tests.hosts.sshd_server import SshdHost, make_key, require_tools  # noqa: E402

MACHINE_DPKG_STATUS = Path("/var/lib/dpkg/status")
DEMO_PACKAGES = ("demo-web", "demo-db", "demo-kernel", "demo-tools")
# Starting sshd is mostly waiting for ssh-keygen and the listen line: a few at once is plenty
# on a small machine and keeps the set-up from competing with other work for long.
START_PARALLEL = 8


def alias(index: int) -> str:
    """The index-th loopback alias: 127.0.0.1 … 127.0.0.254, then 127.0.1.1 …"""
    third, fourth = divmod(index, 254)
    return f"127.0.{third}.{fourth + 1}"


@dataclass
class FanoutHost:
    name: str
    sshd: SshdHost
    apt_root: Path

    @property
    def address(self) -> str:
        return self.sshd.address

    @property
    def port(self) -> int:
        return self.sshd.port


@dataclass
class FanoutFleet:
    """The running hosts and the files both tools need to reach them."""

    workdir: Path
    client_key: Path
    known_hosts: Path
    hosts: list[FanoutHost] = field(default_factory=list)

    def log_paths(self) -> list[Path]:
        return [h.sshd.log_path for h in self.hosts]

    def first_contact(self) -> "ContactWatch":
        return ContactWatch(self.log_paths())


class ContactWatch:
    """Notes when any host first logs a new connection after `start()`.

    sshd's -e log has no timestamps, so a thread watches the log sizes; it polls only until
    the first contact, so it costs nothing during the fan-out itself.
    """

    POLL_SECONDS = 0.01

    def __init__(self, logs: list[Path]) -> None:
        self._logs = logs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = 0.0
        self.contact: float | None = None

    def _sizes(self) -> list[int]:
        return [p.stat().st_size if p.exists() else 0 for p in self._logs]

    def start(self) -> None:
        baseline = self._sizes()
        self.started = time.monotonic()

        def watch() -> None:
            while not self._stop.is_set():
                if any(now > before for now, before in zip(self._sizes(), baseline)):
                    self.contact = time.monotonic() - self.started
                    return
                self._stop.wait(self.POLL_SECONDS)

        self._thread = threading.Thread(target=watch, name="first-contact", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.contact


def _template_root(base: Path) -> AptLab:
    """One apt root with the demo packages installed and the repositories indexed and fetched."""
    lab = AptLab(base).create()
    for name in DEMO_PACKAGES:
        lab.install_base(name, "1.0")
    lab.publish("security", "demo-web", "1.1")
    lab.publish("main", "demo-web", "1.2")
    lab.publish("main", "demo-db", "1.2")
    lab.publish("main", "demo-tools", "1.1")
    if MACHINE_DPKG_STATUS.exists():
        # Real package records: only the status file is read by assessments and package_facts.
        status = lab.admindir / "status"
        status.write_text(status.read_text().rstrip("\n") + "\n\n" + MACHINE_DPKG_STATUS.read_text())
    lab.apt_get("update")
    return lab


def _host_root(template: AptLab, directory: Path) -> dict[str, str]:
    """Copy the template root for one host; return the environment its sessions get."""
    root = directory / "root"
    shutil.copytree(template.root, root, symlinks=True)
    apt_config = directory / "apt.conf"
    # The template's config names its own root in Dir, status and the dpkg options.
    apt_config.write_text(template.apt_config.read_text().replace(str(template.root), str(root)))
    return {"APT_CONFIG": str(apt_config), "DPKG_ADMINDIR": str(root / "var/lib/dpkg"), "DPKG_ROOT": str(root)}


def _start_host(index: int, workdir: Path, client_key: Path, template: AptLab,
                started: list[FanoutHost], lock: threading.Lock) -> None:
    name = f"host{index + 1:03d}"
    directory = workdir / "hosts" / name
    directory.mkdir(parents=True)
    env = _host_root(template, directory)
    sshd = SshdHost(
        name=name, address=alias(index), workdir=directory / "sshd", client_key=client_key,
        # Room for concurrent connections and sessions well past --forks; the default
        # LogLevel VERBOSE logs each "Connection from", which starts the first-contact clock.
        extra_config={"SetEnv": env, "MaxStartups": "200", "MaxSessions": "100"},
    )
    with lock:
        # Registered before it starts, so an interrupted set-up still stops it.
        started.append(FanoutHost(name=name, sshd=sshd, apt_root=directory / "root"))
    sshd.start()


@contextmanager
def fleet(count: int, *, keep: bool = False) -> Iterator[FanoutFleet]:
    """Start `count` hosts; stop them and delete every file on the way out, Ctrl-C included."""
    require_tools()
    if shutil.which("apt-ftparchive") is None:
        raise RuntimeError("the fan-out benchmark needs apt-ftparchive (Debian: apt-get install apt-utils)")
    # A short path: Ansible's ControlPath sockets live under it and sun_path holds 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="fanout-", dir="/tmp"))
    workdir.chmod(0o700)
    started: list[FanoutHost] = []
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        # `kill` should clean up like Ctrl-C does: unwind through the finally below.
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        keys = workdir / "client"
        keys.mkdir(mode=0o700)
        client_key = make_key(keys / "id_ed25519", "patchdrill-fanout-bench")
        template = _template_root(workdir / "template")
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=START_PARALLEL) as pool:
            futures = [pool.submit(_start_host, i, workdir, client_key, template, started, lock) for i in range(count)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                # Ctrl-C or a failed host: start no more; those already started are stopped below.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        started.sort(key=lambda h: h.name)
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text("".join(h.sshd.known_hosts_line for h in started))
        yield FanoutFleet(workdir=workdir, client_key=client_key, known_hosts=known_hosts, hosts=started)
    finally:
        for host in started:
            try:
                host.sshd.close()
            except Exception as exc:  # noqa: BLE001 - stop every host, then say what failed
                print(f"warning: stopping {host.name}: {exc}", file=sys.stderr)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_term)
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["ContactWatch", "FanoutFleet", "FanoutHost", "alias", "fleet"]

