"""Cleanup that is proven: remove exactly what a drill's ledger names, then verify each item.

Two passes over the ledger's resources, newest first (a copy stops before its namespace goes,
its files before its root):

1. removal: each item is stopped or removed; what was already gone says so, and a removal that
   raised is recorded, not fatal, so every other item still gets its turn;
2. verification: each item is checked again on the target, independently of what removal said:
   the process is not alive (the recorded pid with its recorded start time and boot id, so a
   pid reused by another process counts as ours gone and is left alone), its port closed, the
   path absent, the namespace absent from `ip netns list` with no process left in it, the unit,
   service, VM or domain stopped.

An item that could not be verified is a failure, never a success: the report is ok only when
every item was verified gone. The ledger is then marked closed. Anything the ledger does not
name is never touched, and a ledger entry that is not valid, or a path outside a copy root the
ledger recorded, is refused and reported as a failure.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from connectors.base import Connector, ConnectorError
from connectors.stores.base import BlobStore
from tasks.drill.control import DEFAULT_GRACE_SECONDS, Stopped, process_identity, stop_copy, stopped_check
from tasks.drill.copies import path_exists, remove_path
from tasks.drill.isolation import NETNS_DIR, connect_attempts, list_namespaces, namespace_pids, remove_namespace
from tasks.drill.ledger import (
    ClosedEntry,
    CommandEntry,
    CopyRootEntry,
    DomainEntry,
    InvalidEntry,
    Ledger,
    NamespaceEntry,
    PathEntry,
    ProcessEntry,
    Resource,
    ServiceEntry,
    UnitEntry,
    VmEntry,
    resources,
)
from tasks.drill.target import TargetError, host_script, shell

Connect = Callable[[str], Connector]


@dataclass(frozen=True)
class CleanupItem:
    """One ledger item: what cleanup did to it and the evidence that it is gone.

    The fields match the drill evidence record's cleanup items (member, kind, target,
    identifier, action, verified, evidence), plus the ledger sequence number.
    """

    seq: int
    member: str | None
    kind: str
    target: str
    identifier: str
    action: str
    verified: bool
    evidence: str


@dataclass(frozen=True)
class CleanupReport:
    run_id: str
    items: list[CleanupItem]
    closed: bool = False

    @property
    def ok(self) -> bool:
        return all(item.verified for item in self.items)

    @property
    def failures(self) -> list[CleanupItem]:
        return [item for item in self.items if not item.verified]

    def summary(self) -> str:
        if self.ok:
            return f"drill {self.run_id}: cleanup verified {len(self.items)} item(s)"
        failed = "; ".join(f"{item.kind} {item.identifier} on {item.target}: {item.evidence.splitlines()[-1]}"
                           for item in self.failures)
        return f"drill {self.run_id}: cleanup NOT verified for {len(self.failures)} of {len(self.items)} item(s): {failed}"


@dataclass
class _Work:
    entry: Resource
    refusal: str | None = None
    action: str = ""
    context: Stopped | object | None = None
    removal_failed: bool = False
    evidence: list[str] = field(default_factory=list)


class _Connections:
    """One connector per host for the whole cleanup; a host that cannot be opened is remembered."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self.open: dict[str, Connector] = {}
        self.errors: dict[str, str] = {}

    def get(self, host: str) -> Connector:
        if host in self.errors:
            raise TargetError(self.errors[host])
        if host not in self.open:
            try:
                self.open[host] = self.connect(host)
            except Exception as exc:  # noqa: BLE001 - any failure to reach the host fails its items
                self.errors[host] = f"cannot open a connection to {host}: {exc}"
                raise TargetError(self.errors[host]) from None
        return self.open[host]

    def close(self) -> None:
        for connector in self.open.values():
            try:
                connector.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort after the work is done
                pass


def _refusal(entry: Resource, roots: set[tuple[str, str]]) -> str | None:
    if isinstance(entry, (PathEntry, ProcessEntry)) and (entry.host, entry.copy_root) not in roots:
        return (f"refused: {entry.copy_root} is not a copy root this drill's ledger recorded on {entry.host}; "
                "nothing was touched")
    return None


def cleanup(entries: Sequence[Resource | ClosedEntry | InvalidEntry], connect: Connect, *, run_id: str,
            grace: float = DEFAULT_GRACE_SECONDS) -> CleanupReport:
    """Remove and then verify everything `entries` (a ledger, read or in memory) names."""
    invalid = [entry for entry in entries if isinstance(entry, InvalidEntry)]
    work = [_Work(entry) for entry in resources(entries)]
    roots = {(w.entry.host, w.entry.copy_root) for w in work if isinstance(w.entry, CopyRootEntry)}
    for item in work:
        item.refusal = _refusal(item.entry, roots)
    connections = _Connections(connect)
    try:
        for item in reversed(work):
            if item.refusal is None:
                _remove(item, connections, run_id, grace)
        for item in reversed(work):
            if item.refusal is None:
                _verify(item, connections)
    finally:
        connections.close()
    items = [CleanupItem(seq=entry.seq, member=None, kind="invalid-entry", target="-", identifier=entry.key,
                         action=f"refused: {entry.problem}", verified=False,
                         evidence=f"ledger blob {entry.key} is not a valid entry ({entry.problem}); nothing was touched")
             for entry in invalid]
    items += [_item(w) for w in reversed(work)]
    return CleanupReport(run_id=run_id, items=items)


def _item(work: _Work) -> CleanupItem:
    entry = work.entry
    verified = work.refusal is None and bool(work.evidence) and not any(
        line.startswith("NOT ") for line in work.evidence)
    evidence = "\n".join(work.evidence) if work.evidence else (work.refusal or "not verified")
    return CleanupItem(seq=entry.seq, member=entry.member, kind=entry.kind, target=entry.host,
                       identifier=entry.identifier, action=work.refusal or work.action, verified=verified,
                       evidence=evidence)


def _remove(item: _Work, connections: _Connections, run_id: str, grace: float) -> None:
    entry = item.entry
    try:
        connector = connections.get(entry.host)
        if isinstance(entry, NamespaceEntry):
            removal = remove_namespace(connector, entry.name, grace=grace)
            item.action, item.context = removal.action, removal
        elif isinstance(entry, (CopyRootEntry, PathEntry)):
            item.action = remove_path(connector, entry, run_id)
        else:
            stopped = stop_copy(connector, entry, grace=grace)
            item.action, item.context = stopped.action, stopped
    except (TargetError, ConnectorError, OSError) as exc:
        item.action, item.removal_failed = f"removal failed: {exc}", True


def _verify(item: _Work, connections: _Connections) -> None:
    entry = item.entry
    try:
        connector = connections.get(entry.host)
        item.evidence = _VERIFIERS[type(entry)](connector, entry, item)
    except (TargetError, ConnectorError, OSError) as exc:
        item.evidence = [f"NOT verified: {exc}"]
    if not item.evidence:
        item.evidence = ["NOT verified: nothing could be checked for this item"]


def _gone(ok: bool, text: str) -> str:
    return text if ok else f"NOT gone: {text}"


def _verify_namespace(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, NamespaceEntry)
    listed = list_namespaces(connector)
    file_there = shell(connector, f"test -e {shlex.quote(f'{NETNS_DIR}/{entry.name}')}", check=False).ok
    evidence = [_gone(entry.name not in listed,
                      f"`ip netns list` on {connector.name} ({len(listed)} namespaces) does not list {entry.name}"
                      if entry.name not in listed else f"`ip netns list` still lists {entry.name}"),
                _gone(not file_there, f"{NETNS_DIR}/{entry.name} absent" if not file_there
                      else f"{NETNS_DIR}/{entry.name} still exists")]
    removal = item.context
    for stopped in getattr(removal, "stopped", []):
        evidence.append(_process_evidence(connector, int(stopped["pid"]), int(stopped["start_time"]), None))
    return evidence


def _process_evidence(connector: Connector, pid: int, start_time: int, boot_id: str | None) -> str:
    now = host_script(connector, "identity", pid)
    if boot_id is not None and now["boot_id"] != boot_id:
        return f"pid {pid}: {connector.name} rebooted since it started (boot id changed)"
    if not now["alive"]:
        return f"pid {pid}: no such process" + (" (a zombie: exited)" if now["state"] == "Z" else "")
    if now["start_time"] != start_time:
        return f"pid {pid}: now another process (start time {now['start_time']}, ours {start_time}): ours is gone"
    return f"NOT gone: pid {pid} (start time {start_time}) is still running, state {now['state']}"


def _port_evidence(connector: Connector, port: int, namespace: str | None) -> str:
    if namespace is not None and namespace not in list_namespaces(connector):
        return f"port {port}: its namespace {namespace} is gone, nothing can listen in it"
    attempt = connect_attempts(connector, [("127.0.0.1", port)], namespace=namespace)[0]
    where = f"inside {namespace}" if namespace else f"on {connector.name}"
    if attempt.connected:
        return f"NOT gone: 127.0.0.1:{port} {where} still accepts connections"
    return f"127.0.0.1:{port} {where}: {attempt.errno}"


def _verify_process(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, ProcessEntry)
    evidence = []
    identity = process_identity(connector, entry) if entry.pid is None else (entry.pid, entry.start_time, entry.boot_id)
    if identity is not None and identity[1] is not None:
        evidence.append(_process_evidence(connector, identity[0], identity[1], identity[2]))
    elif entry.namespace is not None and entry.namespace in list_namespaces(connector):
        left = namespace_pids(connector, entry.namespace)
        evidence.append(_gone(not left, f"no pid was recorded; processes in {entry.namespace}: {left or 'none'}"))
    if entry.port is not None:
        evidence.append(_port_evidence(connector, entry.port, entry.namespace))
    if not evidence:
        evidence.append("NOT verified: no pid, no pidfile, no namespace and no port to check this process by")
    return evidence


def _verify_path(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, (CopyRootEntry, PathEntry))
    path = entry.copy_root if isinstance(entry, CopyRootEntry) else entry.path
    present, seen = path_exists(connector, path)
    return [_gone(not present, seen)]


def _exit_zero(connector: Connector, command: str, what: str) -> str:
    result = shell(connector, command, check=False)
    return _gone(result.ok, f"{what} (`{command}` exited {result.exit_code})")


def _verify_unit(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, UnitEntry)
    evidence = [_exit_zero(connector, f"! systemctl is-active --quiet {shlex.quote(entry.unit)}",
                           f"unit {entry.unit} is not active")]
    if entry.port is not None:
        evidence.append(_port_evidence(connector, entry.port, entry.namespace))
    return evidence


def _verify_windows(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, (ServiceEntry, VmEntry))
    if isinstance(entry, ServiceEntry):
        return [_exit_zero(connector, stopped_check("windows-service", entry.service), f"service {entry.service} is stopped")]
    return [_exit_zero(connector, stopped_check("hyperv", entry.vm), f"VM {entry.vm} is off")]


def _verify_domain(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, DomainEntry)
    name = shlex.quote(entry.domain)
    return [_exit_zero(connector, f"[ \"$(virsh domstate {name})\" = 'shut off' ]", f"domain {entry.domain} is shut off")]


def _verify_command(connector: Connector, entry: Resource, item: _Work) -> list[str]:
    assert isinstance(entry, CommandEntry)
    evidence = []
    if entry.verify:
        evidence.append(_exit_zero(connector, entry.verify, "the verify command says the copy is stopped"))
    if entry.port is not None:
        evidence.append(_port_evidence(connector, entry.port, entry.namespace))
    if not evidence:
        evidence.append("NOT verified: a command copy with neither a verify command nor a port cannot be proven stopped")
    return evidence


_VERIFIERS: dict[type, Callable[[Connector, Resource, _Work], list[str]]] = {
    NamespaceEntry: _verify_namespace, ProcessEntry: _verify_process, CopyRootEntry: _verify_path,
    PathEntry: _verify_path, UnitEntry: _verify_unit, ServiceEntry: _verify_windows, VmEntry: _verify_windows,
    DomainEntry: _verify_domain, CommandEntry: _verify_command,
}


def cleanup_run(store: BlobStore, run_id: str, connect: Connect, *, grace: float = DEFAULT_GRACE_SECONDS) -> CleanupReport:
    """Clean up a drill run from its ledger alone (works after the controller crashed).

    `connect` opens a Connector for a host name as the ledger records it. When every item is
    verified gone, the ledger gets its closing entry.
    """
    ledger = Ledger(store, run_id)
    entries = ledger.read()
    already_closed = bool(entries) and isinstance(entries[-1], ClosedEntry)
    report = cleanup(entries, connect, run_id=run_id, grace=grace)
    if report.ok and not already_closed:
        ledger.close(len(report.items))
    return CleanupReport(run_id=run_id, items=report.items, closed=report.ok)


__all__ = ["CleanupItem", "CleanupReport", "Connect", "cleanup", "cleanup_run"]
