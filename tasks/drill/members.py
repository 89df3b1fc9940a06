"""A recovery plan resolved against its config: each member with its primary host, its DR target
(an inventory host, or the controller as a local host), its disks, isolation and copy root.

Pure: no connection is made here. The flow, readiness and the steps all work from these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from configs.models import HostConfig, PatchdrillConfig
from configs.plans import CONTROLLER, PlanMember, RecoveryPlan, isolation_of, member_disks, member_id


class PlanError(Exception):
    """The plan cannot be run as asked (no such plan, a member that does not resolve)."""


#: The controller as a DR target: this machine, reached without a transport.
CONTROLLER_HOST = HostConfig(name=CONTROLLER, transport="local", os_family="linux")


@dataclass(frozen=True)
class Member:
    id: str
    group: str
    spec: PlanMember
    primary: HostConfig
    target: HostConfig
    disks: tuple[str, ...]
    isolation: str
    #: the member's copy root on the target (absolute); disk NAME goes to <root>/<NAME>
    root: str

    def disk_path(self, disk: str) -> str:
        return f"{self.root.rstrip('/')}/{disk}"

    @property
    def restored(self) -> dict[str, str]:
        return {disk: self.disk_path(disk) for disk in self.disks}


def find_plan(config: PatchdrillConfig, name: str, source: str = "the config") -> RecoveryPlan:
    if name not in config.recovery_plans:
        known = ", ".join(sorted(config.recovery_plans)) or "none"
        raise PlanError(f"{source}: no recovery plan {name!r} (known: {known})")
    return config.recovery_plans[name]


def resolve(config: PatchdrillConfig, base_dir: Path, plan: RecoveryPlan) -> list[list[Member]]:
    """The plan's members, group by group, in order."""
    hosts = {h.name: h for h in config.hosts}
    groups: list[list[Member]] = []
    for group in plan.groups:
        members = []
        for index, spec in enumerate(group.members):
            primary = hosts.get(spec.host)
            target = CONTROLLER_HOST if spec.target.host == CONTROLLER else hosts.get(spec.target.host)
            if primary is None or target is None:
                raise PlanError(f"plan member {spec.host!r}: unknown host (run `patchdrill config check`)")
            root = spec.target.path
            if target.transport == "local" and not os.path.isabs(root):
                root = os.path.normpath(base_dir / root)
            members.append(Member(id=member_id(group.name, spec, index), group=group.name, spec=spec,
                                  primary=primary, target=target, disks=tuple(member_disks(spec, primary)),
                                  isolation=isolation_of(spec, target.os_family), root=root))
        groups.append(members)
    return groups


def primary_disk_path(member: Member, disk: str, base_dir: Path) -> str:
    """Where the primary keeps disk (a local host's relative path read from the config's directory)."""
    [found] = [d for d in member.primary.disks if d.name == disk]
    if member.primary.transport == "local" and not os.path.isabs(found.path):
        return os.path.normpath(base_dir / found.path)
    return found.path
