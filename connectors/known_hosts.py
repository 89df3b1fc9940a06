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
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"


@dataclass
class KnownHosts:
    path: Path
    keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: list[tuple[int, paramiko.PKey]] = field(default_factory=list)
    authority_lines: list[int] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)

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
