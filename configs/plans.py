"""Recovery plans: what a DR drill restores, where, how the copy is isolated, started, probed
and cleaned up, and the RTO/RPO it is held to.

Plain data, as Chaos Toolkit's experiments are: a plan is read from the config, validated here
(each member on its own, and against the inventory by `plan_problems`, which `configs.models`
calls so `config check` names the line), and run by tasks/drill and flows/drill.py.

A plan's groups run in order; a group starts only when every probe of the one before passed.
Each member restores some disks of one inventory host onto a DR target (another host, or the
controller itself) under `target.path`: disk NAME lands in `<path>/<NAME>`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from configs.probes import HttpProbe, Probe, TcpProbe

#: The DR target that is the machine running patchdrill, not an inventory host.
CONTROLLER = "controller"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?LW#]+$")

class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointSelector(_Plain):
    """Which recovery point a member restores. In YAML: `latest`,
    `latest-application-consistent`, or `{before: 2026-12-01T00:00:00Z}`."""

    select: Literal["latest", "latest-application-consistent", "before"] = "latest"
    before: datetime | None = Field(default=None, description="select: before: the newest point taken before this time (UTC if no offset).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"select": value}
        if isinstance(value, dict) and "before" in value and "select" not in value:
            return {"select": "before", **value}
        return value

    @model_validator(mode="after")
    def _before_needs_time(self) -> "PointSelector":
        if (self.select == "before") != (self.before is not None):
            raise ValueError("give a time with select: before (e.g. {before: 2026-12-01T00:00:00Z}), and only then")
        return self

    @property
    def cutoff(self) -> datetime | None:
        if self.before is None:
            return None
        return self.before if self.before.tzinfo else self.before.replace(tzinfo=timezone.utc)

    def describe(self) -> str:
        return f"latest before {self.cutoff.isoformat()}" if self.cutoff else self.select


class DrTarget(_Plain):
    host: str = Field(description=f"An inventory host, or '{CONTROLLER}' for the machine running patchdrill.")
    path: str = Field(min_length=1, description="Root directory on the target; disk NAME is restored to <path>/<NAME>. "
                      "Removed entirely at cleanup: give a directory of its own. Absolute on a host; on the "
                      "controller it may be relative to the config file.")

    @field_validator("path")
    @classmethod
    def _not_a_root(cls, value: str) -> str:
        if value.rstrip("/\\") in ("", ".", "..") or re.match(r"^[A-Za-z]:[\\/]?$", value):
            raise ValueError("target path must not be a file system root: cleanup removes it")
        return value


#: What each preset reads from an app's fields, on either side (`primary:` may set only these).
PRESET_FIELDS: dict[str, tuple[str, ...]] = {
    "process": ("command", "pidfile"), "systemd": ("name", "command"), "windows-service": ("name",),
    "hyperv": ("name",), "libvirt": ("name",), "command": ("start", "stop", "verify"),
}


class AppSide(_Plain):
    """What differs on the primary side in a failover or failback: the same application under
    another unit, service, VM or domain name, or another command line. Unset fields are the
    copy's. Only the fields the preset reads may be given (config check names the others)."""

    name: str | None = Field(default=None, description="The primary's unit, service, VM or domain name.")
    command: str | None = Field(default=None, description="process: the primary's command line.")
    pidfile: str | None = Field(default=None, description="process: where the primary's pid is kept.")
    start: str | None = Field(default=None, description="command: the primary's start template.")
    stop: str | None = Field(default=None, description="command: the primary's stop template.")
    verify: str | None = Field(default=None, description="command: the primary's stopped check.")


class AppControl(_Plain):
    """How the restored copy's application is started and stopped on the target.

    Commands are templates: `{root}` is the member's target path, `{disk:NAME}` where disk
    NAME was restored, `{name}` the control's name, `{port}` the copy's port, `{namespace}` its
    network namespace. On a Linux target with netns isolation they run inside it.

    A failover and its failback use the same preset on both sides: they stop and start the
    primary's application and the copy's (docs/drill.md, "Failover with presets"); `primary`
    says what differs on the primary.
    """

    preset: Literal["process", "systemd", "windows-service", "hyperv", "libvirt", "command"] = Field(
        description="process: `command` started in the background, its pid kept in a pidfile; systemd / "
        "windows-service / hyperv / libvirt: the unit, service, VM or domain called `name`; command: your own "
        "start/stop templates.")
    name: str | None = Field(default=None, description="Unit, service, VM or domain name (systemd, windows-service, hyperv, libvirt).")
    command: str | None = Field(default=None, description="process: the command line that runs the application in the foreground.")
    start: str | None = Field(default=None, description="command: the start template (also overrides a preset's).")
    stop: str | None = Field(default=None, description="command: the stop template (also overrides a preset's).")
    verify: str | None = Field(default=None, description="command: a check that exits 0 once the copy is stopped (cleanup's proof).")
    port: int | None = Field(default=None, ge=1, le=65535, description="The port the copy answers on: cleanup proves it closed.")
    ready_wait_seconds: float = Field(default=30, ge=0, le=3600, description="How long probes retry while the copy starts.")
    pidfile: str | None = Field(default=None, description="process, failover only: where the application's pid is "
                                "kept on its side (a template; default {root}/.patchdrill/<name>.pid). A pidfile "
                                "holding just a pid, as daemons write them, is read too.")
    primary: AppSide | None = Field(default=None, description="Failover and failback: what differs on the primary "
                                    "(another unit or service name, command line or template); default: the same.")

    def on(self, side: Literal["primary", "copy"]) -> "AppControl":
        """The control as it applies on one side of a failover: the primary's overrides merged."""
        if side == "copy" or self.primary is None:
            return self
        return self.model_copy(update={**self.primary.model_dump(exclude_none=True), "primary": None})

    @model_validator(mode="after")
    def _what_it_needs(self) -> "AppControl":
        if self.preset == "process" and not self.command:
            raise ValueError("preset 'process' needs a command (the application's command line)")
        if self.preset in ("systemd", "windows-service", "hyperv", "libvirt") and not self.name:
            raise ValueError(f"preset {self.preset!r} needs a name")
        if self.preset == "command" and not (self.start and self.stop):
            raise ValueError("preset 'command' needs both start and stop templates")
        return self

    @property
    def template(self) -> str | None:
        """The preset's one template: the command line, or the unit/service/VM/domain name."""
        if self.preset in ("process", "systemd"):
            return self.start or self.command
        if self.preset == "command":
            return self.start
        return self.name


class Action(_Plain):
    """A step before the copy starts (pre) or after its probes passed (post). A manual action
    pauses the run for a person (the Prefect UI's Resume form) before the member's group starts
    (pre) or once the group's probes passed (post); a rejection stops the drill, cleanup runs."""

    kind: Literal["script", "manual"] = "script"
    where: Literal["target", "controller"] = Field(default="target", description="script: run on the DR target (inside "
                                                   "the copy's namespace) or on the controller.")
    command: str | None = Field(default=None, description="script: a shell command (templates as in start/stop).")
    instructions: str | None = Field(default=None, description="manual: what a person must do before resuming the run.")
    timeout_seconds: float = Field(default=300, gt=0, le=86400)

    @model_validator(mode="after")
    def _needs(self) -> "Action":
        if self.kind == "script" and not self.command:
            raise ValueError("a script action needs a command")
        if self.kind == "manual" and not self.instructions:
            raise ValueError("a manual action needs instructions for the person who resumes the run")
        return self


class PlanMember(_Plain):
    host: str = Field(description="The inventory host whose disks are restored (the primary).")
    disks: list[str] | None = Field(default=None, description="Disk names of the host; default: all of them.")
    point: PointSelector = Field(default_factory=PointSelector, description="latest | latest-application-consistent | {before: TIME}.")
    target: DrTarget
    isolation: Literal["netns", "none"] | None = Field(
        default=None, description="netns (default on Linux targets): the copy runs in a network namespace of its own "
        "with no route to production; none: the copy shares the target's network (say so explicitly).")
    app: AppControl | None = Field(default=None, description="Start/stop of the restored copy; none: files only.")
    pre_actions: list[Action] = Field(default_factory=list, description="Before the copy starts.")
    post_actions: list[Action] = Field(default_factory=list, description="After the copy's probes passed.")
    probes: list[Probe] = Field(default_factory=list, description="Run against the copy (inside its namespace).")
    steady_state: list[Probe] = Field(default_factory=list, description="Run against the primary before and after: it must stay healthy.")
    primary_writes: bool = Field(default=False, description="The primary keeps writing these disks during the drill "
                                 "(a live database): their checksums before and after are recorded, but a difference "
                                 "does not fail the drill. Off: any change to the primary fails it.")
    cleanup: list[str] = Field(default_factory=list, description="Extra commands run on the target at cleanup (before the files go).")
    ports: list[int] = Field(default_factory=list, description="Ports the copy listens on, beside those its probes name "
                             "(checked for clashes between members sharing a network).")

    def listening_ports(self) -> set[int]:
        found = set(self.ports) | ({self.app.port} if self.app and self.app.port else set())
        for probe in self.probes:
            if isinstance(probe, TcpProbe):
                found.add(probe.port)
            elif isinstance(probe, HttpProbe):
                url = urlsplit(probe.url.replace("{address}", "address"))
                try:
                    found.add(url.port or (443 if url.scheme == "https" else 80))
                except ValueError:
                    pass
        return found


class PlanGroup(_Plain):
    name: str = Field(pattern=_NAME)
    members: list[PlanMember] = Field(min_length=1)


class DrillSchedule(_Plain):
    cron: str = Field(description="Five-field cron expression, e.g. '0 3 1 1,4,7,10 *' (03:00 on the first day of each quarter).")
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression is read in.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{value!r} is not a five-field cron expression (minute hour day month weekday)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'Europe/Paris'") from None
        return value


class RecoveryPlan(_Plain):
    description: str = ""
    rto_target: timedelta = Field(description="Longest acceptable time from failover start to the last group's probes passing (e.g. PT30M or 1800).")
    rpo_target: timedelta = Field(description="Oldest acceptable recovery point at failover start (e.g. PT24H).")
    groups: list[PlanGroup] = Field(min_length=1, description="Started in order; a group starts when the one before passed its probes.")
    schedule: DrillSchedule | None = Field(default=None, description="The quarterly drill's schedule (deployments/prefect.yaml).")
    backup_policy: str | None = Field(default=None, description="Backup policy whose repository settings (its key) open "
                                      "the points; default: the config's default policy.")

    @field_validator("rto_target", "rpo_target")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[PlanGroup]) -> list[PlanGroup]:
        names = [g.name for g in groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"group names must be unique: {', '.join(twice)} appear more than once")
        return groups

    def members(self) -> Iterable[tuple[int, int, PlanGroup, PlanMember]]:
        for gi, group in enumerate(self.groups):
            for mi, member in enumerate(group.members):
                yield gi, mi, group, member


class _Host(Protocol):
    name: str
    address: str
    transport: str
    os_family: str
    disks: Sequence[Any]


def member_id(group: str, member: PlanMember, index: int) -> str:
    """How the drill names a member in logs, the ledger and the evidence: group/host#n."""
    return f"{group}/{member.host}#{index}"


def member_disks(member: PlanMember, host: _Host) -> list[str]:
    return list(member.disks) if member.disks is not None else [d.name for d in host.disks]


def isolation_of(member: PlanMember, target_os: str) -> Literal["netns", "none"]:
    if member.isolation is not None:
        return member.isolation
    return "netns" if target_os == "linux" else "none"


def _overlaps(a: str, b: str) -> bool:
    a, b = posixpath.normpath(a), posixpath.normpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def config_problem(loc: tuple[str | int, ...], kind: str, message: str) -> InitErrorDetails:
    # The message goes through str.format-like templating in pydantic-core: escape the braces.
    return InitErrorDetails(type=PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}")),
                            loc=loc, input=None)


def plan_problems(plans: dict[str, RecoveryPlan], hosts: Sequence[_Host],
                  base_dir: Any = None) -> list[InitErrorDetails]:
    """Every way the plans disagree with the inventory, each at its own field (relative to
    `recovery_plans`): unknown hosts and disks, a target that is its own primary, two members
    on one network listening on one port, netns on a Windows target."""
    by_name = {h.name: h for h in hosts}
    problems: list[InitErrorDetails] = []
    for plan_name, plan in plans.items():
        shared: dict[tuple[str, int], str] = {}
        for gi, mi, group, member in plan.members():
            at: tuple[str | int, ...] = (plan_name, "groups", gi, "members", mi)
            primary = by_name.get(member.host)
            if primary is None:
                problems.append(config_problem(at + ("host",), "unknown_host", f"no host {member.host!r} in the inventory"))
            else:
                known = {d.name for d in primary.disks}
                if not known:
                    problems.append(config_problem(at + ("host",), "no_disks", f"host {member.host!r} has no disks to restore"))
                for di, disk in enumerate(member.disks or []):
                    if disk not in known:
                        problems.append(config_problem(at + ("disks", di), "unknown_disk",
                                                 f"host {member.host!r} has no disk {disk!r} (known: {', '.join(sorted(known)) or 'none'})"))
            problems += _app_problems(member, at, by_name.get(member.target.host))
            target_name = member.target.host
            target = by_name.get(target_name)
            if target_name != CONTROLLER and target is None:
                problems.append(config_problem(at + ("target", "host"), "unknown_host",
                                         f"no host {target_name!r} in the inventory (or '{CONTROLLER}')"))
                continue
            if target_name == member.host:
                problems.append(config_problem(at + ("target", "host"), "target_is_primary",
                                         f"the DR target of {member.host!r} is the primary itself: a drill must never touch the primary"))
                continue
            if target is not None and target.transport != "local" and not _absolute(member.target.path):
                problems.append(config_problem(at + ("target", "path"), "relative_path",
                                         f"target path {member.target.path!r} must be absolute on host {target_name!r}"))
            target_os = target.os_family if target is not None else "linux"
            target_address = target.address if target is not None else None
            same_machine = primary is not None and (
                (target is None and primary.transport == "local")
                or (target is not None and target.address == primary.address)
                or (target is not None and target.transport == "local" and primary.transport == "local"))
            if same_machine and primary is not None:
                for disk in primary.disks:
                    if _overlaps(str(_placed(disk.path, primary, base_dir)), str(_placed(member.target.path, target, base_dir))):
                        problems.append(config_problem(at + ("target", "path"), "target_is_primary",
                                                 f"target path {member.target.path!r} overlaps disk {disk.name!r} of "
                                                 f"{member.host!r} ({disk.path}) on the same machine: the restore would "
                                                 "write over the primary"))
                        break
            if target_os == "windows" and member.isolation == "netns":
                problems.append(config_problem(at + ("isolation",), "netns_on_windows",
                                         f"target {target_name!r} runs Windows, which has no network namespaces: "
                                         "use isolation: none (and an isolated network of your own)"))
            elif target_os == "windows" and member.isolation is None:
                problems.append(config_problem(at + ("isolation",), "isolation_required",
                                         f"target {target_name!r} runs Windows, where patchdrill cannot isolate the copy: "
                                         "say isolation: none explicitly"))
            if isolation_of(member, target_os) == "none":
                network = target_address or CONTROLLER
                for port in sorted(member.listening_ports()):
                    other = shared.setdefault((network, port), member_id(group.name, member, mi))
                    if other != member_id(group.name, member, mi):
                        problems.append(config_problem(at + ("isolation",), "duplicate_port",
                                                 f"port {port} is used by {other} too, on the same network of "
                                                 f"{target_name!r} (isolation none): give one of them netns or another port"))
    return problems


#: The operating system each preset's commands run on (the command preset runs on either).
PRESET_OS: dict[str, str] = {"process": "linux", "systemd": "linux", "libvirt": "linux",
                             "windows-service": "windows", "hyperv": "windows"}


def _app_problems(member: PlanMember, at: tuple[str | int, ...], target: _Host | None) -> list[InitErrorDetails]:
    """A primary override the preset does not read, and a preset the target's operating system
    cannot run."""
    app = member.app
    if app is None:
        return []
    problems = []
    used = PRESET_FIELDS[app.preset]
    for name in sorted(app.primary.model_fields_set if app.primary else ()):
        if getattr(app.primary, name) is not None and name not in used:
            problems.append(config_problem(at + ("app", "primary", name), "unused_field",
                                     f"preset {app.preset!r} does not read {name!r}; on the primary it takes "
                                     f"{', '.join(used)}"))
    needs = PRESET_OS.get(app.preset)
    target_os = target.os_family if target is not None else ("linux" if member.target.host == CONTROLLER else None)
    if needs and target_os and target_os != needs:
        # The primary is not checked here: a drill never runs the preset there (a Hyper-V VM's
        # image may be drilled under libvirt); a failover refuses it when it starts.
        problems.append(config_problem(at + ("app", "preset"), "preset_os",
                                 f"preset {app.preset!r} runs on {needs.capitalize()} hosts; the target "
                                 f"{member.target.host!r} runs {target_os.capitalize()}: use the command preset "
                                 f"or a {target_os.capitalize()} preset"))
    return problems


def _absolute(path: str) -> bool:
    return path.startswith("/") or bool(re.match(r"^[A-Za-z]:[\\/]", path))


def _placed(path: str, host: _Host | None, base_dir: Any) -> str:
    """A local host's relative disk path, read as the loader does (relative to the config)."""
    if base_dir is not None and not posixpath.isabs(path) and (host is None or host.transport == "local"):
        return posixpath.normpath(posixpath.join(str(base_dir), path))
    return path


PlanName = Annotated[str, Field(pattern=_NAME)]

__all__ = [
    "CONTROLLER", "PRESET_FIELDS", "PRESET_OS", "Action", "AppControl", "AppSide", "DrTarget", "DrillSchedule", "PlanGroup", "PlanMember", "PlanName",
    "PointSelector", "Probe", "RecoveryPlan", "isolation_of", "member_disks", "member_id", "plan_problems",
]
