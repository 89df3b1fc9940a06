"""Network isolation of a drill's test copy on a Linux DR target: one network namespace per member.

The way Azure Site Recovery runs a test failover in an isolated VNet: the copy gets a network
namespace of its own with nothing but loopback in it, so it answers probes run inside the same
namespace and cannot reach the production address (a connect fails at once with
ECONNREFUSED/ENETUNREACH). `prove_isolation` checks exactly that and returns the evidence.

Windows targets have no network namespaces: `require_isolation` says so, naming the member,
and a plan must choose isolation `none` explicitly to run a copy there.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Literal

from connectors.agent import ScriptAgent
from connectors.base import Connector
from tasks.drill.ledger import Ledger
from tasks.drill.target import TargetError, host_script, in_namespace, shell

Isolation = Literal["netns", "none"]
#: errnos that show a connect had no way out of the namespace (as opposed to a slow network)
NO_ROUTE = frozenset({"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL"})
#: Seconds a connect from inside may take: an isolated namespace answers in microseconds.
CONNECT_TIMEOUT = 3.0
NETNS_DIR = "/run/netns"


class IsolationUnsupported(Exception):
    """The member's target cannot isolate a copy the way its plan asks."""


def namespace_name(run_id: str, member: str) -> str:
    """A short, valid, unique `ip netns` name for one member of one drill run.

    A readable slug of the member plus a digest of (run id, member), so two runs or two members
    never share a namespace and any member name, however hostile, yields a safe name.
    """
    digest = hashlib.blake2b(f"{run_id}\0{member}".encode(), digest_size=5).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", member.lower()).strip("-")[:10].strip("-")
    return f"pd-{slug}-{digest}" if slug else f"pd-{digest}"


def require_isolation(connector: Connector, member: str, isolation: Isolation) -> None:
    """Fail with one line naming the member when its target cannot give the isolation asked for."""
    if isolation == "none":
        return
    if connector.os_family == "windows":
        raise IsolationUnsupported(
            f"member {member!r}: isolation 'netns' needs a Linux target; {connector.name} is a Windows host. "
            "Set the member's isolation to 'none' to run its copy without network isolation")
    found = connector.run("command -v ip", timeout=30)
    if not found.ok:
        raise IsolationUnsupported(
            f"member {member!r}: isolation 'netns' needs iproute2's 'ip' on {connector.name}, which has none")


@dataclass(frozen=True)
class Namespace:
    """A network namespace on one target host."""

    name: str
    host: str

    def prefix(self) -> str:
        """What to put before a command to run it inside the namespace."""
        return f"ip netns exec {shlex.quote(self.name)}"

    def wrap(self, command: str) -> str:
        """A shell command line that runs `command` (a shell command) inside the namespace."""
        return in_namespace(self.name, f"sh -c {shlex.quote(command)}")

    @property
    def path(self) -> str:
        """The namespace's file, as systemd's NetworkNamespacePath= takes it."""
        return f"{NETNS_DIR}/{self.name}"


def list_namespaces(connector: Connector) -> list[str]:
    """The names `ip netns list` shows on the target."""
    listed = shell(connector, "ip netns list", timeout=30)
    # Lines read "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def namespace_exists(connector: Connector, name: str) -> bool:
    return name in list_namespaces(connector)


def create_namespace(connector: Connector, ledger: Ledger, *, member: str) -> Namespace:
    """Record, then create, the member's namespace with its loopback up.

    Creating it again in the same run (a retried step) reuses it.
    """
    name = namespace_name(ledger.run_id, member)
    ledger.record("namespace", host=connector.name, member=member, name=name)
    quoted = shlex.quote(name)
    shell(connector, f"{{ [ -e {NETNS_DIR}/{quoted} ] || ip netns add {quoted}; }} && "
                     + in_namespace(name, "ip link set lo up"), timeout=30)
    return Namespace(name=name, host=connector.name)


@dataclass(frozen=True)
class ConnectAttempt:
    address: str
    port: int
    connected: bool
    errno: str | None
    seconds: float


@dataclass(frozen=True)
class IsolationProof:
    """What was checked from inside (and, for contrast, outside) the namespace, and the verdict."""

    namespace: str
    host: str
    links: list[str]
    routes: list[str]
    production_inside: list[ConnectAttempt]
    production_outside: list[ConnectAttempt]
    copy_inside: ConnectAttempt | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def evidence(self) -> str:
        lines = [f"namespace {self.namespace} on {self.host}: links {', '.join(self.links) or 'none'}; "
                 f"routes {'; '.join(self.routes) or 'none'}"]
        for attempt in self.production_inside:
            outcome = "connected" if attempt.connected else attempt.errno
            lines.append(f"inside -> production {attempt.address}:{attempt.port}: {outcome} in {attempt.seconds:.3f}s")
        for attempt in self.production_outside:
            outcome = "connected" if attempt.connected else attempt.errno
            lines.append(f"outside -> production {attempt.address}:{attempt.port}: {outcome} (control)")
        if self.copy_inside is not None:
            outcome = "answers" if self.copy_inside.connected else f"does not answer ({self.copy_inside.errno})"
            lines.append(f"inside -> copy 127.0.0.1:{self.copy_inside.port}: {outcome}")
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        return "\n".join(lines)


def connect_attempts(connector: Connector, endpoints: list[tuple[str, int]], *, namespace: str | None,
                     timeout: float = CONNECT_TIMEOUT) -> list[ConnectAttempt]:
    """Try a TCP connect to each endpoint on the target, inside `namespace` when given."""
    if not endpoints:
        return []
    answer = host_script(connector, "connect", timeout, *_endpoint_args(endpoints), namespace=namespace)
    return _attempts(answer["results"])


def _endpoint_args(endpoints: list[tuple[str, int]]) -> list[str]:
    return [f"[{address}]:{port}" if ":" in address else f"{address}:{port}" for address, port in endpoints]


def _attempts(results: list[dict[str, object]]) -> list[ConnectAttempt]:
    return [ConnectAttempt(address=str(r["address"]), port=int(r["port"]), connected=bool(r["connected"]),  # type: ignore[call-overload]
                           errno=r["errno"], seconds=float(r["seconds"])) for r in results]  # type: ignore[arg-type]


def prove_isolation(connector: Connector, namespace: Namespace, production: list[tuple[str, int]], *,
                    copy_port: int | None = None, agent: ScriptAgent | None = None) -> IsolationProof:
    """Prove the namespace is isolated: only loopback inside, no route, every production
    endpoint refused or unreachable from inside at once, and (when `copy_port` is given) the
    copy answering on loopback inside.

    The same production endpoints are tried from the target itself, outside the namespace, as
    a control: an inside failure means more when the outside connect works. The control is
    evidence, not a condition: a DR target may be firewalled from production anyway.
    """
    if not production:
        raise ValueError(f"namespace {namespace.name}: a proof of isolation needs at least one production endpoint")
    endpoints = [*production, *([("127.0.0.1", copy_port)] if copy_port else [])]
    seen = host_script(connector, "inside", CONNECT_TIMEOUT, *_endpoint_args(endpoints), namespace=namespace.name,
                       agent=agent)
    attempts = _attempts(seen["results"])
    inside, copy = attempts[:len(production)], (attempts[-1] if copy_port else None)
    outside = connect_attempts(connector, production, namespace=None)
    links, routes = list(seen["links"]), list(seen["routes"])
    problems = [f"interface {link} besides loopback" for link in links if link != "lo"]
    problems += [f"route {route!r}" for route in routes]
    for attempt in inside:
        if attempt.connected:
            problems.append(f"production {attempt.address}:{attempt.port} is reachable from inside")
        elif attempt.errno not in NO_ROUTE:
            problems.append(f"production {attempt.address}:{attempt.port}: {attempt.errno} from inside, "
                            "not an immediate refusal: something routes out of the namespace")
    if copy is not None and not copy.connected:
        problems.append(f"the copy does not answer on 127.0.0.1:{copy.port} inside the namespace ({copy.errno})")
    return IsolationProof(namespace=namespace.name, host=connector.name, links=links, routes=routes,
                          production_inside=inside, production_outside=outside, copy_inside=copy, problems=problems)


def namespace_pids(connector: Connector, name: str) -> list[int]:
    """The processes running in the namespace (`ip netns pids`); none when it is gone."""
    if not namespace_exists(connector, name):
        return []
    listed = shell(connector, f"ip netns pids {shlex.quote(name)}", timeout=30)
    return sorted({int(token) for token in listed.stdout.split() if token.isdigit()})


@dataclass(frozen=True)
class NamespaceRemoval:
    name: str
    existed: bool
    stopped: list[dict[str, object]]

    @property
    def action(self) -> str:
        if not self.existed:
            return f"namespace {self.name} was already gone"
        if not self.stopped:
            return f"deleted namespace {self.name} (no process was left in it)"
        pids = ", ".join(f"{p['pid']} ({'+'.join(p['signals']) or p['was']})" for p in self.stopped)  # type: ignore[arg-type]
        return f"stopped the processes left in it ({pids}), then deleted namespace {self.name}"


def remove_namespace(connector: Connector, name: str, *, grace: float = 5.0) -> NamespaceRemoval:
    """Stop every process left in the namespace (TERM, KILL after `grace`), then delete it.

    `ip netns del` on a namespace that still has processes only unlinks its name: the
    processes and their network live on, invisible to `ip netns list`. They are stopped first.
    """
    done = host_script(connector, "netns-remove", name, grace, timeout=grace + 60)
    if done["existed"] and not done["deleted"]:
        raise TargetError(f"{connector.name}: ip netns del {name} failed: {done['error']}")
    return NamespaceRemoval(name=name, existed=done["existed"], stopped=done["stopped"])


__all__ = [
    "ConnectAttempt", "Isolation", "IsolationProof", "IsolationUnsupported", "Namespace", "NamespaceRemoval",
    "connect_attempts", "create_namespace", "list_namespaces", "namespace_exists", "namespace_name",
    "namespace_pids", "prove_isolation", "remove_namespace", "require_isolation",
]
