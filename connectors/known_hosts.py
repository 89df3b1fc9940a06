"""Read an OpenSSH known_hosts file, marker lines included.

paramiko's HostKeys.load stops with InvalidHostKey at the first `@cert-authority` or `@revoked`
line (it reads the marker as a host name and the host pattern as a key type), and such lines are
common wherever SSH certificates are in use. This reader splits the markers off first:

- plain lines become the host keys that paramiko looks hosts up in;
- `@revoked` keys are refused for every host, whatever the line's host pattern: a revoked key
  is a stolen key, and OpenSSH refuses it too ("REVOKED HOST KEY DETECTED");
- `@cert-authority` lines are kept aside: paramiko verifies host keys, not host certificates,
  so they make no host known, and the unknown-key message says so;
- a line that cannot be read is skipped, as OpenSSH does, and remembered for that message.

`RejectUnknownHostKey` and `RecordUnknownHostKey` are the paramiko `MissingHostKeyPolicy` classes
SSHClient consults for a key it does not find among the trusted ones: both refuse revoked and
changed keys; the second records a new host's key (accept_unknown_host_key).
"""

from __future__ import annotations

import binascii
import fcntl
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import structlog
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from connectors.base import HostKeyRejected

log = structlog.stdlib.get_logger("patchdrill.connectors.ssh")

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"


@dataclass
class KnownHosts:
    path: Path
    keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: list[tuple[int, paramiko.PKey]] = field(default_factory=list)
    authority_lines: list[int] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)

    def install_trusted(self, into: paramiko.HostKeys) -> None:
        """Add the recorded keys minus revoked ones to `into` (SSHClient's host keys): a key
        recorded and revoked at once then reaches the host-key policy, which refuses it."""
        for name in self.keys.keys():
            for key_type, key in self.keys.lookup(name).items():
                if self.revoked_line(key) is None:
                    into.add(name, key_type, key)

    def revoked_line(self, key: paramiko.PKey) -> int | None:
        """The line that revokes this key, if one does."""
        for line, revoked in self.revoked:
            if revoked == key:
                return line
        return None

    def unused_lines_note(self) -> str:
        """Why a host may look unknown although the file seems to name it."""
        notes = []
        if self.authority_lines:
            notes.append(f"its @cert-authority lines ({_lines(self.authority_lines)}) are not used: "
                         "host certificates are not checked, record the host's own key")
        if self.unreadable_lines:
            notes.append(f"lines it could not read were skipped ({_lines(self.unreadable_lines)})")
        return f" In {str(self.path)!r}, {'; '.join(notes)}." if notes else ""


def read_known_hosts(path: Path) -> KnownHosts:
    """Parse path (a missing file knows no host). Raises OSError when it cannot be read."""
    known = KnownHosts(path)
    if not path.exists():
        return known
    # Host names and base64 are ASCII; a stray byte makes its own line unreadable, not the file.
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = None
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            line = line.strip()
        entry = _entry(line, number)
        if entry is None or marker not in (None, REVOKED, CERT_AUTHORITY):
            known.unreadable_lines.append(number)
        elif marker == REVOKED:
            known.revoked.append((number, entry.key))
        elif marker == CERT_AUTHORITY:
            known.authority_lines.append(number)
        else:
            for name in entry.hostnames:
                known.keys.add(name, entry.key.get_name(), entry.key)
    return known


def _entry(line: str, number: int) -> HostKeyEntry | None:
    try:
        return HostKeyEntry.from_line(line, number)
    except (InvalidHostKey, paramiko.SSHException, binascii.Error, ValueError, TypeError):
        return None


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', …' if len(numbers) > 5 else ''}"


@dataclass(frozen=True)
class HostKeyCheck:
    """Everything needed to judge one server's key and to explain a refusal in one line.

    `host` is the inventory host the connection is for; `label` names the machine actually
    checked when it is not that host (a jump host), so an error says which key was wrong.
    """

    host: str
    known: KnownHosts
    address: str
    port: int
    label: str = ""

    @property
    def name(self) -> str:
        # OpenSSH records a non-default port as "[address]:port"; mirror it so files are shared.
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    @property
    def path(self) -> Path:
        return self.known.path

    def _rejected(self, message: str) -> HostKeyRejected:
        return HostKeyRejected(self.host, f"{self.label}: {message}" if self.label else message)

    def refuse_revoked_or_changed(self, key: paramiko.PKey) -> None:
        """Raise HostKeyRejected for a revoked key, or for a key other than the one on record."""
        name, path = self.name, self.path
        revoked_at = self.known.revoked_line(key)
        if revoked_at is not None:
            # Checked before anything else: a revoked key stays refused even where a plain line
            # also records it, and is never recorded.
            raise self._rejected(
                f"REVOKED HOST KEY DETECTED for {name}: the server offered {key.get_name()} {key.fingerprint}, "
                f"which {str(path)!r} marks @revoked at line {revoked_at}; it may be a stolen key used to "
                "impersonate this host. Not connecting.")
        entry = self.known.keys.lookup(name)
        recorded = entry.get(key.get_name()) if entry else None
        if entry and recorded != key:
            have = ", ".join(f"{t} {k.fingerprint}" for t, k in entry.items())
            raise self._rejected(
                f"WARNING: HOST KEY FOR {name} HAS CHANGED - POSSIBLE MAN-IN-THE-MIDDLE ATTACK. "
                f"The server offered {key.get_name()} {key.fingerprint} but {str(path)!r} records {have}. "
                "Verify the new key out of band; if the change is legitimate, remove the old line with "
                f"'ssh-keygen -R \"{name}\" -f {path}' and add the new one. "
                "accept_unknown_host_key never accepts a changed key.")

    def refuse_unknown(self, key: paramiko.PKey) -> HostKeyRejected:
        keyscan = f"ssh-keyscan{'' if self.port == 22 else f' -p {self.port}'} {self.address} >> {self.path}"
        return self._rejected(
            f"unknown host key for {self.name} ({key.get_name()} {key.fingerprint}), not in {str(self.path)!r}. "
            f"Check the fingerprint, then add it with '{keyscan}', or set accept_unknown_host_key: true "
            f"on this host to record it on first connect.{self.known.unused_lines_note()}")

    def record(self, key: paramiko.PKey) -> None:
        """Append a new host's key to the known_hosts file, unless a rival got there first."""
        name, path = self.name, self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with path.open("a+", encoding="ascii") as handle:
            # Several connectors may meet the same new host at once: decide under a lock,
            # against the file as it is now, so a key is recorded once and a rival key is
            # never written beside it.
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            current = handle.read()
            fresh = HostKeyCheck(self.host, read_known_hosts(path), self.address, self.port, self.label)
            fresh.refuse_revoked_or_changed(key)
            if fresh.known.keys.lookup(name):
                return
            separator = "\n" if current and not current.endswith("\n") else ""
            # Append rather than rewrite: other lines, comments and hashed entries stay as they are.
            handle.write(f"{separator}{name} {key.get_name()} {key.get_base64()}\n")
        log.warning("ssh.host_key.recorded", host=self.host, known_hosts_name=name, key_type=key.get_name(),
                    fingerprint=key.fingerprint, known_hosts=str(path), jump=self.label or None)


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, check: HostKeyCheck) -> None:
        self.check = check


class RejectUnknownHostKey(_KnownHostsPolicy):
    """Refuse any key not on record (paramiko's RejectPolicy, with OpenSSH's marker lines)."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.check.refuse_revoked_or_changed(key)
        raise self.check.refuse_unknown(key)


class RecordUnknownHostKey(_KnownHostsPolicy):
    """Record a new host's key on first connect; a revoked or changed key is still refused."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.check.refuse_revoked_or_changed(key)
        self.check.record(key)


def host_key_policy(check: HostKeyCheck, accept_unknown: bool) -> paramiko.MissingHostKeyPolicy:
    return RecordUnknownHostKey(check) if accept_unknown else RejectUnknownHostKey(check)
