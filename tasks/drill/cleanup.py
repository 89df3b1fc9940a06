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

import json
import shlex
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Connector, ConnectorError
from connectors.stores.base import BlobStore
from connectors.powershell import ps_quote
from tasks.drill.control import DEFAULT_GRACE_SECONDS, Stopped, stop_copy, stopped_check, unit_stopped_check, unit_name
from tasks.drill.copies import remove_path
from tasks.drill.isolation import NETNS_DIR, NamespaceRemoval, namespace_name, remove_namespace
from tasks.drill.ledger import (
    ClosedEntry,
    CommandEntry,
    CopyRootEntry,
    DomainEntry,
    LEDGERS_PREFIX,
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
from tasks.drill.target import Refused, TargetError, host_script, shell

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

    def record(self) -> dict[str, object]:
        """The fields a drill's evidence record keeps per cleanup item (no sequence number)."""
        return {"member": self.member, "kind": self.kind, "target": self.target, "identifier": self.identifier,
                "action": self.action, "verified": self.verified, "evidence": self.evidence}


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


def _refusal(entry: Resource, roots: set[tuple[str, str]], run_id: str) -> str | None:
    """Why an entry that is valid in form must still not be acted on, or None."""
    if isinstance(entry, (PathEntry, ProcessEntry)) and (entry.host, entry.copy_root) not in roots:
        return (f"refused: {entry.copy_root} is not a copy root this drill's ledger recorded on {entry.host}; "
                "nothing was touched")
    # Names this run derives itself: a ledger naming any other namespace or unit (a production
    # one, another run's) gets nothing of it stopped or deleted.
    if isinstance(entry, NamespaceEntry) and entry.name != namespace_name(run_id, entry.member or ""):
        return f"refused: namespace {entry.name} is not the one this run makes for member {entry.member!r}; nothing was touched"
    if isinstance(entry, UnitEntry) and entry.unit != unit_name(run_id, entry.member or ""):
        return f"refused: unit {entry.unit} is not the one this run makes for member {entry.member!r}; nothing was touched"
    return None


def cleanup(entries: Sequence[Resource | ClosedEntry | InvalidEntry], connect: Connect, *, run_id: str,
            grace: float = DEFAULT_GRACE_SECONDS) -> CleanupReport:
    """Remove and then verify everything `entries` (a ledger, read or in memory) names."""
    invalid = [entry for entry in entries if isinstance(entry, InvalidEntry)]
    work = [_Work(entry) for entry in resources(entries)]
    roots = {(w.entry.host, w.entry.copy_root) for w in work if isinstance(w.entry, CopyRootEntry)}
    for item in work:
        item.refusal = _refusal(item.entry, roots, run_id)
    connections = _Connections(connect)
    try:
        for item in reversed(work):
            if item.refusal is None:
                _remove(item, connections, run_id, grace)
        _verify_all(list(reversed(work)), connections)
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
            stopped = stop_copy(connector, entry, run_id=run_id, grace=grace)
            item.action, item.context = stopped.action, stopped
    except Refused as exc:
        item.refusal = f"refused: {exc}; nothing was touched"
    except (TargetError, ConnectorError, OSError) as exc:
        item.action = f"removal failed: {exc}"
    except Exception as exc:  # noqa: BLE001 - one item's surprise must not leave the others in place
        item.action = f"removal failed: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Check:
    """One look at the target: a check batched through the host script, or a command run by
    itself that exits 0 when the thing is stopped. `judge` turns the answer into a line of
    evidence ("NOT …" when the thing is not gone), or None when the answer proves nothing."""

    judge: Callable[[Any], str | None]
    host: dict[str, Any] | None = None
    command: str | None = None


def _verify_host(items: list[_Work], connector: Connector) -> None:
    plans = [(item, _plan(item, connector)) for item in items]
    batched = [check.host for _, plan in plans for check in plan if check.host is not None]
    answers = iter(host_script(connector, "checks", json.dumps(batched))["results"] if batched else [])
    for item, plan in plans:
        lines = []
        for check in plan:
            if check.host is not None:
                answer: Any = next(answers)
            else:
                answer = shell(connector, check.command or "", check=False)
            lines.append(check.judge(answer))
        item.evidence = [line for line in lines if line is not None] or [
            "NOT verified: nothing could be checked for this item"]


def _verify_all(work: list[_Work], connections: _Connections) -> None:
    by_host: dict[str, list[_Work]] = {}
    for item in work:
        if item.refusal is None:
            by_host.setdefault(item.entry.host, []).append(item)
    for host, items in by_host.items():
        try:
            _verify_host(items, connections.get(host))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, these items are not proven gone
            for item in items:
                item.evidence = [f"NOT verified: {exc if isinstance(exc, TargetError) else repr(exc)}"]


def _gone(ok: bool, text: str) -> str:
    return text if ok else f"NOT gone: {text}"


def _exit_zero(command: str, what: str) -> _Check:
    return _Check(command=command, judge=lambda result: _gone(result.ok, f"{what} (`{command}` exited {result.exit_code})"))


def _process_check(pid: int | None, start_time: int | None, boot_id: str | None, pidfile: str | None) -> _Check:
    def judge(answer: dict[str, Any]) -> str | None:
        if answer["source"] == "none":
            return None
        return _gone(not answer["running"], f"pid {answer['pid']} (from the {answer['source']}): {answer['why']}")
    return _Check(host={"kind": "process", "pid": pid, "start_time": start_time, "boot_id": boot_id, "pidfile": pidfile},
                  judge=judge)


def _port_check(port: int, namespace: str | None, host: str) -> _Check:
    where = f"inside {namespace}" if namespace else f"on {host}"

    def judge(answer: dict[str, Any]) -> str:
        if answer["namespace_gone"]:
            return f"port {port}: its namespace {namespace} is gone, nothing can listen in it"
        if answer["connected"]:
            return f"NOT gone: 127.0.0.1:{port} {where} still accepts connections"
        return f"127.0.0.1:{port} {where}: {answer['errno']}"
    return _Check(host={"kind": "connect", "address": "127.0.0.1", "port": port, "namespace": namespace}, judge=judge)


def _namespace_check(name: str, *, for_process: bool) -> _Check:
    def judge(answer: dict[str, Any]) -> str | None:
        if for_process:
            if not answer["listed"]:
                return None
            return _gone(not answer["pids"], f"processes left in {name}: {answer['pids'] or 'none'}")
        if answer["listed"] or answer["file"]:
            return f"NOT gone: `ip netns list` still lists {name}" if answer["listed"] else \
                f"NOT gone: {NETNS_DIR}/{name} still exists"
        return f"`ip netns list` ({answer['count']} namespaces) does not list {name}; {NETNS_DIR}/{name} absent"
    return _Check(host={"kind": "netns", "name": name}, judge=judge)


def _path_check(path: str, connector: Connector) -> _Check:
    if connector.os_family == "windows":
        return _exit_zero(f"if (Test-Path -LiteralPath {ps_quote(path)}) {{ exit 1 }} else {{ exit 0 }}", f"{path} absent")
    return _Check(host={"kind": "exists", "path": path},
                  judge=lambda answer: _gone(not answer["exists"],
                                             f"{path}: present ({answer['kind']})" if answer["exists"] else f"{path}: absent"))


def _plan(item: _Work, connector: Connector) -> list[_Check]:
    """What to look at on the target to prove the item gone, independently of its removal."""
    entry = item.entry
    if isinstance(entry, NamespaceEntry):
        stopped = item.context.stopped if isinstance(item.context, NamespaceRemoval) else []
        return [_namespace_check(entry.name, for_process=False),
                *(_process_check(int(p["pid"]), int(p["start_time"]), None, None) for p in stopped)]
    if isinstance(entry, (CopyRootEntry, PathEntry)):
        return [_path_check(entry.copy_root if isinstance(entry, CopyRootEntry) else entry.path, connector)]
    if isinstance(entry, ProcessEntry):
        checks = [_process_check(entry.pid, entry.start_time, entry.boot_id, entry.pidfile)]
        if entry.namespace is not None:
            checks.append(_namespace_check(entry.namespace, for_process=True))
        if entry.port is not None:
            checks.append(_port_check(entry.port, entry.namespace, connector.name))
        return checks
    if isinstance(entry, UnitEntry):
        checks = [_exit_zero(unit_stopped_check(entry.unit), f"unit {entry.unit} is inactive")]
        return checks + ([_port_check(entry.port, entry.namespace, connector.name)] if entry.port else [])
    if isinstance(entry, ServiceEntry):
        return [_exit_zero(stopped_check("windows-service", entry.service), f"service {entry.service} is stopped")]
    if isinstance(entry, VmEntry):
        return [_exit_zero(stopped_check("hyperv", entry.vm), f"VM {entry.vm} is off")]
    if isinstance(entry, DomainEntry):
        name = shlex.quote(entry.domain)
        return [_exit_zero(f"[ \"$(virsh domstate {name})\" = 'shut off' ]", f"domain {entry.domain} is shut off")]
    assert isinstance(entry, CommandEntry)
    # The verify command runs on the target itself: the copy's namespace is gone by now.
    checks = [_exit_zero(entry.verify, "the verify command says the copy is stopped")] if entry.verify else []
    return checks + ([_port_check(entry.port, entry.namespace, connector.name)] if entry.port else [])


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


def orphaned_runs(store: BlobStore, running: Collection[str]) -> list[str]:
    """Drill runs whose ledger is not closed and that are not running: what a controller that
    crashed or was killed left behind. Oldest first (by the ledger's first entry)."""
    runs: dict[str, str] = {}
    for info in store.list(LEDGERS_PREFIX):
        run_id, _, rest = info.key[len(LEDGERS_PREFIX):].partition("/")
        if rest.startswith("ledger/"):
            runs[run_id] = min(runs.get(run_id, info.key), info.key)
    return [run_id for run_id in sorted(runs, key=lambda r: runs[r])
            if run_id not in running and not Ledger(store, run_id).is_closed()]


__all__ = ["CleanupItem", "CleanupReport", "Connect", "cleanup", "cleanup_run", "orphaned_runs"]
