"""Real OpenSSH servers for tests: one /usr/sbin/sshd per loopback address, throwaway keys.

A host may run in a private mount namespace (`namespace=True`): its /run and its
/proc/sys/kernel/random/boot_id are files the test owns, so a host can need a reboot
(/run/reboot-required), be rebooted (new boot id, /run emptied) and be read through the
real paths by the product.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.models import HostConfig

SSHD = Path("/usr/sbin/sshd")
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# Bounds for a server to come up; a healthy sshd is listening in tens of milliseconds.
START_WAIT_SECONDS = 20.0
BIND_ATTEMPTS = 5

ConfigValue = str | int | bool | list[str] | Mapping[str, str]


def require_tools() -> None:
    """Make sure OpenSSH's server and key tools are here, installing them on Debian if not."""
    if SSHD.exists() and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            "the sshd test hosts need OpenSSH's server at /usr/sbin/sshd and ssh-keygen: "
            "install them (Debian: apt-get install openssh-server openssh-client) or run the tests as root on Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                            "openssh-server", "openssh-client"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"installing openssh-server for the sshd test hosts failed: {' '.join(command)}: "
                               f"{done.stderr.strip()[-800:]}")


def make_key(path: Path, comment: str) -> Path:
    """A passphrase-less ed25519 key pair at path / path.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def fingerprint(public_key: Path) -> str:
    """The SHA256 fingerprint as OpenSSH prints it ("SHA256:…")."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the ppid follows the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def kill_tree(root: int) -> None:
    """SIGKILL a process and every descendant, like pulling the plug.

    sshd's sessions call setsid(), so a process group kill would miss them; stopping the
    whole tree first keeps any of it from forking or being reparented while it is collected.
    """
    stopped: set[int] = set()
    while True:
        fresh = [pid for pid in _tree(root) if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(pid)
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _render(value: ConfigValue) -> list[str]:
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, Mapping):
        # One SetEnv line: sshd keeps only the first SetEnv directive it reads.
        return [" ".join(f'"{k}={v}"' if " " in f"{v}" else f"{k}={v}" for k, v in value.items())]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


@dataclass
class SshdHost:
    """One real sshd on its own loopback address, with its own keys, config and log."""

    name: str
    address: str
    workdir: Path
    client_key: Path
    extra_config: dict[str, ConfigValue] = field(default_factory=dict)
    namespace: bool = False
    user: str = "root"
    port: int = 0
    fingerprint: str = ""
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _reboot_thread: threading.Thread | None = field(default=None, repr=False)
    _reboot_error: BaseException | None = field(default=None, repr=False)
    #: Each simulated reboot's (went down, listening again), in time.monotonic() seconds: its
    #: real length as the host saw it.
    outages: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.host_key = make_key(self.workdir / "ssh_host_ed25519_key", f"{self.name}-host")
        self.fingerprint = fingerprint(self.host_key.with_suffix(".pub"))
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        if self.namespace:
            if os.geteuid() != 0 or not shutil.which("unshare"):
                raise RuntimeError(f"sshd host {self.name!r}: namespace=True needs root and util-linux 'unshare'")
            self.run_dir.mkdir(mode=0o755, exist_ok=True)
            self.boot_id_path.write_text(f"{uuid.uuid4()}\n")

    # -- paths ------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def log_path(self) -> Path:
        """sshd's own log (-e): connections, authentication decisions, errors."""
        return self.workdir / "sshd.log"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file holding exactly this host's key."""
        return self.workdir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    @property
    def run_dir(self) -> Path:
        """The host's private /run (namespace hosts only)."""
        return self.workdir / "run"

    @property
    def boot_id_path(self) -> Path:
        """The file the host sees as /proc/sys/kernel/random/boot_id (namespace hosts only)."""
        return self.workdir / "boot_id"

    @property
    def boot_id(self) -> str:
        if not self.namespace:
            return Path(BOOT_ID).read_text().strip()
        return self.boot_id_path.read_text().strip()

    @property
    def known_hosts_name(self) -> str:
        return f"[{self.address}]:{self.port}"

    @property
    def known_hosts_line(self) -> str:
        key_type, key_b64 = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{self.known_hosts_name} {key_type} {key_b64}\n"

    @property
    def config(self) -> HostConfig:
        """A HostConfig that reaches this host as `user` with the throwaway client key."""
        return self.host_config()

    def host_config(self, **overrides: Any) -> HostConfig:
        fields: dict[str, Any] = {
            "name": self.name, "address": self.address, "port": self.port, "transport": "ssh",
            "user": self.user, "ssh_key": str(self.client_key), "ssh_agent": False,
            "known_hosts": str(self.known_hosts), "connect_timeout": 5.0,
        }
        return HostConfig.model_validate({**fields, **overrides})

    def authorize(self, public_key: Path) -> None:
        """Let one more client key in (sshd reads authorized_keys at each login)."""
        with self.authorized_keys.open("a") as handle:
            handle.write(public_key.read_text())

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def _write_config(self) -> None:
        settings: dict[str, ConfigValue] = {
            "ListenAddress": f"{self.address}:{self.port}",
            "HostKey": str(self.host_key),
            "PidFile": "none",
            "UsePAM": False,
            "PermitRootLogin": "yes",
            "PubkeyAuthentication": True,
            "PasswordAuthentication": False,
            "KbdInteractiveAuthentication": False,
            "AuthorizedKeysFile": str(self.authorized_keys),
            # The key material sits in a temp dir under world-writable /tmp.
            "StrictModes": False,
            "Subsystem": "sftp internal-sftp",
            "LogLevel": "VERBOSE",
            "MaxStartups": "100",
            "MaxSessions": "50",
        }
        lowered = {k.lower(): k for k in settings}
        for key, value in self.extra_config.items():
            settings.pop(lowered.get(key.lower(), key), None)
            settings[key] = value
        lines = [f"{key} {text}" for key, value in settings.items() for text in _render(value)]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        sshd = [str(SSHD), "-D", "-e", "-f", str(self.config_path)]
        if not self.namespace:
            return sshd
        mount = shutil.which("mount") or "/bin/mount"
        # A host of its own does not run the controller's shell start-up file either: a simulated
        # reboot kills sessions as they start, and one killed inside it (pyenv's rehash, say) can
        # leave a lock that every later shell on the machine then waits on.
        bashrc = shlex.quote(str(Path(pwd.getpwnam(self.user).pw_dir) / ".bashrc"))
        script = " && ".join([
            f"{mount} --bind {shlex.quote(str(self.run_dir))} /run",
            f"{mount} --bind {shlex.quote(str(self.boot_id_path))} {BOOT_ID}",
            f"{{ [ ! -e {bashrc} ] || {mount} --bind /dev/null {bashrc}; }}",
            "exec " + shlex.join(sshd),
        ])
        return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]

    def start(self) -> None:
        """Start sshd and wait until it listens; picks a new free port only on first start."""
        if self.running:
            return
        # Privilege separation needs this directory; namespace hosts get it in their own /run.
        (self.run_dir / "sshd" if self.namespace else Path("/run/sshd")).mkdir(mode=0o755, parents=True, exist_ok=True)
        first = self.port == 0
        for _ in range(BIND_ATTEMPTS):
            if self.port == 0:
                self.port = free_port(self.address)
            self._write_config()
            if self._launch():
                if first:
                    self.known_hosts.write_text(self.known_hosts_line)
                return
            if not first:
                # Coming back after stop(): keep the address the tests know; the port is
                # briefly unavailable only if another process grabbed it.
                time.sleep(0.2)
            else:
                self.port = 0
        raise RuntimeError(f"sshd host {self.name!r} could not listen on {self.address}; see {self.log_path}:\n"
                           + self._log_tail())

    def _launch(self) -> bool:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        listening = f"Server listening on {self.address} port {self.port}".encode()
        deadline = time.monotonic() + START_WAIT_SECONDS
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:]
            if listening in text:
                return True
            if self._process.poll() is not None:
                if b"Address already in use" in text:
                    return False
                raise RuntimeError(f"sshd host {self.name!r} exited with {self._process.returncode}; "
                                   f"{self.log_path}:\n" + self._log_tail())
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd host {self.name!r} did not listen within {START_WAIT_SECONDS:g}s; "
                           f"{self.log_path}:\n" + self._log_tail())

    def _log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Take the host down hard: sshd and every session it started are killed."""
        if self._process is None:
            return
        kill_tree(self._process.pid)
        self._process.wait()
        self._process = None

    def reboot(self, down_for: float = 0.5) -> None:
        """Simulate a reboot: down now, then back `down_for` seconds later with a new boot id.

        Returns at once, while the host is down. /run is emptied as a real boot empties its tmpfs.
        Namespace hosts only: a plain host shares the machine's boot id.
        """
        if not self.namespace:
            raise RuntimeError(f"sshd host {self.name!r}: reboot() needs a host made with namespace=True")
        self.join_reboot()
        went_down = time.monotonic()
        self.stop()
        for entry in self.run_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.boot_id_path.write_text(f"{uuid.uuid4()}\n")

        def come_back() -> None:
            try:
                time.sleep(down_for)
                self.start()
                self.outages.append((went_down, time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - reported by join_reboot()
                self._reboot_error = exc

        self._reboot_thread = threading.Thread(target=come_back, name=f"reboot-{self.name}", daemon=True)
        self._reboot_thread.start()

    def join_reboot(self) -> None:
        """Wait for a pending reboot() to finish bringing the host back; re-raise its failure."""
        thread, self._reboot_thread = self._reboot_thread, None
        if thread is not None:
            thread.join()
        error, self._reboot_error = self._reboot_error, None
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.join_reboot()
        finally:
            self.stop()
