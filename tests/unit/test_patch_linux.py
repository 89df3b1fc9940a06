"""Parsers and command builders for apt, dnf/yum and zypper.

The apt samples are real `apt-get -s` output captured from tests/hosts/aptlab.py (the
integration tests run apt itself). No dnf or zypper runs on this Debian machine: their samples
follow the formats those tools print — dnf4's `ID Severity/Sec. NEVRA` and dnf5's five-column
advisory list, and the attributes zypper's src/update.cc writes for `--xmlout list-patches`.
"""

from __future__ import annotations

from datetime import date

import pytest

from configs.policies import Classification, Severity
from tasks.patching import linux
from tasks.patching.models import Update

# Captured from the aptlab sandbox (apt 2.6.2).
APT_FULL = """\
Reading package lists...
Building dependency tree...
Calculating upgrade...
The following packages will be upgraded:
  demo-db demo-kernel demo-tools demo-web
4 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.
Inst demo-db [1.0] (1.2 Debian:12/stable [all])
Inst demo-kernel [1.0] (1.1 Debian-Security:12/stable-security [all])
Inst demo-tools [1.0] (1.1 Debian:12/stable [all])
Inst demo-web [1.0] (1.2 Debian:12/stable [all])
Conf demo-db (1.2 Debian:12/stable [all])
Conf demo-kernel (1.1 Debian-Security:12/stable-security [all])
Conf demo-tools (1.1 Debian:12/stable [all])
Conf demo-web (1.2 Debian:12/stable [all])
"""
APT_SECURITY_PREFERRED = APT_FULL.replace(
    "Inst demo-web [1.0] (1.2 Debian:12/stable [all])",
    "Inst demo-web [1.0] (1.1 Debian-Security:12/stable-security [all])",
)


def test_apt_inst_lines() -> None:
    changes = linux.parse_apt_simulation(APT_FULL)
    assert [(c.package, c.old_version, c.new_version, c.security) for c in changes] == [
        ("demo-db", "1.0", "1.2", False), ("demo-kernel", "1.0", "1.1", True),
        ("demo-tools", "1.0", "1.1", False), ("demo-web", "1.0", "1.2", False),
    ]


def test_apt_line_with_several_origins_and_a_new_package() -> None:
    # Shapes apt prints when one version sits in two suites, and for a new dependency.
    text = ("Inst libc6 [2.36-9+deb12u3] (2.36-9+deb12u4 Debian:12.5/stable, Debian-Security:12/stable-security [amd64]) []\n"
            "Inst openssl [3.0.2-0ubuntu1.10] (3.0.2-0ubuntu1.12 Ubuntu:22.04/jammy-updates, Ubuntu:22.04/jammy-security [amd64])\n"
            "Inst linux-image-6.1.0-18-amd64 (6.1.76-1 Debian:12.5/stable [amd64])\n")
    libc, ssl, kernel = linux.parse_apt_simulation(text)
    assert libc.origins == ("Debian:12.5/stable", "Debian-Security:12/stable-security") and libc.security
    assert ssl.security and ssl.arch == "amd64"
    assert kernel.old_version is None and not kernel.security


def test_apt_security_fix_superseded_by_a_regular_release_is_its_own_update() -> None:
    updates = {u.id: u for u in linux.apt_updates(APT_FULL, APT_SECURITY_PREFERRED)}
    assert set(updates) == {"demo-db=1.2", "demo-kernel=1.1", "demo-tools=1.1", "demo-web=1.1", "demo-web=1.2"}
    assert updates["demo-web=1.1"].classification is Classification.SECURITY
    assert updates["demo-web=1.2"].classification is Classification.OTHER
    assert updates["demo-kernel=1.1"].classification is Classification.SECURITY
    assert updates["demo-web=1.1"].packages == ["demo-web"] and updates["demo-web=1.1"].current_version == "1.0"


def test_apt_bad_inst_line_names_the_line() -> None:
    with pytest.raises(linux.ParseError, match="line 2"):
        linux.parse_apt_simulation("Reading package lists...\nInst broken-line\n")


def test_apt_install_command_pins_exact_versions_and_prefers_the_newer_of_two() -> None:
    updates = linux.apt_updates(APT_FULL, APT_SECURITY_PREFERRED)
    security = [u for u in updates if u.is_security]
    command = linux.apt_install_command(security)
    assert "--only-upgrade" in command and command.endswith("demo-kernel=1.1 demo-web=1.1")
    assert linux.apt_install_command(updates).endswith("demo-db=1.2 demo-kernel=1.1 demo-tools=1.1 demo-web=1.2")
    with pytest.raises(ValueError, match="'KB1234567' is not a single package"):
        linux.apt_install_command([Update(id="KB1234567")])


def test_apt_package_names_are_shell_quoted() -> None:
    hostile = Update(id="x", packages=["x;rm -rf /"], candidate_version="1")
    assert "'x;rm -rf /=1'" in linux.apt_install_command([hostile])


DNF4_SECURITY = """\
Last metadata expiration check: 0:12:03 ago on Mon 06 Oct 2025 10:01:22 AM UTC.
RLSA-2025:23343 Moderate/Sec.  binutils-2.35.2-67.el9_7.1.x86_64
RLSA-2025:23343 Moderate/Sec.  binutils-gold-2.35.2-67.el9_7.1.x86_64
RLSA-2025:0925  Important/Sec. kernel-5.14.0-503.15.1.el9_5.x86_64
RLSA-2025:0926  Low/Sec.       openssl-libs-1:3.0.7-27.el9.x86_64
"""
DNF5_SECURITY = """\
Name                   Type     Severity                             Package              Issued
FEDORA-2026-12f3f3d569 security Important openssl-libs-1:3.5.9-1.fc44.x86_64 2026-10-03 01:09:41
FEDORA-2026-72d10c874d security Moderate      libevent-2.1.13-1.fc44.x86_64 2026-09-09 04:47:08
"""
DNF_CHECK_UPDATE = """\
Last metadata expiration check: 0:12:03 ago on Mon 06 Oct 2025 10:01:22 AM UTC.

binutils.x86_64                      2.35.2-67.el9_7.1               baseos
binutils-gold.x86_64                 2.35.2-67.el9_7.1               baseos
kernel.x86_64                        5.14.0-503.16.1.el9_5           baseos
openssl-libs.x86_64                  1:3.0.7-27.el9                  baseos
tzdata.noarch                        2025b-1.el9                     baseos
Obsoleting Packages
grub2-tools.x86_64                   1:2.06-92.el9                   baseos
    grub2-tools.x86_64               1:2.06-80.el9                   @anaconda
"""


def test_nevra() -> None:
    assert linux.parse_nevra("openssl-libs-1:3.5.9-1.fc44.x86_64") == linux.Nevra("openssl-libs", "1:3.5.9-1.fc44", "x86_64")
    with pytest.raises(linux.ParseError, match="'kernel' is not a package build"):
        linux.parse_nevra("kernel")


def test_dnf4_and_dnf5_advisory_lists() -> None:
    dnf4 = linux.parse_dnf_updateinfo(DNF4_SECURITY)
    assert [(a.id, a.severity, a.package.name) for a in dnf4] == [
        ("RLSA-2025:23343", Severity.MODERATE, "binutils"), ("RLSA-2025:23343", Severity.MODERATE, "binutils-gold"),
        ("RLSA-2025:0925", Severity.IMPORTANT, "kernel"), ("RLSA-2025:0926", Severity.LOW, "openssl-libs"),
    ]
    dnf5 = linux.parse_dnf_updateinfo(DNF5_SECURITY)
    assert [(a.id, a.kind, a.severity, a.issued) for a in dnf5] == [
        ("FEDORA-2026-12f3f3d569", "security", Severity.IMPORTANT, date(2026, 10, 3)),
        ("FEDORA-2026-72d10c874d", "security", Severity.MODERATE, date(2026, 9, 9)),
    ]


def test_dnf_updates_join_advisories_and_candidates() -> None:
    updates = {u.id: u for u in linux.dnf_updates(DNF_CHECK_UPDATE, DNF4_SECURITY)}
    assert set(updates) == {
        "RLSA-2025:23343", "RLSA-2025:0925", "RLSA-2025:0926",
        "kernel-5.14.0-503.16.1.el9_5.x86_64",  # newer than the advisory's kernel build
        "tzdata-2025b-1.el9.noarch",
    }
    assert updates["RLSA-2025:23343"].packages == ["binutils", "binutils-gold"]
    assert updates["RLSA-2025:0925"].reboot_behaviour == "always"
    assert updates["tzdata-2025b-1.el9.noarch"].classification is Classification.OTHER
    commands = linux.dnf_install_commands("dnf", list(updates.values()))
    assert commands[0] == "LC_ALL=C dnf -y upgrade --advisories=RLSA-2025:23343,RLSA-2025:0925,RLSA-2025:0926"
    assert commands[1] == "LC_ALL=C dnf -y upgrade kernel-5.14.0-503.16.1.el9_5.x86_64 tzdata-2025b-1.el9.noarch"


def test_dnf_unknown_line_shape_is_an_error() -> None:
    with pytest.raises(linux.ParseError, match="dnf check-update line 1"):
        linux.parse_dnf_check_update("this is not a package line at all\n")


ZYPPER_PATCHES = """<?xml version='1.0'?>
<stream>
<message type="info">Loading repository data...</message>
<message type="info">Reading installed packages...</message>
<update-status version="0.6">
<update-list>
<update kind="patch" name="openSUSE-SLE-15.6-2025-1234" edition="1" arch="noarch" status="needed" category="security" severity="important" pkgmanager="false" restart="true" interactive="false"><summary>Security update for the Linux Kernel</summary><description>The kernel was updated.</description><license/><source url="http://download.opensuse.org/update/leap/15.6/sle/" alias="repo-sle-update"/><issue-date time="1735776000" text="2025-01-02"/><issue-list><issue type="cve" id="CVE-2024-1234"><title>CVE-2024-1234</title></issue></issue-list></update>
<update kind="patch" name="openSUSE-2025-99" edition="1" arch="noarch" status="needed" category="recommended" severity="moderate" pkgmanager="false" restart="false" interactive="false"><summary>Recommended update for tzdata</summary><description/><license/><source url="http://download.opensuse.org/update/leap/15.6/oss/" alias="repo-update"/><issue-date time="1735862400" text="2025-01-03"/></update>
<update kind="patch" name="openSUSE-2024-7" edition="1" arch="noarch" status="applied" category="security" severity="low" pkgmanager="false" restart="false" interactive="false"><summary>already applied</summary></update>
</update-list>
</update-status>
</stream>
"""


def test_zypper_patches() -> None:
    kernel, tzdata = linux.parse_zypper_patches(ZYPPER_PATCHES)
    assert kernel.id == "openSUSE-SLE-15.6-2025-1234" and kernel.classification is Classification.SECURITY
    assert kernel.severity is Severity.IMPORTANT and kernel.reboot_behaviour == "always"
    assert kernel.release_date == date(2025, 1, 2) and kernel.source == "repo-sle-update"
    assert tzdata.classification is Classification.UPDATES and tzdata.reboot_behaviour == "never"
    assert linux.zypper_install_command([kernel]).endswith("-t patch openSUSE-SLE-15.6-2025-1234")


def test_zypper_garbage_is_a_parse_error() -> None:
    with pytest.raises(linux.ParseError, match="zypper list-patches XML"):
        linux.parse_zypper_patches("Loading repository data...\nnot xml")


@pytest.mark.parametrize(("manager", "exit_code", "expected"), [
    ("apt", 0, True), ("apt", 1, False), ("dnf", 1, True), ("dnf", 0, False), ("yum", 1, True),
    ("zypper", 102, True), ("zypper", 0, False),
])
def test_reboot_required_by_exit_code(manager: str, exit_code: int, expected: bool) -> None:
    assert linux.reboot_required(manager, exit_code) is expected  # type: ignore[arg-type]


def test_reboot_check_fails_loudly_when_the_tool_is_missing() -> None:
    with pytest.raises(ValueError, match="needs-restarting -r exited 127"):
        linux.reboot_required("dnf", 127)
    with pytest.raises(ValueError, match="windows-update"):
        linux.reboot_check_command("windows-update")


def test_dpkg_states_tell_configured_from_half_installed() -> None:
    # dpkg-query prints the abbreviation with a trailing space for the error flag column.
    states = linux.parse_dpkg_states("demo-web\t1.1\tii \ndemo-broken\t1.1\tiF \n")
    assert states == {"demo-web": ("1.1", True), "demo-broken": ("1.1", False)}
    assert linux.dpkg_state_command(["b", "a", "b"]).endswith(" a b")


def _framed(*frames: tuple[str, int, str]) -> str:
    marker = linux.ASSESSMENT_MARKER
    return '{"os_id": "debian"}\n' + "".join(f"\n{marker} {name} {code}\n{body}" for name, code, body in frames)


def test_assessment_frames_give_back_each_steps_output_exactly() -> None:
    text = _framed(("simulation.stdout", 0, "Inst a [1] (2 D:1/s [all])\n"), ("simulation.stderr", 0, "W: no newline"),
                   ("security.same", 0, ""), ("reboot", 1, ""), ("end", 0, ""))
    output = linux.parse_assessment_sections(text)
    assert output.facts == '{"os_id": "debian"}\n'
    assert output.steps["simulation"] == linux.AssessmentStep("simulation", 0, "Inst a [1] (2 D:1/s [all])\n",
                                                               "W: no newline")
    assert output.security_simulation() == output.steps["simulation"].stdout
    assert output.steps["reboot"].exit_code == 1 and output.failed is None


def test_a_failed_assessment_step_is_named() -> None:
    output = linux.parse_assessment_sections(_framed(("refresh.stdout", 100, ""), ("refresh.stderr", 100, "E: no lists"),
                                                     ("end", 100, "")))
    assert output.failed == linux.AssessmentStep("refresh", 100, "", "E: no lists")


def test_an_assessment_cut_short_is_a_parse_error() -> None:
    with pytest.raises(linux.ParseError, match="did not finish"):
        linux.parse_assessment_sections(_framed(("simulation.stdout", 0, "Inst a [1] (2 D:1/s [all])\n")))


def test_assessment_script_arguments_carry_the_commands() -> None:
    marker, refresh, simulate, secure, suites, reboot = linux.apt_assess_script_args(refresh=True)
    assert marker == linux.ASSESSMENT_MARKER and [refresh, simulate, secure] == linux.apt_assess_commands(refresh=True)
    assert suites == "-security$" and reboot == linux.reboot_check_command("apt")
    assert linux.apt_assess_script_args(refresh=False)[1] == ""
