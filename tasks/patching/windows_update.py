"""What host_scripts/windows_update.ps1 prints, validated, and what it means for a run.

The script reports the same shape for both operations: the host's OS and boot time, the three
reboot-pending signals (CBS RebootPending, WindowsUpdate Auto Update\\RebootRequired,
PendingFileRenameOperations), the updates still missing when it finished and, for an install,
the Windows Update Agent's result per update. As on Linux, an update counts as installed only
when the agent reports success *and* a fresh search no longer offers it.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from configs.policies import Classification, Severity
from connectors.base import Connector
from tasks.patching.models import (
    ComplianceState,
    Enrollment,
    RebootBehaviour,
    Update,
    UpdateOutcome,
    normalise_kb,
)

SCRIPT = Path(__file__).with_name("host_scripts") / "windows_update.ps1"

# Windows Update Agent category names of type UpdateClassification.
_CLASSIFICATIONS = {
    "Critical Updates": Classification.CRITICAL,
    "Security Updates": Classification.SECURITY,
    "Definition Updates": Classification.DEFINITION,
    "Update Rollups": Classification.UPDATE_ROLLUP,
    "Feature Packs": Classification.FEATURE_PACK,
    "Service Packs": Classification.SERVICE_PACK,
    "Tools": Classification.TOOLS,
    "Updates": Classification.UPDATES,
}
OperationResult = Literal["NotStarted", "InProgress", "Succeeded", "SucceededWithErrors", "Failed", "Aborted"]
_SUCCESS = ("Succeeded", "SucceededWithErrors")
_SEVERITIES = {s.value for s in Severity}


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WuOs(_Report):
    caption: str
    version: str
    build: str
    azure_edition: bool
    last_boot_up_time: AwareDatetime


class WuRebootPending(_Report):
    component_based_servicing: bool
    windows_update: bool
    pending_file_rename: bool

    @property
    def any(self) -> bool:
        return self.component_based_servicing or self.windows_update or self.pending_file_rename


class WuUpdate(_Report):
    id: str = Field(min_length=1, description="'KB' + the first KB article id, or the update GUID when it has none.")
    update_id: str
    revision: int = Field(ge=0)
    title: str
    classification: str
    severity: str = Field(description="MsrcSeverity: Critical, Important, Moderate, Low or empty.")
    kb_article_ids: list[str]
    size_bytes: int = Field(ge=0)
    release_date: date | None
    reboot_behaviour: RebootBehaviour
    hotpatch: bool
    downloaded: bool

    def to_update(self) -> Update:
        return Update(
            id=self.id,
            title=self.title,
            classification=_CLASSIFICATIONS.get(self.classification, Classification.OTHER),
            severity=Severity(self.severity) if self.severity in _SEVERITIES else Severity.UNSPECIFIED,
            size_bytes=self.size_bytes,
            release_date=self.release_date,
            reboot_behaviour=self.reboot_behaviour,
            hotpatchable=self.hotpatch,
            source="WindowsUpdate",
        )


class WuInstalledUpdate(_Report):
    id: str
    result_code: int = Field(ge=0, le=5)
    result: OperationResult
    hresult: int


class WuInstall(_Report):
    result_code: int = Field(ge=0, le=5)
    result: OperationResult
    reboot_required: bool
    updates: list[WuInstalledUpdate]
    not_offered: list[str] = Field(description="Requested ids the agent no longer offers (installed meanwhile or superseded).")


class WuReport(_Report):
    schema_version: Literal[1]
    operation: Literal["assess", "install"]
    computer: str
    os: WuOs
    reboot_pending: WuRebootPending
    updates: list[WuUpdate] = Field(description="Updates missing when the script finished.")
    install: WuInstall | None
    errors: list[str]

    @model_validator(mode="after")
    def _install_matches_operation(self) -> "WuReport":
        if (self.operation == "install") != (self.install is not None):
            raise ValueError("an install report carries 'install', an assess report does not")
        return self

    @property
    def missing(self) -> list[Update]:
        return [u.to_update() for u in self.updates]


def parse_report(text: str, host: str) -> WuReport:
    """Validate the script's JSON; errors name the host and the field, never echo the document."""
    try:
        report = WuReport.model_validate(json.loads(text.lstrip("\ufeff")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"host {host}: {SCRIPT.name} did not print JSON ({exc.msg} at line {exc.lineno})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise ValueError(f"host {host}: {SCRIPT.name} printed an unexpected report: {problems}") from None
    if report.errors:
        raise ValueError(f"host {host}: Windows Update {report.operation} failed: {'; '.join(report.errors)}")
    return report


def enrollment_from_report(report: WuReport, host: str, *, now: datetime | None = None) -> Enrollment:
    return Enrollment(
        host=host,
        os_family="windows",
        os_name=report.os.caption,
        os_version=report.os.version,
        build=report.os.build,
        package_manager="windows-update",
        hotpatch_eligible=report.os.azure_edition,
        reboot_detection="windows-registry",
        boot_id=report.os.last_boot_up_time.astimezone(timezone.utc).isoformat(),
        enrolled_at=now or datetime.now(timezone.utc),
    )


def _same(update: Update, reported_id: str) -> bool:
    kb = normalise_kb(reported_id)
    return reported_id.upper() == update.id.upper() or (kb is not None and kb == update.kb)


def install_outcomes(report: WuReport, requested: list[Update]) -> list[UpdateOutcome]:
    """Each requested update's compliance state after an install report."""
    if report.install is None:
        raise ValueError(f"{report.computer}: an assess report has no install results")
    still_missing = report.missing
    pending = report.install.reboot_required or report.reboot_pending.any
    outcomes: list[UpdateOutcome] = []
    for update in requested:
        result = next((r for r in report.install.updates if _same(update, r.id)), None)
        missing = any(_same(update, m.id) for m in still_missing)
        if result is None and any(_same(update, n) for n in report.install.not_offered):
            state, reason = ComplianceState.NOT_APPLICABLE, "no longer offered by Windows Update"
        elif result is not None and result.result in _SUCCESS and not missing:
            state = ComplianceState.INSTALLED_PENDING_REBOOT if pending else ComplianceState.INSTALLED
            reason = ""
        else:
            state = ComplianceState.FAILED
            if result is None:
                reason = "not installed: missing from the agent's results"
            elif result.result in _SUCCESS:
                reason = "the agent reported success but still offers it"
            else:
                reason = f"{result.result} (HRESULT 0x{result.hresult & 0xFFFFFFFF:08X})"
        outcomes.append(UpdateOutcome(update_id=update.id, title=update.title, classification=update.classification,
                                      state=state, reason=reason))
    return outcomes


def assess(connector: Connector, *, timeout: float | None = None) -> WuReport:
    result = connector.run_script(SCRIPT, ["-Operation", "Assess"], timeout=timeout, check=True)
    return parse_report(result.stdout, connector.name)


def install(connector: Connector, updates: list[Update], *, timeout: float | None = None) -> WuReport:
    ids = ",".join(u.id for u in updates)
    result = connector.run_script(SCRIPT, ["-Operation", "Install", "-UpdateIds", ids], timeout=timeout, check=True)
    report = parse_report(result.stdout, connector.name)
    if report.operation != "install":
        raise ValueError(f"host {connector.name}: asked to install, got an {report.operation} report")
    return report


__all__ = [
    "SCRIPT", "WuInstall", "WuInstalledUpdate", "WuOs", "WuRebootPending", "WuReport", "WuUpdate", "assess",
    "enrollment_from_report", "install", "install_outcomes", "parse_report",
]
