"""The data of a patch run: updates, enrollment records, compliance and history.

Every host-side source (apt, dnf/yum, zypper, the Windows Update Agent) is normalised to the
same `Update`, so selection, the calendar and the compliance report never care where an update
came from. Nothing here imports Prefect or a transport; the policy is `configs.policies.PatchPolicy`.
"""

from __future__ import annotations

import re
from datetime import date
from enum import Enum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from configs.policies import Classification, Severity
from tasks.patching.safety.records import RecoveryRecord
from tasks.patching.safety.records import ClockReading, NoticeAnswer, Unavailability


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- updates


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
    recovery: RecoveryRecord | None = Field(
        default=None, description="The recovery points that let the host be patched, and any rollback (policies "
                                  "with a recovery_point gate).")
    unavailability: Unavailability | None = Field(default=None, description="Measured while it was patched; none when it was not.")
    clock: ClockReading | None = Field(default=None, description="Its clock after the install, when the policy checks it.")
    notices: list[NoticeAnswer] = Field(default_factory=list, description="What the policy's notice hook answered.")

    def count(self, state: ComplianceState) -> int:
        return sum(1 for outcome in self.updates if outcome.state is state)


__all__ = [
    "ComplianceState", "Enrollment", "HostPatchRecord", "MonthKind", "PackageManager", "RebootBehaviour",
    "RebootDetection", "Update", "UpdateOutcome", "normalise_kb",
]
