"""Readiness: may this drill start? Checks only, changing nothing anywhere.

Per member: the point its selector picks exists for every disk and is within the plan's RPO
target; the DR target answers and has room for the restore (free space under the copy root
against the points' sizes, on Linux and Windows targets alike); the primary's steady-state probes pass. A failed check stops the
drill before anything is created, and names the member and the reason.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from configs.models import HostConfig
from connectors.base import Connector, ConnectorError
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.drill.copies import MARKER
from tasks.drill.copy import PointMissing, choose_point
from tasks.drill.evidence import ProbeRecord
from tasks.drill.members import Member
from tasks.drill.probing import primary_probes

Connect = Callable[[HostConfig], Connector]
FREE_SPACE_SCRIPT = Path(__file__).parent / "host_scripts" / "free_space.ps1"
#: Free space kept beyond the points' size (file system overhead, the restore's temporaries).
HEADROOM = 1.05


@dataclass(frozen=True)
class Check:
    member: str
    check: str
    ok: bool
    detail: str


@dataclass
class Readiness:
    checks: list[Check] = field(default_factory=list)
    #: (member id, disk) -> the point the drill will restore
    points: dict[tuple[str, str], RecoveryPoint] = field(default_factory=dict)
    probes: list[ProbeRecord] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        return "; ".join(f"{c.member}: {c.check}: {c.detail}" for c in self.failures) or "ready"


def _free_bytes(connector: Connector, path: str) -> int:
    """Free bytes on the file system that holds path (or its nearest existing parent): `df` on
    Linux, host_scripts/free_space.ps1 (the volume's available free space) on Windows."""
    if connector.os_family == "windows":
        result = connector.run_script(FREE_SPACE_SCRIPT, ["-Path", path], timeout=60, check=True)
        return int(json.loads(result.stdout.strip().splitlines()[-1])["free"])
    script = (f"p={shlex.quote(path)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; "
              "df -Pk \"$p\" | tail -n 1")
    result = connector.run(script, timeout=60, check=True)
    return int(result.stdout.split()[3]) * 1024


def _occupied(connector: Connector, root: str) -> str | None:
    """Why the copy root must not be used: cleanup removes it whole, so it must be absent, empty,
    or a previous drill's copy (its marker), never a directory holding someone's data."""
    path = shlex.quote(root)
    answer = connector.run(f"if [ ! -e {path} ]; then echo absent; elif [ -f {path}/{MARKER} ]; then echo drill; "
                           f"elif [ -d {path} ] && [ -z \"$(ls -A {path})\" ]; then echo empty; else echo occupied; fi",
                           timeout=60, check=True).stdout.strip()
    if answer == "occupied":
        return (f"{connector.name}:{root} holds data that is not a drill's copy, and cleanup removes the copy root "
                "whole: give the member a directory of its own")
    return None


def _bytes(count: int) -> str:
    return f"{count >> 20} MiB ({count} bytes)"


def check_points(member: Member, repo: Repository, now: datetime, rpo_seconds: float, ready: Readiness) -> None:
    for disk in member.disks:
        try:
            point = choose_point(repo, member.primary.name, disk, member.spec.point)
        except PointMissing as exc:
            ready.checks.append(Check(member.id, f"point {disk}", False, str(exc)))
            continue
        age = (now - point.time).total_seconds()
        within = age <= rpo_seconds
        ready.points[(member.id, disk)] = point
        ready.checks.append(Check(member.id, f"point {disk}", within,
                                  f"{point.key} ({point.consistency}) is {age / 3600:.1f} h old"
                                  + ("" if within else f", beyond the RPO target of {rpo_seconds / 3600:.1f} h")))


def check_target(member: Member, connector: Connector, ready: Readiness) -> None:
    if member.target.os_family != "windows":
        occupied = _occupied(connector, member.root)
        if occupied:
            ready.checks.append(Check(member.id, "target path", False, occupied))
    needed = int(sum(p.totals.size for (m, _), p in ready.points.items() if m == member.id) * HEADROOM)
    free = _free_bytes(connector, member.root)
    ok = free >= needed
    ready.checks.append(Check(member.id, "target", ok, f"{member.target.name}:{member.root} has {_bytes(free)} "
                              f"free, the restore needs {_bytes(needed)}" + ("" if ok else ": not enough room")))
    if member.isolation == "netns" and not connector.run("command -v ip", timeout=30).ok:
        ready.checks.append(Check(member.id, "isolation", False, f"{member.target.name} has no iproute2 'ip' for "
                                  "a network namespace"))


def check_readiness(members: list[Member], repo: Repository, connect: Connect, *, now: datetime,
                    rpo_seconds: float) -> Readiness:
    """Every check of every member, in plan order (all run, so one pass shows every problem)."""
    ready = Readiness()
    for member in members:
        check_points(member, repo, now, rpo_seconds, ready)
        try:
            with connect(member.target) as target:
                check_target(member, target, ready)
        except (ConnectorError, OSError) as exc:
            ready.checks.append(Check(member.id, "target", False, f"{member.target.name} unreachable: {exc}"))
        if member.spec.steady_state:
            try:
                with connect(member.primary) as primary:
                    probes = primary_probes(member.id, "primary-before", member.primary, primary,
                                            member.spec.steady_state)
            except (ConnectorError, OSError) as exc:
                ready.checks.append(Check(member.id, "primary", False, f"{member.primary.name} unreachable: {exc}"))
                continue
            ready.probes += probes
            failed = [f"{p.probe}: {p.detail}" for p in probes if not p.ok]
            ready.checks.append(Check(member.id, "primary steady state", not failed,
                                      "; ".join(failed) or f"{len(probes)} probe(s) passed"))
    return ready
