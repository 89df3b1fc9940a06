"""Starting and stopping a drill's test copy: command templates and presets.

A plan's start and stop steps are templates with placeholders, filled per member and quoted for
the shell that runs them (POSIX sh or PowerShell), so no name, path or disk, however hostile,
can become part of a command:

    {root}          the copy's root directory on the target
    {name}          the copy's name (the member's)
    {port}          the port the copy answers on
    {namespace}     the copy's network namespace (isolated copies)
    {disk:NAME}     the restored path of disk NAME
    {{ and }}       literal braces

Presets:
    process           the template is the copy's command line; it starts detached (inside the
                      namespace when isolated), its pid and start time in a pidfile under the
                      copy's root; stopped by TERM, then KILL after a grace period
    systemd           a transient unit (`systemd-run`, joined to the namespace with
                      NetworkNamespacePath=) running the template; `systemctl stop`
    windows-service   Start-Service / Stop-Service of the service the template names
    hyperv            Start-VM / Stop-VM -TurnOff of the VM the template names
    libvirt           `virsh start` / `virsh destroy` of the domain the template names
    command           free start, stop and (optional) verify templates

Rendering (`render`) is pure. `start_copy` records the copy in the drill's ledger before it
starts it; `stop_copy` stops what a ledger entry names and is safe to call again.

A failover and its failback use the same presets for an application that stays
(`start_service`, `stop_service`, rendered by `render_service`): a plain process keeps its pid
in a pidfile of the side's (default `{root}/.patchdrill/NAME.pid`), a systemd preset controls
the installed unit called `name`, and every stop is followed by its stopped check.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from configs.plans import PRESET_OS, AppControl
from connectors.agent import ScriptAgent
from connectors.base import Connector
from connectors.powershell import ps_quote
from tasks.drill.isolation import namespace_name
from tasks.drill.ledger import (
    CommandEntry,
    DomainEntry,
    Ledger,
    ProcessEntry,
    Resource,
    ServiceEntry,
    UnitEntry,
    VmEntry,
)
from tasks.drill.target import DEFAULT_TIMEOUT, TargetError, host_script, in_namespace, shell

Preset = Literal["process", "systemd", "windows-service", "hyperv", "libvirt", "command"]
Shell = Literal["sh", "powershell"]
PRESETS: tuple[Preset, ...] = ("process", "systemd", "windows-service", "hyperv", "libvirt", "command")
#: Where a plain process's pidfile and log live, under the copy's root.
STATE_DIR = ".patchdrill"
DEFAULT_GRACE_SECONDS = 10.0

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    """A start or stop template that cannot be filled; names the member and the placeholder."""


@dataclass(frozen=True)
class CopyContext:
    """What a member's templates are filled with."""

    member: str
    root: str
    name: str = ""
    port: int | None = None
    namespace: str | None = None
    disks: Mapping[str, str] = field(default_factory=dict)

    def value(self, placeholder: str) -> str:
        if placeholder == "root":
            return self.root
        if placeholder == "name":
            return self.name or self.member
        if placeholder == "port":
            if self.port is None:
                raise TemplateError(f"member {self.member!r}: the template uses {{port}} but the member has no port")
            return str(self.port)
        if placeholder == "namespace":
            if self.namespace is None:
                raise TemplateError(f"member {self.member!r}: the template uses {{namespace}} but the copy is not isolated")
            return self.namespace
        if placeholder.startswith("disk:"):
            disk = placeholder.removeprefix("disk:")
            if disk not in self.disks:
                known = ", ".join(sorted(self.disks)) or "none"
                raise TemplateError(f"member {self.member!r}: the template uses {{disk:{disk}}}, "
                                    f"but the restored disks are: {known}")
            return self.disks[disk]
        raise TemplateError(f"member {self.member!r}: unknown placeholder {{{placeholder}}}; "
                            "use {root}, {name}, {port}, {namespace} or {disk:NAME}")


def fill(template: str, context: CopyContext, quote: Callable[[str], str] = lambda value: value) -> str:
    """The template with each placeholder replaced by its value passed through `quote`."""
    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if match.group(1) is None:
            raise TemplateError(f"member {context.member!r}: unbalanced {token!r} in {template!r}; "
                                "write {{ or }} for a literal brace")
        return quote(context.value(match.group(1)))
    return _PLACEHOLDER.sub(replace, template)


def quoter(shell_kind: Shell) -> Callable[[str], str]:
    return ps_quote if shell_kind == "powershell" else shlex.quote


@dataclass(frozen=True)
class ControlSpec:
    """A member's start and stop steps: a preset and its templates.

    template: the command line (process, systemd, command) or the name of the service, VM or
    domain (windows-service, hyperv, libvirt; default "{name}"). stop and verify: the command
    preset's stop command and its check that the copy is stopped (exit 0 = stopped).
    """

    preset: Preset
    template: str | None = None
    stop: str | None = None
    verify: str | None = None
    grace_seconds: float = DEFAULT_GRACE_SECONDS


def control_spec(app: AppControl) -> ControlSpec:
    """A plan's app control as the preset's templates."""
    return ControlSpec(preset=app.preset, template=app.template, stop=app.stop, verify=app.verify)


@dataclass(frozen=True)
class Rendered:
    """A preset's commands for one member. For `process`, start is the copy's own command line
    (started detached by `start_copy`) and stop is empty: it stops by its pidfile."""

    preset: Preset
    shell: Shell
    start: str
    stop: str
    verify: str | None
    name: str | None = None


#: start, stop and the "is stopped" condition of the Windows presets; {name} is the quoted name.
_WINDOWS_PRESETS: dict[str, tuple[str, str, str]] = {
    "windows-service": ("Start-Service -Name {name}", "Stop-Service -Name {name} -Force",
                        "(Get-Service -Name {name}).Status -eq 'Stopped'"),
    "hyperv": ("Start-VM -Name {name}", "Stop-VM -Name {name} -TurnOff -Force", "(Get-VM -Name {name}).State -eq 'Off'"),
}


def stopped_check(preset: str, name: str) -> str:
    """The PowerShell that exits 0 when the named service or VM is stopped."""
    return f"if ({_WINDOWS_PRESETS[preset][2].format(name=ps_quote(name))}) {{ exit 0 }} else {{ exit 1 }}"


def unit_stopped_check(unit: str) -> str:
    """The sh that exits 0 when the unit is inactive or failed (a collected transient unit
    reads inactive); anything else, or no systemd to ask, exits non-zero."""
    return (f"case \"$(systemctl show --property=ActiveState --value -- {shlex.quote(unit)})\" in "
            "inactive|failed) exit 0;; *) exit 1;; esac")


def unit_commands(unit: str) -> tuple[str, str, str]:
    """Start, stop and the stopped check of a systemd unit."""
    return f"systemctl start {shlex.quote(unit)}", f"systemctl stop {shlex.quote(unit)}", unit_stopped_check(unit)


def unit_name(run_id: str, member: str) -> str:
    """A systemd unit name derived like the namespace's: valid whatever the member is called."""
    return f"{namespace_name(run_id, member)}.service"


def render(spec: ControlSpec, context: CopyContext, *, run_id: str) -> Rendered:
    """The commands of a member's start and stop steps, every value quoted for its shell. Pure."""
    if spec.preset not in PRESETS:
        raise TemplateError(f"member {context.member!r}: unknown start/stop preset {spec.preset!r}; "
                            f"choose one of {', '.join(PRESETS)}")
    if spec.preset in ("process", "systemd", "command") and not spec.template:
        raise TemplateError(f"member {context.member!r}: preset {spec.preset!r} needs a command template")
    sh = quoter("sh")
    if spec.preset == "process":
        return Rendered("process", "sh", fill(spec.template or "", context, sh), "", None)
    if spec.preset == "systemd":
        unit = unit_name(run_id, context.member)
        options = [f"--unit={unit}", "--collect", "--quiet", "--service-type=exec",
                   f"--working-directory={context.root}"]
        if context.namespace:
            options.append(f"--property=NetworkNamespacePath=/run/netns/{context.namespace}")
        command = "exec " + fill(spec.template or "", context, sh)
        start = shlex.join(["systemd-run", *options, "--", "/bin/sh", "-c", command])
        _, stop, stopped = unit_commands(unit)
        return Rendered("systemd", "sh", start, stop, stopped, name=unit)
    if spec.preset in _WINDOWS_PRESETS:
        name = fill(spec.template or "{name}", context)
        start, stop, _ = (part.format(name=ps_quote(name)) for part in _WINDOWS_PRESETS[spec.preset])
        return Rendered(spec.preset, "powershell", start, stop, stopped_check(spec.preset, name), name=name)
    if spec.preset == "libvirt":
        name = fill(spec.template or "{name}", context)
        return Rendered("libvirt", "sh", f"virsh start {sh(name)}", f"virsh destroy {sh(name)}",
                        f"[ \"$(virsh domstate {sh(name)})\" = 'shut off' ]", name=name)
    if not spec.stop:
        raise TemplateError(f"member {context.member!r}: preset 'command' needs a stop command")
    return Rendered("command", "sh", fill(spec.template or "", context, sh), fill(spec.stop, context, sh),
                    fill(spec.verify, context, sh) if spec.verify else None)


def check_preset(preset: str, *, member: str, host: str, os_family: str) -> None:
    """Fail with one line naming the member when its preset cannot run on its target's OS."""
    needs = PRESET_OS.get(preset)
    if needs is not None and needs != os_family:
        raise TemplateError(f"member {member!r}: start/stop preset {preset!r} needs a "
                            f"{needs.capitalize()} target; {host} is a {os_family.capitalize()} host")


def render_for(connector: Connector, spec: ControlSpec, context: CopyContext, *, run_id: str) -> Rendered:
    """render() for the member's target: the preset must suit its OS, and the command preset's
    templates are quoted for its shell."""
    return render_on(connector.name, connector.os_family, spec, context, run_id=run_id)


def render_on(host: str, os_family: str, spec: ControlSpec, context: CopyContext, *, run_id: str) -> Rendered:
    check_preset(spec.preset, member=context.member, host=host, os_family=os_family)
    rendered = render(spec, context, run_id=run_id)
    if rendered.preset != "command" or os_family != "windows":
        return rendered
    ps = quoter("powershell")
    return Rendered("command", "powershell", fill(spec.template or "", context, ps), fill(spec.stop or "", context, ps),
                    fill(spec.verify, context, ps) if spec.verify else None)


def render_service(host: str, os_family: str, spec: ControlSpec, context: CopyContext) -> Rendered:
    """A failover's start and stop of the application on one side: render()'s commands, with
    one difference. A drill's systemd copy is a transient unit named after its run (so cleanup
    can prove it gone); a failover moves an application that stays, so its systemd preset starts
    and stops the installed unit called `name` (context.name) on that side."""
    if spec.preset != "systemd":
        return render_on(host, os_family, spec, context, run_id="")
    check_preset(spec.preset, member=context.member, host=host, os_family=os_family)
    if not context.name:
        raise TemplateError(f"member {context.member!r}: preset 'systemd' needs the unit's name")
    start, stop, stopped = unit_commands(context.name)
    return Rendered("systemd", "sh", start, stop, stopped, name=context.name)


@dataclass(frozen=True)
class Started:
    """A running copy and the ledger entry that names it (what stop_copy and cleanup take)."""

    entry: Resource
    rendered: Rendered
    #: With a ready wait: whether the copy accepted connections on its port within it.
    listening: bool | None = None
    #: A plain process that exited during the ready wait: its exit status (-N: signal N).
    exited: int | None = None

    def not_ready(self, port: int, seconds: float) -> str | None:
        """Why the copy is not up after its ready wait, or None when it listens."""
        if self.listening is not False:
            return None
        if self.exited is not None:
            return f"the copy exited with status {self.exited} before it listened on port {port}"
        return f"the copy does not listen on port {port} after {seconds:g} s"


def state_paths(context: CopyContext) -> tuple[str, str]:
    """The pidfile and the log of a plain process, under the copy's root."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", context.name or context.member).strip(".-")[:40] or "copy"
    return f"{context.root}/{STATE_DIR}/{slug}.pid", f"{context.root}/{STATE_DIR}/{slug}.log"


def start_copy(connector: Connector, ledger: Ledger, spec: ControlSpec, context: CopyContext, *,
               ready_wait: float | None = None, agent: ScriptAgent | None = None) -> Started:
    """Record the copy in the ledger, then start it (inside its namespace when it has one).
    ready_wait: then wait up to that many seconds for it to listen on context.port (a plain
    process in the same host call as its start). agent: a script agent inside the namespace."""
    rendered = render_for(connector, spec, context, run_id=ledger.run_id)
    common = {"host": connector.name, "member": context.member}
    waits = ready_wait is not None and context.port is not None
    if rendered.preset == "process":
        pidfile, logfile = state_paths(context)
        entry = ledger.record("process", **common, copy_root=context.root, pidfile=pidfile,
                              namespace=context.namespace, port=context.port)
        wait_args = (f"127.0.0.1:{context.port}", ready_wait) if waits else ()
        started = host_script(connector, "start", pidfile, logfile, context.root, rendered.start, *wait_args,
                              namespace=context.namespace, timeout=DEFAULT_TIMEOUT + (ready_wait or 0), agent=agent)
        # The pidfile recorded above already lets cleanup find the process; this adds its identity.
        entry = ledger.record("process", **common, copy_root=context.root, pidfile=pidfile,
                              namespace=context.namespace, port=context.port, refines=entry.seq,
                              pid=started["pid"], start_time=started["start_time"], boot_id=started["boot_id"])
        waited = started.get("wait") or {}
        return Started(entry=_as_resource(entry), rendered=rendered,
                       listening=bool(waited["connected"]) if waits else None, exited=waited.get("exited"))
    if rendered.preset == "systemd":
        entry = ledger.record("unit", **common, unit=rendered.name, namespace=context.namespace, port=context.port)
    elif rendered.preset == "windows-service":
        entry = ledger.record("service", **common, service=rendered.name)
    elif rendered.preset == "hyperv":
        entry = ledger.record("hyperv-vm", **common, vm=rendered.name)
    elif rendered.preset == "libvirt":
        entry = ledger.record("libvirt-domain", **common, domain=rendered.name)
    else:
        entry = ledger.record("command", **common, shell=rendered.shell, stop=rendered.stop, verify=rendered.verify,
                              namespace=context.namespace, port=context.port)
    start = rendered.start
    if rendered.preset == "command" and context.namespace:
        start = in_namespace(context.namespace, f"sh -c {shlex.quote(start)}")
    shell(connector, start)
    listening = None
    if ready_wait is not None and context.port is not None:
        listening = wait_listening(connector, context.port, namespace=context.namespace, timeout=ready_wait,
                                   agent=agent)
    return Started(entry=entry, rendered=rendered, listening=listening)  # type: ignore[arg-type]


def _as_resource(entry: Resource) -> Resource:
    # The refining entry carries everything the first one did: present it under the first seq,
    # as the ledger's resources() merges them.
    return entry.model_copy(update={"seq": entry.refines, "refines": None}) if entry.refines is not None else entry


def wait_listening(connector: Connector, port: int, *, namespace: str | None, timeout: float = 30.0,
                   agent: ScriptAgent | None = None) -> bool:
    """Whether something answers on 127.0.0.1:port (inside the namespace) within `timeout`."""
    return bool(host_script(connector, "wait", timeout, f"127.0.0.1:{port}", namespace=namespace,
                            timeout=timeout + 60, agent=agent)["connected"])


@dataclass(frozen=True)
class Stopped:
    action: str
    stopped: list[dict[str, object]] = field(default_factory=list)


def stop_process(connector: Connector, entry: ProcessEntry, *, run_id: str,
                 grace: float = DEFAULT_GRACE_SECONDS) -> Stopped:
    """TERM, then KILL after `grace`, the recorded process (by the ledger's pid, else its
    pidfile's), only while it is still that process (same pid, start time and boot id) and its
    pidfile in the run's marked copy root names it."""
    recorded = [{"pid": entry.pid, "start_time": entry.start_time, "boot_id": entry.boot_id}] \
        if entry.pid is not None and entry.start_time is not None else []
    request = {"pidfile": entry.pidfile, "root": entry.copy_root, "marker": run_id, "processes": recorded}
    done = host_script(connector, "stop", grace, json.dumps(request), timeout=grace + 60)
    if not done["processes"]:
        return Stopped(f"no pid recorded and no pidfile at {entry.pidfile}: the process was never started")
    record = done["processes"][0]
    pid = record["pid"]
    action = {
        "gone": f"pid {pid} had already exited",
        "rebooted": f"pid {pid} was started before {connector.name} rebooted: already gone",
        "reused": f"pid {pid} now belongs to another process (start time differs): ours had exited; "
                  "the other was left alone",
    }.get(record["was"], f"sent {' then '.join(record['signals'])} to pid {pid}")
    return Stopped(action, done["processes"])


def service_paths(context: CopyContext, pidfile: str | None) -> tuple[str, str]:
    """A failover's plain process: its pidfile (the plan's template filled, else where a drill
    keeps it) and its log beside it."""
    if pidfile is None:
        return state_paths(context)
    path = fill(pidfile, context)
    return path, path.removesuffix(".pid") + ".log"


def start_service(connector: Connector, spec: ControlSpec, context: CopyContext, *, pidfile: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> str:
    """Start a side's application with its preset, on the host's own network (a failover's
    copy is production): a plain process detached with its pidfile, anything else by its start
    command. Returns what was done, in words."""
    rendered = render_service(connector.name, connector.os_family, spec, context)
    if rendered.preset == "process":
        path, logfile = service_paths(context, pidfile)
        started = host_script(connector, "start", path, logfile, context.root, rendered.start)
        return f"started pid {started['pid']} (pidfile {path})"
    shell(connector, rendered.start, timeout=timeout)
    return f"{rendered.preset} {rendered.name or 'start command'} started"


def stop_service(connector: Connector, spec: ControlSpec, context: CopyContext, *, pidfile: str | None = None,
                 grace: float = DEFAULT_GRACE_SECONDS, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Stop a side's application with its preset and prove it stopped: a plain process by its
    pidfile (TERM, then KILL after `grace`; gone afterwards), anything else by its stop command
    and then its stopped check (a unit inactive, a service Stopped, a VM Off, a domain shut off,
    the command preset's verify when it has one). Stopping what is not running says so."""
    rendered = render_service(connector.name, connector.os_family, spec, context)
    if rendered.preset == "process":
        path, _ = service_paths(context, pidfile)
        done = host_script(connector, "stop-pidfile", grace, path, timeout=grace + 60)
        if not done["processes"]:
            return f"not running: no pid in {path}"
        record = done["processes"][0]
        if record["alive_after"]:
            raise TargetError(f"{connector.name}: pid {record['pid']} of {context.member} ({path}) is still running "
                              f"after {' then '.join(record['signals'])}")
        return f"sent {' then '.join(record['signals'])} to pid {record['pid']}" if record["signals"] else \
            f"pid {record['pid']} in {path} had already exited"
    shell(connector, rendered.stop, timeout=timeout)
    if rendered.verify is None:
        return f"{rendered.preset} {rendered.name or 'stop command'} stopped"
    checked = shell(connector, rendered.verify, timeout=timeout, check=False)
    if not checked.ok:
        raise TargetError(f"{connector.name}: {context.member} is not stopped after its stop command: "
                          f"{rendered.verify!r} exited {checked.exit_code}")
    return f"{rendered.preset} {rendered.name or 'stop command'} stopped (checked)"


def stop_copy(connector: Connector, entry: Resource, *, run_id: str, grace: float = DEFAULT_GRACE_SECONDS) -> Stopped:
    """Stop the copy a ledger entry of run `run_id` names. Stopping what is already stopped says so."""
    if isinstance(entry, ProcessEntry):
        return stop_process(connector, entry, run_id=run_id, grace=grace)
    if isinstance(entry, UnitEntry):
        result = shell(connector, f"systemctl stop {shlex.quote(entry.unit)}", check=False)
        return Stopped(f"systemctl stop {entry.unit}: exit {result.exit_code}")
    if isinstance(entry, (ServiceEntry, VmEntry)):
        preset, name = ("windows-service", entry.service) if isinstance(entry, ServiceEntry) else ("hyperv", entry.vm)
        result = shell(connector, _WINDOWS_PRESETS[preset][1].format(name=ps_quote(name)), check=False)
        return Stopped(f"{'Stop-Service' if preset == 'windows-service' else 'Stop-VM'} {name}: exit {result.exit_code}")
    if isinstance(entry, DomainEntry):
        result = shell(connector, f"virsh destroy {shlex.quote(entry.domain)}", check=False)
        return Stopped(f"virsh destroy {entry.domain}: exit {result.exit_code}")
    if isinstance(entry, CommandEntry):
        stop = entry.stop
        if entry.namespace and entry.shell == "sh":
            stop = in_namespace(entry.namespace, f"sh -c {shlex.quote(stop)}")
        result = shell(connector, stop, check=False)
        return Stopped(f"ran the stop command: exit {result.exit_code}")
    raise TargetError(f"{connector.name}: a {entry.kind} entry is not a started copy")


__all__ = [
    "PRESETS", "PRESET_OS", "check_preset", "ControlSpec", "control_spec", "stopped_check", "unit_stopped_check", "CopyContext", "Preset", "Rendered", "Started", "Stopped", "TemplateError", "fill",
    "render", "render_for", "render_on", "render_service", "service_paths", "start_copy", "start_service",
    "state_paths", "stop_copy", "stop_process", "stop_service", "unit_commands", "unit_name", "wait_listening",
]
