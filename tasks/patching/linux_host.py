"""Enroll, assess, install and check reboots on a Linux host through any Connector.

Whether an update really installed is judged by a fresh assessment afterwards, not by the
package manager's exit code: an update is Installed when it is no longer missing. That holds
for apt, dnf and zypper alike, and catches a tool that exits 0 having done nothing.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from configs.secrets import redact
from connectors.base import CommandFailed, CommandResult, Connector
from tasks.patching import linux
from tasks.patching.models import (
    ComplianceState,
    Enrollment,
    PackageManager,
    RebootDetection,
    Update,
    UpdateOutcome,
)

class PackageManagerBusy(CommandFailed):
    """The package manager's lock was held by another process: transient, worth a retry."""

    transient = True


_HOST_SCRIPTS = Path(__file__).with_name("host_scripts")
FACTS_SCRIPT = _HOST_SCRIPTS / "linux_facts.sh"
ASSESS_SCRIPT = _HOST_SCRIPTS / "linux_assess.sh"


class LinuxFacts(BaseModel):
    """The JSON printed by host_scripts/linux_facts.sh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    os_family: str
    os_id: str
    os_name: str
    os_version: str
    variant: str
    kernel: str
    package_manager: str
    reboot_detection: str
    timezone: str
    boot_id: str


def enroll(connector: Connector, *, now: datetime | None = None) -> Enrollment:
    result = connector.run_script(FACTS_SCRIPT, check=True)
    return _enrollment(connector, result.stdout, now)


def _enrollment(connector: Connector, facts_json: str, now: datetime | None) -> Enrollment:
    try:
        facts = LinuxFacts.model_validate(json.loads(facts_json))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"host {connector.name}: {FACTS_SCRIPT.name} printed unexpected facts: {exc}") from None
    if facts.package_manager not in ("apt", "dnf", "yum", "zypper"):
        raise ValueError(f"host {connector.name}: no supported package manager found (apt-get, dnf, yum, zypper)")
    if not facts.boot_id:
        raise ValueError(f"host {connector.name}: no boot id in /proc/sys/kernel/random/boot_id")
    manager: PackageManager = facts.package_manager  # type: ignore[assignment]
    detection: RebootDetection = facts.reboot_detection  # type: ignore[assignment]
    return Enrollment(
        host=connector.name,
        os_family="linux",
        os_name=facts.os_name or facts.os_id,
        os_version=facts.os_version,
        build=facts.kernel,
        package_manager=manager,
        timezone=facts.timezone,
        hotpatch_eligible=False,  # hotpatch is a Windows Server Azure Edition feature
        reboot_detection=detection,
        boot_id=facts.boot_id,
        enrolled_at=now or datetime.now(timezone.utc),
    )


def _checked(connector: Connector, command: str, result: CommandResult) -> CommandResult:
    """The result of a command that must succeed; a busy package-manager lock is transient."""
    if not result.ok:
        error = PackageManagerBusy if linux.lock_busy(result.stderr + result.stdout) else CommandFailed
        raise error(connector.name, command, result.exit_code, redact(result.stderr))
    return result


def _run_all(connector: Connector, commands: list[str], env: dict[str, str] | None,
             timeout: float | None) -> list[CommandResult]:
    return [_checked(connector, command, connector.run(command, env=env, timeout=timeout)) for command in commands]


def survey_output(connector: Connector, *, refresh: bool = True, env: dict[str, str] | None = None,
                  timeout: float | None = None) -> linux.AssessmentOutput:
    """The facts and, on an apt host, the whole assessment, in one session: linux_facts.sh and
    linux_assess.sh sent as one script. Raises only when the script itself could not run; a
    failed step is in the output (see `survey_updates`)."""
    script = FACTS_SCRIPT.read_text(encoding="utf-8") + "\n" + ASSESS_SCRIPT.read_text(encoding="utf-8")
    args = " ".join(shlex.quote(a) for a in linux.apt_assess_script_args(refresh=refresh))
    result = connector.run(f"sh -s -- {args}", env=env, timeout=timeout, stdin=script.encode("utf-8"))
    if not result.ok:
        raise CommandFailed(connector.name, f"{FACTS_SCRIPT.name} + {ASSESS_SCRIPT.name}", result.exit_code, redact(result.stderr))
    try:
        return linux.parse_assessment_sections(result.stdout)
    except linux.ParseError as exc:
        raise ValueError(f"host {connector.name}: {exc}") from None


def survey_enrollment(connector: Connector, output: linux.AssessmentOutput, *,
                      now: datetime | None = None) -> Enrollment:
    return _enrollment(connector, output.facts, now)


def _apt_updates(connector: Connector, output: linux.AssessmentOutput, refresh: bool) -> list[Update]:
    failed = output.failed
    if failed is not None:
        # The same error as running the step's command alone with check=True.
        *refresh_command, simulate, secure = linux.apt_assess_commands(refresh=refresh)
        commands = {"refresh": refresh_command[0] if refresh_command else "", "simulation": simulate, "security": secure}
        error = PackageManagerBusy if linux.lock_busy(failed.stderr) else CommandFailed
        raise error(connector.name, commands.get(failed.name) or failed.name, failed.exit_code, redact(failed.stderr))
    if "simulation" not in output.steps:
        raise ValueError(f"host {connector.name}: apt-get was not found, so apt cannot assess it")
    try:
        return linux.apt_updates(output.step("simulation").stdout, output.security_simulation())
    except linux.ParseError as exc:
        raise ValueError(f"host {connector.name}: {exc}") from None


def survey_updates(connector: Connector, output: linux.AssessmentOutput, enrollment: Enrollment, *,
                   refresh: bool = True, env: dict[str, str] | None = None,
                   timeout: float | None = None) -> tuple[list[Update], bool]:
    """Missing updates and whether a reboot is pending, from the survey's output on an apt host;
    on dnf, yum and zypper hosts each command runs in a session of its own."""
    manager = enrollment.package_manager
    if manager != "apt":
        return (assess(connector, manager, env=env, refresh=refresh, timeout=timeout),
                reboot_pending(connector, manager, env=env, timeout=timeout))
    updates = _apt_updates(connector, output, refresh)
    try:
        return updates, linux.reboot_required("apt", output.step("reboot").exit_code)
    except ValueError as exc:
        raise ValueError(f"host {connector.name}: {exc}") from None


@dataclass(frozen=True)
class Survey:
    """A Linux host's read-only picture: enrollment facts, missing updates, pending reboot."""

    enrollment: Enrollment
    updates: list[Update]
    reboot_pending: bool


def survey(connector: Connector, *, env: dict[str, str] | None = None, refresh: bool = True,
           timeout: float | None = None, now: datetime | None = None) -> Survey:
    """Enroll and assess in as few sessions as the host allows: one on an apt host (facts,
    refresh, simulations and reboot check in one script)."""
    output = survey_output(connector, refresh=refresh, env=env, timeout=timeout)
    enrollment = survey_enrollment(connector, output, now=now)
    updates, pending = survey_updates(connector, output, enrollment, refresh=refresh, env=env, timeout=timeout)
    return Survey(enrollment, updates, pending)


def assess(connector: Connector, manager: PackageManager, *, env: dict[str, str] | None = None,
           refresh: bool = True, timeout: float | None = None) -> list[Update]:
    """Missing updates on the host. Changes nothing but the package lists (`refresh`)."""
    if manager == "apt":
        return _apt_updates(connector, survey_output(connector, refresh=refresh, env=env, timeout=timeout), refresh)
    if manager in ("dnf", "yum"):
        check_update, updateinfo = _run_all(connector, linux.dnf_assess_commands(manager, refresh=refresh), env, timeout)
        return linux.dnf_updates(check_update.stdout, updateinfo.stdout)
    if manager == "zypper":
        *_, patches = _run_all(connector, linux.zypper_assess_commands(refresh=refresh), env, timeout)
        return linux.parse_zypper_patches(patches.stdout)
    raise ValueError(f"host {connector.name}: {manager!r} is not a Linux package manager")


def reboot_pending(connector: Connector, manager: PackageManager, *, env: dict[str, str] | None = None,
                   timeout: float | None = None) -> bool:
    result = connector.run(linux.reboot_check_command(manager), env=env, timeout=timeout)
    try:
        return linux.reboot_required(manager, result.exit_code)
    except ValueError as exc:
        raise ValueError(f"host {connector.name}: {exc}") from None


@dataclass(frozen=True)
class InstallResult:
    outcomes: list[UpdateOutcome]
    reboot_required: bool
    commands: list[CommandResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.state is not ComplianceState.FAILED for o in self.outcomes)


def _install_commands(manager: PackageManager, updates: list[Update]) -> list[str]:
    if manager == "apt":
        return [linux.apt_install_command(updates)]
    if manager in ("dnf", "yum"):
        return linux.dnf_install_commands(manager, updates)
    if manager == "zypper":
        return [linux.zypper_install_command(updates)]
    raise ValueError(f"{manager!r} is not a Linux package manager")


def _run_install(connector: Connector, manager: PackageManager, command: str, env: dict[str, str] | None,
                 timeout: float | None) -> list[CommandResult]:
    result = connector.run(command, env=env, timeout=timeout)
    if manager == "zypper" and result.exit_code == linux.ZYPPER_RESTART_NEEDED:
        # zypper updated itself first; the same command then installs the rest.
        return [result, connector.run(command, env=env, timeout=timeout)]
    return [result]


def _failure_detail(results: list[CommandResult]) -> str:
    failed = [r for r in results if r.exit_code not in (0, linux.ZYPPER_REBOOT_NEEDED)]
    if not failed:
        return "still missing after the install reported success"
    last = failed[-1]
    tail = last.tail(3)
    return redact(f"install exited {last.exit_code}: {tail}" if tail else f"install exited {last.exit_code}")


def _unconfigured_packages(connector: Connector, manager: PackageManager, updates: list[Update],
                           env: dict[str, str] | None, timeout: float | None) -> set[str]:
    if manager != "apt":
        return set()  # rpm has no half-installed state that a fresh assessment would miss
    packages = [p for u in updates for p in u.packages]
    result = connector.run(linux.dpkg_state_command(packages), env=env, timeout=timeout)
    states = linux.parse_dpkg_states(result.stdout)
    return {p for p in packages if not states.get(p, ("", False))[1]}


def install(connector: Connector, manager: PackageManager, updates: list[Update], *,
            env: dict[str, str] | None = None, timeout: float | None = None) -> InstallResult:
    """Install exactly these updates, then judge each by a fresh assessment and check for a reboot."""
    if not updates:
        return InstallResult(outcomes=[], reboot_required=reboot_pending(connector, manager, env=env, timeout=timeout))
    results: list[CommandResult] = []
    for command in _install_commands(manager, updates):
        results.extend(_run_install(connector, manager, command, env, timeout))
        if not results[-1].ok and linux.lock_busy(results[-1].stderr + results[-1].stdout):
            # Another process kept the lock past the package manager's own wait: a transient
            # fault, so install_task tries again (installing exact versions twice is harmless).
            _checked(connector, command, results[-1])
    try:
        still_missing = {u.id for u in assess(connector, manager, env=env, refresh=False, timeout=timeout)}
    except CommandFailed as exc:
        raise ValueError(f"host {connector.name}: could not re-assess after installing: {exc.message}") from None
    unconfigured = _unconfigured_packages(connector, manager, updates, env, timeout)
    needs_reboot = reboot_pending(connector, manager, env=env, timeout=timeout) or any(
        r.exit_code == linux.ZYPPER_REBOOT_NEEDED for r in results if manager == "zypper"
    )
    installed_state = ComplianceState.INSTALLED_PENDING_REBOOT if needs_reboot else ComplianceState.INSTALLED
    outcomes = []
    for u in updates:
        broken = sorted(set(u.packages) & unconfigured)
        failed = u.id in still_missing or bool(broken)
        reason = ""
        if failed:
            reason = _failure_detail(results)
            if broken:
                reason = f"{', '.join(broken)} left unpacked but not configured; {reason}"
        outcomes.append(UpdateOutcome(update_id=u.id, title=u.title, classification=u.classification,
                                      state=ComplianceState.FAILED if failed else installed_state, reason=reason))
    return InstallResult(outcomes=outcomes, reboot_required=needs_reboot, commands=results)


__all__ = ["ASSESS_SCRIPT", "FACTS_SCRIPT", "InstallResult", "LinuxFacts", "PackageManagerBusy", "Survey", "assess", "enroll", "install",
           "reboot_pending", "survey", "survey_enrollment", "survey_output", "survey_updates"]
