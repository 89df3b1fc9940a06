"""The data of a patch run: policy, updates, enrollment records, compliance and history.

Every host-side source (apt, dnf/yum, zypper, the Windows Update Agent) is normalised to the
same `Update`, so selection, the calendar and the compliance report never care where an update
came from. Nothing here imports Prefect or a transport.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- quotas

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Quota:
    """A count ("3") or a share ("25%") of some population, as rollout limits are written.

    Accepts an int, a digit string or "N%" (0 < N <= 100 for shares). The share is resolved
    against the population only when a run knows it (`of`).
    """

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: object) -> "Quota":
        if isinstance(value, Quota):
            return value
        if isinstance(value, bool):
            raise ValueError(f"expected a count or a percentage such as '25%', got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a count cannot be negative, got {value}")
            return cls(count=value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls(count=int(text))
            match = _PERCENT.match(text)
            if match:
                percent = float(match.group(1))
                if not 0 < percent <= 100:
                    raise ValueError(f"a percentage must be above 0% and at most 100%, got {value!r}")
                return cls(percent=percent)
        raise ValueError(f"expected a count such as 3 or a percentage such as '25%', got {value!r}")

    def of(self, population: int, *, at_least: int = 0) -> int:
        """The absolute number for a population: shares round down (as AWS and Ansible do)."""
        if self.count is not None:
            resolved = self.count
        else:
            assert self.percent is not None
            # The epsilon keeps 3 × 33.333…% from flooring to 0.99999 when the share is exact.
            resolved = math.floor(population * self.percent / 100 + 1e-9)
        return max(at_least, resolved)

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        return f"{self.percent:g}%"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda quota: quota.count if quota.count is not None else str(quota)
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d+)?%$"}]}


# --------------------------------------------------------------------------- updates


class Classification(str, Enum):
    CRITICAL = "Critical"
    SECURITY = "Security"
    DEFINITION = "Definition"
    UPDATE_ROLLUP = "UpdateRollup"
    FEATURE_PACK = "FeaturePack"
    SERVICE_PACK = "ServicePack"
    TOOLS = "Tools"
    UPDATES = "Updates"
    OTHER = "Other"


class Severity(str, Enum):
    CRITICAL = "Critical"
    IMPORTANT = "Important"
    MODERATE = "Moderate"
    LOW = "Low"
    UNSPECIFIED = "Unspecified"


RebootBehaviour = Literal["never", "may", "always"]
PackageManager = Literal["apt", "dnf", "yum", "zypper", "windows-update"]
RebootDetection = Literal["reboot-required-file", "needs-restarting", "zypper-exit-code", "windows-registry"]

_KB = re.compile(r"^(?:KB)?(\d{6,8})$", re.IGNORECASE)


def normalise_kb(value: str) -> str | None:
    """'kb5034441' and '5034441' both name KB5034441; anything else is not a KB number."""
    match = _KB.match(value.strip())
    return f"KB{match.group(1)}" if match else None


class Update(_Frozen):
    """One missing update on one host, whatever its source."""

    id: str = Field(min_length=1, description="KB number (Windows), advisory or patch id (dnf, zypper) or package name (apt).")
    title: str = Field(default="", description="Human title, as the source gives it.")
    classification: Classification = Classification.OTHER
    severity: Severity = Severity.UNSPECIFIED
    size_bytes: int | None = Field(default=None, ge=0)
    release_date: date | None = Field(default=None, description="When the update was published (approve-after-days counts from it).")
    reboot_behaviour: RebootBehaviour = Field(default="may", description="Whether installing it needs a reboot, as far as the source knows.")
    hotpatchable: bool = Field(default=False, description="Installs without a reboot on a hotpatch-enrolled host.")
    packages: list[str] = Field(default_factory=list, description="Package names it changes (Linux); matched by the policy's package masks.")
    current_version: str | None = None
    candidate_version: str | None = None
    source: str = Field(default="", description="Where it comes from: apt origin/suite, dnf repo, zypper repo alias, 'WindowsUpdate'.")

    @property
    def kb(self) -> str | None:
        return normalise_kb(self.id)

    @property
    def is_security(self) -> bool:
        return self.classification in (Classification.SECURITY, Classification.CRITICAL)


# --------------------------------------------------------------------------- policy


class TcpProbe(_Frozen):
    kind: Literal["tcp"] = "tcp"
    port: int = Field(ge=1, le=65535)
    address: str | None = Field(default=None, description="Defaults to the host's own address.")
    timeout_seconds: float = Field(default=10.0, gt=0)


class HttpProbe(_Frozen):
    kind: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://", description="May contain {address}, replaced by the host's address.")
    expect_status: int = Field(default=200, ge=100, le=599)
    timeout_seconds: float = Field(default=10.0, gt=0)


class ServiceProbe(_Frozen):
    kind: Literal["service"] = "service"
    name: str = Field(min_length=1, description="systemd unit or Windows service name.")
    expect_state: Literal["running", "stopped"] = "running"
    timeout_seconds: float = Field(default=30.0, gt=0)


class CommandProbe(_Frozen):
    kind: Literal["command"] = "command"
    command: str = Field(min_length=1, description="Run on the host; passes when it exits with expect_exit.")
    expect_exit: int = 0
    timeout_seconds: float = Field(default=60.0, gt=0)


HealthProbe = Annotated[TcpProbe | HttpProbe | ServiceProbe | CommandProbe, Field(discriminator="kind")]

_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class PatchPolicy(_Frozen):
    """What to install, when, how fast and how to tell it worked."""

    classifications: list[Classification] = Field(
        default_factory=lambda: [Classification.CRITICAL, Classification.SECURITY],
        description="Classifications to install.",
    )
    include: list[str] = Field(
        default_factory=list,
        description="KB numbers or package-name masks (fnmatch, e.g. 'openssl*') installed whatever their classification.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="KB numbers or package-name masks never installed; wins over include.",
    )
    approve_after_days: int = Field(default=0, ge=0, description="Install an update only once it is this many days old.")
    max_duration_minutes: int = Field(default=120, gt=0, le=24 * 60, description="Stop starting installs on a host after this long.")
    reboot: Literal["IfRequired", "Never", "Always"] = Field(default="IfRequired", description="Reboot policy, decided apart from install success.")
    baseline_months: list[int] = Field(
        default_factory=lambda: [1, 4, 7, 10], description="Months (1-12) of the baseline (rebooting) cumulative updates."
    )
    unplanned_baselines: list[str] = Field(
        default_factory=list, description="'YYYY-MM' months whose hotpatch release is replaced by a baseline."
    )
    hotpatch: bool = Field(default=True, description="Use hotpatch months on hotpatch-eligible hosts "
                           "(Windows Server Azure Edition enrolled for hotpatch).")
    # The hotpatch calendar is a Windows Server Azure Edition feature: every other host gets its
    # updates monthly from its vendor, so holding them for a quarterly baseline must be a choice.
    between_baselines: Literal["all", "security", "wait"] = Field(
        default="all",
        description="What hosts that do not hotpatch (Linux, ordinary Windows, Azure Edition with hotpatch off) "
        "install in a hotpatch month: 'all' (default) every update the policy selects, as in any month; "
        "'security' only Security and Critical ones; 'wait' nothing until the next baseline month.",
    )
    max_concurrency: Quota = Field(default=1, validate_default=True, description="Hosts patched at once within an update domain: a count or 'N%' of the domain.")
    max_errors: Quota = Field(default=0, validate_default=True, description="Failures tolerated before no new batch starts: a count or 'N%' of the run's hosts.")
    pre_hooks: list[str] = Field(default_factory=list, description="Commands run on each host before installing; a failure skips the host.")
    post_hooks: list[str] = Field(default_factory=list, description="Commands run on each host after install and reboot.")
    hook_timeout_seconds: float = Field(default=300.0, gt=0)
    health_probes: list[HealthProbe] = Field(default_factory=list, description="Checks after install/reboot; a failure counts against max_errors.")
    reboot_timeout_minutes: int = Field(default=15, gt=0, description="How long a host may take to go down and come back.")
    approval_required: bool = Field(default=False, description="Pause the run for approval of the assessment before installing.")

    @field_validator("baseline_months")
    @classmethod
    def _months(cls, value: list[int]) -> list[int]:
        bad = [m for m in value if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"baseline months must be 1-12, got {bad}")
        return sorted(set(value))

    @field_validator("unplanned_baselines")
    @classmethod
    def _year_months(cls, value: list[str]) -> list[str]:
        for item in value:
            match = _YEAR_MONTH.match(item)
            if not match or not 1 <= int(match.group(2)) <= 12:
                raise ValueError(f"unplanned baseline {item!r} is not a month written 'YYYY-MM'")
        return sorted(set(value))


# --------------------------------------------------------------------------- enrollment, compliance, history


class Enrollment(_Frozen):
    """What a host is, as found when it was enrolled."""

    host: str
    os_family: Literal["linux", "windows"]
    os_name: str = Field(description="e.g. 'Debian GNU/Linux 12 (bookworm)', 'Windows Server 2022 Datacenter: Azure Edition'.")
    os_version: str = ""
    build: str = ""
    package_manager: PackageManager
    timezone: str = "UTC"
    hotpatch_eligible: bool = False
    reboot_detection: RebootDetection
    boot_id: str
    enrolled_at: AwareDatetime


class ComplianceState(str, Enum):
    INSTALLED = "Installed"
    INSTALLED_PENDING_REBOOT = "InstalledPendingReboot"
    MISSING = "Missing"
    EXCLUDED = "Excluded"
    FAILED = "Failed"
    NOT_APPLICABLE = "NotApplicable"


class UpdateOutcome(_Frozen):
    update_id: str
    title: str = ""
    classification: Classification = Classification.OTHER
    state: ComplianceState
    reason: str = Field(default="", description="Why it was excluded, held back or failed.")


MonthKind = Literal["baseline", "hotpatch"]


class HostPatchRecord(_Frozen):
    """One host in one run: written to the store's history/ and shown by `patch history`."""

    run_id: str
    host: str
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    month_kind: MonthKind
    # "rebooting" is written just before the host is told to restart and replaced once the
    # reboot gate has an answer; a record left so means the run stopped while the host rebooted.
    status: Literal["succeeded", "failed", "skipped", "unreachable", "rebooting"]
    reason: str = Field(default="", description="Why the host was skipped, failed, unreachable or left rebooting.")
    rebooted: bool = False
    boot_id_before: str | None = None
    boot_id_after: str | None = None
    updates: list[UpdateOutcome] = Field(default_factory=list)

    def count(self, state: ComplianceState) -> int:
        return sum(1 for outcome in self.updates if outcome.state is state)


__all__ = [
    "Classification", "CommandProbe", "ComplianceState", "Enrollment", "HealthProbe", "HostPatchRecord",
    "HttpProbe", "MonthKind", "PackageManager", "PatchPolicy", "Quota", "RebootBehaviour", "RebootDetection",
    "ServiceProbe", "Severity", "TcpProbe", "Update", "UpdateOutcome", "normalise_kb",
]
