"""Assessment, selection, install and reboot detection against real apt-get and dpkg.

The host is the controller itself (LocalConnector) with the aptlab sandbox's environment; the
SSH end-to-end tests run the same functions through sshd.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from configs.models import HostConfig
from configs.policies import Classification, PatchPolicy
from connectors import settings_for
from connectors.base import CommandFailed, CommandResult
from connectors.local import LocalConnector
from tasks.patching import linux_host
from tasks.patching.models import ComplianceState
from tasks.patching.plan.selection import select
from tests.hosts.aptlab import REBOOT_POSTINST, AptLab

pytestmark = pytest.mark.integration


@pytest.fixture
def host() -> LocalConnector:
    return LocalConnector(settings_for(HostConfig(name="lab1", transport="local")))


def test_assessment_tells_security_from_other_updates(aptlab: AptLab, host: LocalConnector) -> None:
    updates = {u.id: u for u in linux_host.assess(host, "apt", env=aptlab.env)}
    assert {uid: u.classification for uid, u in updates.items()} == {
        "demo-db=1.2": Classification.OTHER,
        "demo-kernel=1.1": Classification.SECURITY,
        "demo-tools=1.1": Classification.OTHER,
        "demo-web=1.1": Classification.SECURITY,
        "demo-web=1.2": Classification.OTHER,
    }
    assert updates["demo-web=1.1"].source == "Debian-Security:12/stable-security"
    # Assessment changes nothing on the host.
    assert aptlab.installed_version("demo-web") == "1.0"
    assert not (aptlab.root / "run/reboot-required").exists()


def test_security_only_install_installs_exact_security_versions(aptlab: AptLab, host: LocalConnector) -> None:
    updates = linux_host.assess(host, "apt", env=aptlab.env)
    result = linux_host.install(host, "apt", [u for u in updates if u.is_security], env=aptlab.env)
    assert result.ok
    assert {o.update_id: o.state for o in result.outcomes} == {
        "demo-kernel=1.1": ComplianceState.INSTALLED_PENDING_REBOOT,
        "demo-web=1.1": ComplianceState.INSTALLED_PENDING_REBOOT,
    }
    assert aptlab.installed_version("demo-web") == "1.1"  # not the newer regular 1.2
    assert aptlab.installed_version("demo-kernel") == "1.1"
    assert aptlab.installed_version("demo-db") == "1.0"
    assert result.reboot_required and (aptlab.root / "run/reboot-required").exists()
    remaining = {u.id for u in linux_host.assess(host, "apt", env=aptlab.env, refresh=False)}
    assert remaining == {"demo-db=1.2", "demo-tools=1.1", "demo-web=1.2"}


def test_include_and_exclude_masks_decide_what_installs(aptlab: AptLab, host: LocalConnector) -> None:
    enrollment = linux_host.enroll(host)
    policy = PatchPolicy(classifications=[Classification.SECURITY, Classification.OTHER],
                         include=["demo-*"], exclude=["demo-kernel", "demo-t*"])
    decisions = select(linux_host.assess(host, "apt", env=aptlab.env), policy, enrollment, "baseline", date(2026, 1, 20))
    chosen = [d.update for d in decisions if d.install]
    assert sorted(u.id for u in chosen) == ["demo-db=1.2", "demo-web=1.1", "demo-web=1.2"]
    excluded = {d.update.id: d.reason for d in decisions if d.state is ComplianceState.EXCLUDED}
    assert excluded == {"demo-kernel=1.1": "excluded by 'demo-kernel'", "demo-tools=1.1": "excluded by 'demo-t*'"}
    result = linux_host.install(host, "apt", chosen, env=aptlab.env)
    assert result.ok and not result.reboot_required
    assert {o.state for o in result.outcomes} == {ComplianceState.INSTALLED}
    assert aptlab.installed_version("demo-web") == "1.2"
    assert aptlab.installed_version("demo-db") == "1.2"
    assert aptlab.installed_version("demo-kernel") == "1.0"
    assert aptlab.installed_version("demo-tools") == "1.0"


def test_a_package_whose_install_fails_is_reported_failed(aptlab: AptLab, host: LocalConnector) -> None:
    aptlab.install_base("demo-broken", "1.0")
    aptlab.publish("security", "demo-broken", "1.1", postinst="#!/bin/sh\necho 'postinst refuses' >&2\nexit 1\n")
    aptlab.apt_get("update")
    updates = {u.id: u for u in linux_host.assess(host, "apt", env=aptlab.env)}
    result = linux_host.install(host, "apt", [updates["demo-broken=1.1"], updates["demo-db=1.2"]], env=aptlab.env)
    states = {o.update_id: o for o in result.outcomes}
    assert states["demo-db=1.2"].state is ComplianceState.INSTALLED
    assert states["demo-broken=1.1"].state is ComplianceState.FAILED
    assert "install exited 100" in states["demo-broken=1.1"].reason
    assert not result.ok


def test_reboot_pending_reads_the_reboot_required_file(aptlab: AptLab, host: LocalConnector) -> None:
    assert not linux_host.reboot_pending(host, "apt", env=aptlab.env)
    (aptlab.root / "run/reboot-required").touch()
    assert linux_host.reboot_pending(host, "apt", env=aptlab.env)


def test_enrollment_reads_the_real_host_facts(host: LocalConnector) -> None:
    import platform

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    enrollment = linux_host.enroll(host, now=now)
    release = platform.freedesktop_os_release()
    assert enrollment.os_name == release["PRETTY_NAME"]
    assert enrollment.os_version == release.get("VERSION_ID", "")
    assert enrollment.package_manager == "apt" and enrollment.reboot_detection == "reboot-required-file"
    with open("/proc/sys/kernel/random/boot_id") as boot_id:
        assert enrollment.boot_id == boot_id.read().strip()
    assert enrollment.enrolled_at == now and not enrollment.hotpatch_eligible


class CountingConnector(LocalConnector):
    """The local host, counting the commands (an SSH session each over SSH)."""

    def __init__(self, host: HostConfig) -> None:
        super().__init__(settings_for(host))
        self.commands: list[str] = []

    def run(self, command: str, **kwargs: object) -> CommandResult:  # type: ignore[override]
        self.commands.append(command)
        return super().run(command, **kwargs)  # type: ignore[arg-type]


def test_survey_enrolls_and_assesses_in_one_command(aptlab: AptLab) -> None:
    host = CountingConnector(HostConfig(name="lab1", transport="local"))
    (aptlab.root / "run/reboot-required").touch()
    found = linux_host.survey(host, env=aptlab.env)
    assert len(host.commands) == 1
    assert found.enrollment.package_manager == "apt" and found.reboot_pending
    assert {u.id: u.classification for u in found.updates} == {
        u.id: u.classification for u in linux_host.assess(host, "apt", env=aptlab.env)}
    # The superseded security fix needs the security-preferring simulation, and it ran.
    assert "security" in linux_host.survey_output(host, env=aptlab.env).steps


def test_the_security_simulation_is_skipped_only_when_it_cannot_differ(aptlab: AptLab, host: LocalConnector) -> None:
    # Withdraw the superseded security fix: every security version left is its package's candidate.
    (aptlab.repository("security") / "demo-web_1.1_all.deb").unlink()
    aptlab.publish("security", "demo-kernel", "1.1", postinst=REBOOT_POSTINST)
    aptlab.apt_get("update")
    output = linux_host.survey_output(host, env=aptlab.env)
    assert "security.same" in output.steps and "security" not in output.steps
    updates = {u.id: u.classification for u in linux_host.assess(host, "apt", env=aptlab.env)}
    assert updates == {"demo-db=1.2": Classification.OTHER, "demo-kernel=1.1": Classification.SECURITY,
                       "demo-tools=1.1": Classification.OTHER, "demo-web=1.2": Classification.OTHER}


def test_without_refresh_the_lists_are_not_refreshed(aptlab: AptLab, host: LocalConnector) -> None:
    # apt reads a file: repository in place, so what is compared is the command run, not stale lists.
    cached = linux_host.survey_output(host, env=aptlab.env, refresh=False)
    refreshed = linux_host.survey_output(host, env=aptlab.env)
    assert "refresh" not in cached.steps
    assert refreshed.steps["refresh"].exit_code == 0 and "Reading package lists" in refreshed.steps["refresh"].stdout
    assert cached.steps["simulation"].stdout == refreshed.steps["simulation"].stdout


def test_a_failing_refresh_is_the_commands_failure(aptlab: AptLab, host: LocalConnector) -> None:
    (aptlab.root / "etc/apt/sources.list").write_text("deb [trusted=yes] file:/nonexistent/repo ./\n")
    with pytest.raises(CommandFailed) as failed:
        linux_host.assess(host, "apt", env=aptlab.env)
    assert "apt-get -q update" in failed.value.message


class _HeldLock:
    """Another process's hold on one of the sandbox's apt/dpkg locks, as unattended-upgrades or
    an operator's apt-get would hold it: the fcntl write lock apt and dpkg take themselves."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _apt_waiting(lab: AptLab) -> bool:
    """Whether an apt-get of this sandbox is running (and so, with the lock held, waiting)."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == "apt-get" and \
                    f"APT_CONFIG={lab.apt_config}".encode() in (proc / "environ").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_a_busy_lists_lock_is_a_transient_fault(aptlab: AptLab, host: LocalConnector) -> None:
    held = _HeldLock(aptlab.root / "var/lib/apt/lists/lock")
    try:
        with pytest.raises(linux_host.PackageManagerBusy) as busy:
            linux_host.assess(host, "apt", env=aptlab.env)
    finally:
        held.release()
    assert busy.value.transient and "Could not get lock" in busy.value.message
    assert {u.id for u in linux_host.assess(host, "apt", env=aptlab.env)} >= {"demo-web=1.1"}


def test_an_install_waits_for_the_dpkg_lock_another_process_holds(aptlab: AptLab, host: LocalConnector) -> None:
    updates = [u for u in linux_host.assess(host, "apt", env=aptlab.env) if u.id == "demo-web=1.1"]
    held = _HeldLock(aptlab.admindir / "lock-frontend")
    outcome: dict[str, object] = {}

    def install() -> None:
        try:
            outcome["result"] = linux_host.install(host, "apt", updates, env=aptlab.env)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=install, name="install-behind-lock")
    worker.start()
    try:
        # Released only once apt is seen waiting for it: an install that gave up at once would
        # already have finished.
        while worker.is_alive() and not _apt_waiting(aptlab):
            time.sleep(0.05)
    finally:
        held.release()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result = outcome["result"]
    assert isinstance(result, linux_host.InstallResult) and result.ok, result
    assert aptlab.installed_version("demo-web") == "1.1"
