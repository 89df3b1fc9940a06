"""A patch policy's safety net: the recovery point a host must have before it is patched, and
what happens when its health probes fail afterwards (report, or restore that point).

The model (`PatchPolicy.recovery_point`) and the checks that need the rest of the config: which
backup policy takes and reads the points, and, for `rollback: restore` or `ask`, whether every disk the
policy protects can be restored on a running host. They run at `config check` time, so a disk
that cannot be rolled back is found then, not during a failed maintenance night.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import InitErrorDetails

from configs.errors import field_error
from configs.plans import config_problem


# What the checks read of a disk, a host and a patch policy (configs.models and configs.policies
# import this module, so it names their shapes rather than importing them).
class _Disk(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...


DiskT = TypeVar("DiskT", bound=_Disk)


class _Host(Protocol[DiskT]):
    @property
    def name(self) -> str: ...
    @property
    def os_family(self) -> str: ...
    @property
    def groups(self) -> Sequence[str]: ...
    @property
    def disks(self) -> Sequence[DiskT]: ...


HostT = TypeVar("HostT", bound="_Host")


class _Policy(Protocol):
    @property
    def recovery_point(self) -> "RecoveryPointGate | None": ...

#: Paths of raw devices: the host keeps them open (mounted) while it runs, so no restore may write them.
_DEVICE_PREFIXES = ("/dev/", "\\\\.\\")


class RecoveryPointGate(BaseModel):
    """No patch without a fresh recovery point of every protected disk; optionally, a rollback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_age_hours: float | None = Field(
        default=None, gt=0, le=24 * 366,
        description="Every protected disk needs a recovery point no older than this many hours, or its host is "
                    "skipped. With take_before_install, the fallback when taking a point fails.")
    app_consistent: bool = Field(
        default=False, description="Only application-consistent points count (VSS writers, or a backup pre-script "
                                   "that succeeded): a point of a lower level does not let the host be patched.")
    take_before_install: bool = Field(
        default=False, description="Back every protected disk up right before the host's install, through the "
                                   "backup pipeline, inside the host's maintenance slot: the pre-patch point.")
    backup_policy: str | None = Field(
        default=None, description="The backup policy (of backup_policies) that takes and reads the points: block "
                                  "size, encryption key, snapshot and pre/post scripts. Unset: 'default', or the "
                                  "only one defined, or the built-in defaults when none is.")
    disks: list[str] = Field(
        default_factory=list, description="The protected disks, by name; empty for every disk of the host.")
    rollback: Literal["report", "restore", "ask"] = Field(
        default="report", description="When the host's health probes fail after install and reboot: 'report' "
                                      "only, 'restore' the pre-patch points onto its disks and probe again "
                                      "(destructive: an explicit choice), or 'ask': pause the run for a person to "
                                      "approve the restore in the Prefect UI (no answer in time: no rollback). A "
                                      "rollback fails the host and counts against max_errors. Needs "
                                      "take_before_install.")
    rollback_approval_minutes: float = Field(
        default=30.0, gt=0, le=24 * 60,
        description="With rollback: ask, how long the run waits for the answer; never past the moment a rollback "
                    "could still finish inside the host's maintenance window.")
    rollback_minutes: float | None = Field(
        default=None, gt=0, le=24 * 60,
        description="How long a rollback of one host may take: one is started only while this much of the host's "
                    "maintenance window is left (else the host is left for a person, and an alert says so). "
                    "Unset: twice as long as taking its pre-patch points took.")
    workload_stop: str | None = Field(
        default=None, description="Command on the host that stops the workload before a rollback restores its "
                                  "disks (needed for image disks: an open image cannot be rewritten safely).")
    workload_start: str | None = Field(
        default=None, description="Command on the host that starts the workload again after the restore.")
    stop_timeout_seconds: float = Field(default=300.0, gt=0, le=86400,
                                        description="Seconds workload_stop and workload_start may each run.")

    @model_validator(mode="after")
    def _coherent(self) -> "RecoveryPointGate":
        if self.max_age_hours is None and not self.take_before_install:
            raise field_error("max_age_hours", "gate_empty",
                              "set max_age_hours (a point no older than N hours), take_before_install: true, or both")
        if self.rollback != "report" and not self.take_before_install:
            raise field_error("rollback", "rollback_needs_point",
                              f"rollback: {self.rollback} needs take_before_install: true; an older point would throw away "
                              "everything written since it was taken")
        if (self.workload_stop is None) != (self.workload_start is None):
            missing = "workload_start" if self.workload_start is None else "workload_stop"
            raise field_error(missing, "workload_pair", "give workload_stop and workload_start together")
        return self

    @property
    def rolls_back(self) -> bool:
        """Whether a failed health check may restore the pre-patch points (at once, or once approved)."""
        return self.rollback != "report"

    @property
    def age_text(self) -> str:
        return f"{self.max_age_hours:g} h" if self.max_age_hours is not None else ""


def covered_hosts(policy_name: str, hosts: Sequence[HostT]) -> list[HostT]:
    """The hosts a policy may patch: those of the group it is named after (a run of that group
    picks it), else every host (`default`, or any policy chosen with --policy)."""
    return [h for h in hosts if policy_name in h.groups] or list(hosts)


def protected_disks(host: "_Host[DiskT]", gate: RecoveryPointGate) -> list[DiskT]:
    return [d for d in host.disks if not gate.disks or d.name in gate.disks]


def rollback_problem(host: "_Host[DiskT]", disk: _Disk, gate: RecoveryPointGate) -> str | None:
    """Why a rollback could not restore this disk of this host, or None when it can."""
    where = f"host {host.name} disk {disk.name}"
    if disk.kind == "auto":
        return f"{where} has kind auto: set kind: directory or block, so a rollback knows what it overwrites"
    if host.os_family == "windows" and disk.kind == "directory":
        return f"{where}: a Windows host takes image points only, so its directory disks cannot be rolled back"
    if disk.kind == "block" and disk.path.startswith(_DEVICE_PREFIXES):
        return (f"{where} is a raw device ({disk.path}): the running host keeps it open, so a rollback restores "
                f"image files and directories only")
    if disk.kind == "block" and gate.workload_stop is None:
        return (f"{where} is an image disk: a rollback rewrites it only with the workload stopped; "
                f"set workload_stop and workload_start")
    return None


def gate_problems(policies: Mapping[str, _Policy], hosts: Sequence["_Host[DiskT]"],
                  backup_policies: Collection[str]) -> list[InitErrorDetails]:
    """Every patch policy's recovery_point checked against the hosts it may patch and the backup
    policies: each problem placed on its field, naming the host and disk at fault."""
    problems: list[InitErrorDetails] = []
    for name, policy in policies.items():
        gate = policy.recovery_point
        if gate is None:
            continue
        loc = ("patch_policies", name, "recovery_point")
        if gate.backup_policy is not None and gate.backup_policy not in backup_policies:
            known = ", ".join(sorted(backup_policies)) or "none"
            problems.append(config_problem((*loc, "backup_policy"), "unknown_backup_policy",
                                     f"no backup policy named {gate.backup_policy!r} (defined: {known})"))
        elif gate.backup_policy is None and len(backup_policies) > 1 and "default" not in backup_policies:
            problems.append(config_problem((*loc, "backup_policy"), "ambiguous_backup_policy",
                                     f"several backup policies ({', '.join(sorted(backup_policies))}) and none "
                                     f"named 'default': name the one that takes and reads the points"))
        for host in covered_hosts(name, hosts):
            disks = protected_disks(host, gate)
            missing = sorted(set(gate.disks) - {d.name for d in host.disks})
            if missing:
                problems.append(config_problem((*loc, "disks"), "unknown_disk",
                                         f"host {host.name} has no disk {', '.join(missing)}"))
            elif not disks:
                problems.append(config_problem(loc, "nothing_protected",
                                         f"host {host.name} has no disks: no recovery point can let it be patched"))
            if gate.rolls_back:
                problems += [config_problem((*loc, "rollback"), "rollback_impossible", why)
                             for disk in disks if (why := rollback_problem(host, disk, gate)) is not None]
    return problems


__all__ = ["RecoveryPointGate", "covered_hosts", "gate_problems", "protected_disks", "rollback_problem"]
