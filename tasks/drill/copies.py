"""A test copy's files on the DR target: its root directory, claimed with a marker, and the
restored paths under it, each recorded in the ledger before it is written.

The marker (`.patchdrill-drill` holding the run id) is what lets cleanup remove a copy root
whole without trusting the ledger's word alone: a root without this run's marker is refused,
so an edited ledger naming /etc or another run's copy removes nothing.
"""

from __future__ import annotations

import shlex

from connectors.base import Connector
from connectors.powershell import ps_quote
from tasks.drill.ledger import CopyRootEntry, Ledger, PathEntry
from tasks.drill.target import host_script, shell

MARKER = ".patchdrill-drill"


def marker_path(root: str, os_family: str) -> str:
    return f"{root}\\{MARKER}" if os_family == "windows" else f"{root}/{MARKER}"


def claim_copy_root(connector: Connector, ledger: Ledger, *, member: str, root: str) -> CopyRootEntry:
    """Record, then create, the member's copy root (an existing one is claimed as it is, so a
    delta restore can reuse a previous copy) and mark it as this run's."""
    entry = ledger.record("copy-root", host=connector.name, member=member, os_family=connector.os_family,
                          copy_root=root)
    assert isinstance(entry, CopyRootEntry)
    marker = marker_path(root, connector.os_family)
    if connector.os_family == "windows":
        shell(connector, f"New-Item -ItemType Directory -Force -Path {ps_quote(root)} | Out-Null; "
                         f"Set-Content -LiteralPath {ps_quote(marker)} -Value {ps_quote(ledger.run_id)} -NoNewline")
    else:
        shell(connector, f"mkdir -p -- {shlex.quote(root)} && printf '%s\\n' {shlex.quote(ledger.run_id)} "
                         f"> {shlex.quote(marker)}")
    return entry


def record_path(connector: Connector, ledger: Ledger, *, member: str, root: str, path: str) -> PathEntry:
    """Record a file or directory the drill is about to write under the member's copy root."""
    entry = ledger.record("path", host=connector.name, member=member, os_family=connector.os_family,
                          copy_root=root, path=path)
    assert isinstance(entry, PathEntry)
    return entry


def remove_path(connector: Connector, entry: CopyRootEntry | PathEntry, run_id: str) -> str:
    """Remove a recorded copy root or path (whole trees, never following links out of them);
    refused by the target unless the copy root carries this run's marker."""
    path = entry.copy_root if isinstance(entry, CopyRootEntry) else entry.path
    if connector.os_family == "windows":
        marker = marker_path(entry.copy_root, "windows")
        script = (f"if (-not (Test-Path -LiteralPath {ps_quote(path)})) {{ 'absent'; exit 0 }}\n"
                  f"if ((Get-Content -LiteralPath {ps_quote(marker)} -ErrorAction SilentlyContinue) -ne "
                  f"{ps_quote(run_id)}) {{ [Console]::Error.WriteLine('no drill marker of this run'); exit 2 }}\n"
                  f"Remove-Item -LiteralPath {ps_quote(path)} -Recurse -Force; 'removed'")
        result = shell(connector, script)
        return "was already gone" if result.stdout.strip() == "absent" else "removed"
    answer = host_script(connector, "remove", entry.copy_root, run_id, path)
    if not answer["existed"]:
        return "was already gone"
    if answer["error"]:
        return f"removal failed: {answer['error']}"
    return "removed"


__all__ = ["MARKER", "claim_copy_root", "marker_path", "record_path", "remove_path"]
