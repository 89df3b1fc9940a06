"""Linux package managers: the commands patchdrill runs and parsers for what they print.

apt: two simulations. `apt-get -s dist-upgrade` gives each package's candidate (the newest
version); the same simulation with `-t '/-security$/'` raises every security suite's priority,
so it gives the newest *security* version wherever one exists. A security version that is older
than the candidate becomes its own update (`pkg=1.1`, Security) beside the candidate
(`pkg=1.2`, Other), so a security-only run installs exactly `pkg=1.1` with `--only-upgrade`
(`-t …-security upgrade` alone is not security-only: it still upgrades everything else).

dnf/yum: `updateinfo list --security` names advisories and the package builds that fix them;
`check-update` gives every candidate. Security advisories are updates of their own (installed
with `--advisories=`, which takes the minimal fixing builds); a candidate newer than every
advisory build of its package is an Other update.

zypper: patches from `zypper --xmlout list-patches`, one update each.

Everything here is text in, data out; tasks.patching.linux_host runs the commands.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date, datetime, timezone

from configs.policies import Classification, Severity
from tasks.patching.models import PackageManager, RebootBehaviour, Update

# Plain C locale and no prompts: the parsers read apt's English output.
_APT_ENV = "env LC_ALL=C DEBIAN_FRONTEND=noninteractive"
APT_SECURITY_TARGET = "/-security$/"
# An install waits this long for dpkg's lock when another client (unattended-upgrades, an
# operator) holds it. apt-get update does not wait for the lists lock whatever this says (apt
# 2.6), so a refresh that finds it busy is retried instead (tasks.patching.survey).
APT_LOCK_TIMEOUT_SECONDS = 300

# What apt, dpkg and zypper print when another process holds their lock (C locale); dnf and
# yum wait for each other by themselves.
_LOCK_BUSY = re.compile(
    r"Could not get lock|Unable to lock (?:directory|the administration directory)|"
    r"Unable to acquire the dpkg frontend lock|dpkg frontend lock was locked by another process|"
    r"System management is locked by the application"
)


def lock_busy(output: str) -> bool:
    """Whether a package manager failed only because another process held its lock."""
    return bool(_LOCK_BUSY.search(output))


class ParseError(ValueError):
    """Package-manager output that does not have the expected shape; names the tool and line."""


# --------------------------------------------------------------------------- apt


@dataclass(frozen=True)
class AptChange:
    package: str
    old_version: str | None
    new_version: str
    origins: tuple[str, ...]
    arch: str

    @property
    def security(self) -> bool:
        return any(_is_security_origin(origin) for origin in self.origins)


_APT_INST = re.compile(
    r"^Inst (?P<pkg>\S+) (?:\[(?P<old>[^\]]+)\] )?\((?P<new>\S+)(?: (?P<origins>.*?))? \[(?P<arch>[^\]]+)\]\)"
)


def _is_security_origin(origin: str) -> bool:
    # "Debian-Security:12/stable-security", "Ubuntu:22.04/jammy-security"
    label, _, suite = origin.partition("/")
    return suite.endswith("-security") or label.split(":")[0].lower().endswith("-security")


def parse_apt_simulation(text: str) -> list[AptChange]:
    """The `Inst` lines of `apt-get -s …`: `Inst pkg [old] (new Origin:Ver/Suite[, …] [arch])`."""
    changes: list[AptChange] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("Inst "):
            continue
        match = _APT_INST.match(line)
        if not match:
            raise ParseError(f"apt-get simulation line {number} is not 'Inst pkg [old] (new origin [arch])': {line!r}")
        origins = tuple(o.strip() for o in (match.group("origins") or "").split(",") if o.strip())
        changes.append(AptChange(match.group("pkg"), match.group("old"), match.group("new"), origins, match.group("arch")))
    return changes


def _apt_reboot(package: str) -> RebootBehaviour:
    # apt does not say; a new kernel image always wants one, other packages only perhaps.
    return "always" if package.startswith(("linux-image-", "linux-modules-")) else "may"


def _apt_update(change: AptChange, security: bool) -> Update:
    return Update(
        id=f"{change.package}={change.new_version}",
        title=f"{change.package} {change.old_version} → {change.new_version}",
        classification=Classification.SECURITY if security else Classification.OTHER,
        reboot_behaviour=_apt_reboot(change.package),
        packages=[change.package],
        current_version=change.old_version,
        candidate_version=change.new_version,
        source=", ".join(change.origins),
    )


def apt_updates(full_simulation: str, security_simulation: str) -> list[Update]:
    """Updates from the plain and the security-preferring simulations (see the module doc)."""
    candidates = {c.package: c for c in parse_apt_simulation(full_simulation) if c.old_version is not None}
    preferred = {c.package: c for c in parse_apt_simulation(security_simulation) if c.old_version is not None}
    updates: list[Update] = []
    for package in sorted(candidates.keys() | preferred.keys()):
        candidate, secure = candidates.get(package), preferred.get(package)
        if secure is not None and secure.security and (candidate is None or secure.new_version != candidate.new_version):
            updates.append(_apt_update(secure, security=True))
        if candidate is not None:
            updates.append(_apt_update(candidate, security=candidate.security))
    return updates


def apt_assess_commands(*, refresh: bool) -> list[str]:
    # A simulation as root still writes the plan it simulated to /var/log/apt/eipp.log.xz:
    # sent to /dev/null (which apt special-cases), an assessment leaves the host as it was.
    simulate = f"{_APT_ENV} apt-get -s -q -o Debug::NoLocking=1 -o Dir::Log::Planner=/dev/null dist-upgrade"
    commands = [f"{_APT_ENV} apt-get -q update"] if refresh else []
    return commands + [simulate, f"{simulate} -t {shlex.quote(APT_SECURITY_TARGET)}"]


# host_scripts/linux_assess.sh frames each step's output with lines starting with this.
ASSESSMENT_MARKER = "@@patchdrill-assess@@"


def apt_assess_script_args(*, refresh: bool) -> list[str]:
    """Arguments of host_scripts/linux_assess.sh: the commands above, in its order."""
    *update, simulate, secure = apt_assess_commands(refresh=refresh)
    suites = APT_SECURITY_TARGET.strip("/")
    return [ASSESSMENT_MARKER, update[0] if update else "", simulate, secure, suites, reboot_check_command("apt")]


@dataclass(frozen=True)
class AssessmentStep:
    """One step of linux_assess.sh: what the command printed and how it exited."""

    name: str
    exit_code: int
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class AssessmentOutput:
    """linux_assess.sh's output: the facts JSON printed before it, then its framed steps."""

    facts: str
    steps: dict[str, AssessmentStep]
    exit_code: int

    @property
    def failed(self) -> AssessmentStep | None:
        return next((s for s in self.steps.values() if s.exit_code != 0 and s.name != "reboot"), None)

    def step(self, name: str) -> AssessmentStep:
        try:
            return self.steps[name]
        except KeyError:
            raise ParseError(f"linux_assess.sh printed no {name!r} step") from None

    def security_simulation(self) -> str:
        """The security-preferring simulation; the plain one where the script showed it would
        print the same (no security version besides the candidates)."""
        return self.step("simulation" if "security.same" in self.steps else "security").stdout


def parse_assessment_sections(text: str) -> AssessmentOutput:
    """Split linux_assess.sh's output at its frame lines (`MARKER name exit_code`)."""
    chunks: list[tuple[str, int, list[str]]] = [("facts", 0, [])]
    for line in text.split("\n"):
        if line.startswith(ASSESSMENT_MARKER + " "):
            fields = line.split()
            if len(fields) != 3 or not fields[2].lstrip("-").isdigit():
                raise ParseError(f"linux_assess.sh frame line is not 'marker name exit_code': {line!r}")
            chunks.append((fields[1], int(fields[2]), []))
        else:
            chunks[-1][2].append(line)
    if chunks[-1][0] != "end":
        raise ParseError("linux_assess.sh output ended before its 'end' frame: the script did not finish")

    def body(lines: list[str]) -> str:
        # The script writes a newline before each frame line: the line split has already taken
        # it, so joining gives back exactly what the command printed.
        return "\n".join(lines)

    steps: dict[str, AssessmentStep] = {}
    for name, code, lines in chunks[1:-1]:
        step, _, stream = name.partition(".")
        if stream in ("stdout", "stderr"):
            known = steps.get(step, AssessmentStep(step, code))
            steps[step] = AssessmentStep(step, code, *((body(lines), known.stderr) if stream == "stdout"
                                                       else (known.stdout, body(lines))))
        else:
            steps[name] = AssessmentStep(name, code)
    return AssessmentOutput(facts=body(chunks[0][2]), steps=steps, exit_code=chunks[-1][1])


def apt_install_command(updates: list[Update]) -> str:
    """`apt-get install --only-upgrade pkg=version …`: exact versions, never a new package."""
    chosen: dict[str, Update] = {}
    for update in updates:
        package = _single_package(update)
        # Two selected versions of one package: the non-security one is the newer candidate
        # (a security version is listed apart only when it is older than the candidate).
        if package not in chosen or not update.is_security:
            chosen[package] = update
    specs = [f"{package}={update.candidate_version}" for package, update in sorted(chosen.items())]
    return (f"{_APT_ENV} apt-get install -y -q --only-upgrade -o DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_SECONDS} "
            f"-o Dpkg::Options::=--force-confold "
            f"-o Dpkg::Options::=--force-confdef {' '.join(shlex.quote(s) for s in specs)}")


def dpkg_state_command(packages: list[str]) -> str:
    """What dpkg holds for each package: a failed maintainer script leaves a newer version
    unpacked but not configured, which no simulation lists as missing any more."""
    names = " ".join(shlex.quote(p) for p in sorted(set(packages)))
    return f"dpkg-query -W -f='${{Package}}\\t${{Version}}\\t${{db:Status-Abbrev}}\\n' {names}"


def parse_dpkg_states(text: str) -> dict[str, tuple[str, bool]]:
    """package → (version, fully installed): dpkg's status abbreviation 'ii' means configured."""
    states: dict[str, tuple[str, bool]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0]:
            states[fields[0]] = (fields[1], fields[2].strip() == "ii")
    return states


def _single_package(update: Update) -> str:
    if len(update.packages) != 1 or not update.candidate_version:
        raise ValueError(f"update {update.id!r} is not a single package with a candidate version")
    return update.packages[0]


# --------------------------------------------------------------------------- dnf / yum


@dataclass(frozen=True)
class Nevra:
    name: str
    evr: str  # [epoch:]version-release, as dnf prints it
    arch: str

    @property
    def spec(self) -> str:
        return f"{self.name}-{self.evr}.{self.arch}"


def parse_nevra(text: str) -> Nevra:
    """'openssl-libs-1:3.5.9-1.fc44.x86_64' → name, epoch:version-release, arch."""
    stem, dot, arch = text.rpartition(".")
    name_version, dash1, release = stem.rpartition("-")
    name, dash2, version = name_version.rpartition("-")
    if not (dot and dash1 and dash2 and name and version and release and arch):
        raise ParseError(f"{text!r} is not a package build written name-[epoch:]version-release.arch")
    return Nevra(name, f"{version}-{release}", arch)


@dataclass(frozen=True)
class Advisory:
    id: str
    kind: str  # "security", "bugfix", "enhancement", …
    severity: Severity
    package: Nevra
    issued: date | None


_SEVERITIES = {s.value.lower(): s for s in Severity}
_DNF_METADATA_NOISE = ("Last metadata expiration check", "Updating and loading repositories", "Repositories loaded",
                       "Loaded plugins", "Loading ", "Obsoleting Packages", "Security:", "Name ")


def _severity(text: str) -> Severity:
    return _SEVERITIES.get(text.strip().lower(), Severity.UNSPECIFIED)


def parse_dnf_updateinfo(text: str) -> list[Advisory]:
    """`dnf updateinfo list --security` (dnf4/yum: `ID Severity/Sec. NEVRA`;
    dnf5: `ID security Severity NEVRA Issued-date time`)."""
    advisories: list[Advisory] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or line.startswith(_DNF_METADATA_NOISE):
            continue
        if len(fields) == 3:  # dnf4 / yum
            advisory_id, kind_field, package = fields
            severity_text, _, kind = kind_field.rpartition("/")
            if kind == "Sec.":
                kind, severity = "security", _severity(severity_text)
            else:  # "bugfix", "enhancement": no severity column
                kind, severity = kind_field, Severity.UNSPECIFIED
            advisories.append(Advisory(advisory_id, kind, severity, parse_nevra(package), None))
        elif len(fields) in (5, 6):  # dnf5: the issued column is "YYYY-MM-DD HH:MM:SS"
            advisory_id, kind, severity_text, package, issued = fields[:5]
            try:
                issued_on = date.fromisoformat(issued)
            except ValueError:
                raise ParseError(f"dnf updateinfo line {number}: issued date {issued!r} is not YYYY-MM-DD") from None
            advisories.append(Advisory(advisory_id, kind, _severity(severity_text), parse_nevra(package), issued_on))
        else:
            raise ParseError(f"dnf updateinfo line {number} has an unknown shape: {line!r}")
    return advisories


def parse_dnf_check_update(text: str) -> list[Nevra]:
    """`dnf check-update` (exit 100 when there are updates): `name.arch  [epoch:]version-release  repo`."""
    packages: list[Nevra] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("Obsoleting Packages"):
            break  # what follows are obsoleted pairs, not updates
        fields = line.split()
        if not fields or line.startswith(_DNF_METADATA_NOISE) or line.startswith(" "):
            continue
        if len(fields) != 3 or "." not in fields[0]:
            raise ParseError(f"dnf check-update line {number} is not 'name.arch version repo': {line!r}")
        name, _, arch = fields[0].rpartition(".")
        packages.append(Nevra(name, fields[1], arch))
    return packages


def dnf_updates(check_update: str, security_updateinfo: str) -> list[Update]:
    candidates = parse_dnf_check_update(check_update)
    advisories = [a for a in parse_dnf_updateinfo(security_updateinfo) if a.kind == "security"]
    by_id: dict[str, list[Advisory]] = {}
    for advisory in advisories:
        by_id.setdefault(advisory.id, []).append(advisory)
    updates: list[Update] = []
    for advisory_id, items in by_id.items():
        names = sorted({a.package.name for a in items})
        updates.append(Update(
            id=advisory_id,
            title=f"{advisory_id}: {', '.join(a.package.spec for a in items)}",
            classification=Classification.SECURITY,
            # Severity lists the most severe first and Unspecified last.
            severity=min((a.severity for a in items), key=list(Severity).index),
            release_date=items[0].issued,
            reboot_behaviour="always" if any(n == "kernel" or n.startswith("kernel-") for n in names) else "may",
            packages=names,
            source="updateinfo",
        ))
    fixed_builds = {(a.package.name, a.package.arch, a.package.evr) for a in advisories}
    for package in candidates:
        if (package.name, package.arch, package.evr) in fixed_builds:
            continue  # the advisory above installs exactly this build
        updates.append(Update(
            id=package.spec,
            title=f"{package.name}.{package.arch} → {package.evr}",
            classification=Classification.OTHER,
            reboot_behaviour="always" if package.name == "kernel" or package.name.startswith("kernel-") else "may",
            packages=[package.name],
            candidate_version=package.evr,
            source="check-update",
        ))
    return updates


def dnf_assess_commands(tool: str, *, refresh: bool) -> list[str]:
    refresh_flag = " --refresh" if refresh else ""
    # check-update exits 100 when updates exist; `|| test $? -eq 100` keeps that a success.
    return [
        f"LC_ALL=C {tool} -q{refresh_flag} check-update || test $? -eq 100",
        f"LC_ALL=C {tool} -q updateinfo list --security",
    ]


def dnf_install_commands(tool: str, updates: list[Update]) -> list[str]:
    advisories = [u.id for u in updates if u.source == "updateinfo"]
    builds = [u.id for u in updates if u.source != "updateinfo"]
    commands = []
    if advisories:
        commands.append(f"LC_ALL=C {tool} -y upgrade --advisories={shlex.quote(','.join(advisories))}")
    if builds:
        commands.append(f"LC_ALL=C {tool} -y upgrade {' '.join(shlex.quote(b) for b in builds)}")
    return commands


# --------------------------------------------------------------------------- zypper

_ZYPPER_CLASSES = {
    "security": Classification.SECURITY,
    "recommended": Classification.UPDATES,
    "feature": Classification.FEATURE_PACK,
    "optional": Classification.OTHER,
    "document": Classification.OTHER,
}
# zypper's exit codes (zypper(8)): 100/101 patches available, 102 reboot needed,
# 103 zypper itself was updated and must run again.
ZYPPER_REBOOT_NEEDED = 102
ZYPPER_RESTART_NEEDED = 103


def parse_zypper_patches(xml_text: str) -> list[Update]:
    """`zypper --xmlout list-patches`: `<update kind="patch" name=… category=… severity=… restart=…>`."""
    try:
        root = ET.fromstring(xml_text.strip())
    except ET.ParseError as exc:
        raise ParseError(f"zypper list-patches XML does not parse: {exc}") from None
    updates: list[Update] = []
    for node in root.iter("update"):
        if node.get("kind") != "patch" or node.get("status", "needed") not in ("needed", ""):
            continue
        name = node.get("name")
        if not name:
            raise ParseError("zypper list-patches: an <update kind='patch'> has no name")
        issued = node.find("issue-date")
        release = None
        if issued is not None and (issued.get("time") or "").isdigit():
            release = datetime.fromtimestamp(int(issued.get("time", "0")), tz=timezone.utc).date()
        source = node.find("source")
        updates.append(Update(
            id=name,
            title=(node.findtext("summary") or "").strip() or name,
            classification=_ZYPPER_CLASSES.get(node.get("category", ""), Classification.OTHER),
            severity=_severity(node.get("severity", "")),
            release_date=release,
            reboot_behaviour="always" if node.get("restart") == "true" else "never",
            source=source.get("alias", "") if source is not None else "",
        ))
    return updates


def zypper_assess_commands(*, refresh: bool) -> list[str]:
    commands = ["zypper --non-interactive refresh"] if refresh else []
    # list-patches exits 100/101 when patches are needed, which is not a failure here.
    return commands + ["zypper --non-interactive --xmlout list-patches || test $? -eq 100 -o $? -eq 101"]


def zypper_install_command(updates: list[Update]) -> str:
    names = " ".join(shlex.quote(u.id) for u in updates)
    return f"zypper --non-interactive install --auto-agree-with-licenses -t patch {names}"


# --------------------------------------------------------------------------- reboot detection

REBOOT_CHECKS: dict[str, str] = {
    # DPKG_ROOT is dpkg's own name for the root it installs into; unset on a normal host.
    "apt": 'test -e "${DPKG_ROOT:-}/run/reboot-required"',
    "dnf": "dnf -q needs-restarting -r",
    "yum": "needs-restarting -r",
    "zypper": "zypper --non-interactive needs-rebooting",
}


def reboot_check_command(manager: PackageManager) -> str:
    try:
        return REBOOT_CHECKS[manager]
    except KeyError:
        raise ValueError(f"no Linux reboot check for package manager {manager!r}") from None


def reboot_required(manager: PackageManager, exit_code: int) -> bool:
    """Read the check's exit code: each tool says 'reboot needed' its own way."""
    if manager == "apt":
        return exit_code == 0  # the file exists
    if manager in ("dnf", "yum"):
        if exit_code not in (0, 1):
            raise ValueError(f"needs-restarting -r exited {exit_code}: is dnf-utils/yum-utils installed?")
        return exit_code == 1
    if manager == "zypper":
        if exit_code not in (0, ZYPPER_REBOOT_NEEDED):
            raise ValueError(f"zypper needs-rebooting exited {exit_code}")
        return exit_code == ZYPPER_REBOOT_NEEDED
    raise ValueError(f"no Linux reboot check for package manager {manager!r}")


__all__ = [
    "APT_SECURITY_TARGET", "ASSESSMENT_MARKER", "AssessmentOutput", "AssessmentStep", "apt_assess_script_args",
    "parse_assessment_sections", "Advisory", "AptChange", "Nevra", "ParseError", "REBOOT_CHECKS", "ZYPPER_REBOOT_NEEDED",
    "ZYPPER_RESTART_NEEDED", "apt_assess_commands", "apt_install_command", "apt_updates", "dnf_assess_commands",
    "dnf_install_commands", "dnf_updates", "dpkg_state_command", "parse_dpkg_states", "parse_apt_simulation", "parse_dnf_check_update", "parse_dnf_updateinfo",
    "parse_nevra", "parse_zypper_patches", "reboot_check_command", "reboot_required", "zypper_assess_commands",
    "zypper_install_command",
]
