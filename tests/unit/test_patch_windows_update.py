"""The Windows Update report: the JSON windows_update.ps1 prints, validated and interpreted.

No Windows runs here: the samples below are written to the shape the script builds (its
[ordered] dictionaries, serialised by ConvertTo-Json -Depth 6), and a test checks that every
key the script writes is a field of the model, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import date, datetime, timezone

import pytest
import tree_sitter as ts
import tree_sitter_powershell as tsp

from configs.policies import Classification, Severity
from tasks.patching.models import ComplianceState, Update
from tasks.patching import windows_update
from tasks.patching.windows_update import (
    WuInstall,
    WuInstalledUpdate,
    WuOs,
    WuRebootPending,
    WuReport,
    WuUpdate,
    enrollment_from_report,
    install_outcomes,
    parse_report,
)

CUMULATIVE = {
    "id": "KB5034439", "update_id": "9f3b3c1e-6a4f-4d1e-9d0e-3f0b7c2a1d55", "revision": 200,
    "title": "2026-01 Cumulative Update for Microsoft server operating system version 21H2 for x64-based Systems (KB5034439)",
    "classification": "Security Updates", "severity": "Critical", "kb_article_ids": ["5034439"],
    "size_bytes": 412345678, "release_date": "2026-01-13", "reboot_behaviour": "always", "hotpatch": False,
    "downloaded": False,
}
HOTPATCH = {
    "id": "KB5034440", "update_id": "0c8d2f4a-1b7e-4a55-8f3c-7e9d6b5a4c33", "revision": 1,
    "title": "2026-02 Security Hotpatch for Microsoft server operating system version 21H2 (KB5034440) Hotpatch",
    "classification": "Security Updates", "severity": "Important", "kb_article_ids": ["5034440"],
    "size_bytes": 1200000, "release_date": "2026-02-10", "reboot_behaviour": "never", "hotpatch": True,
    "downloaded": True,
}
DEFENDER = {
    "id": "KB2267602", "update_id": "5e2c7a9b-3d1f-4c6e-8a0b-9f4d2e1c7b66", "revision": 1,
    "title": "Security Intelligence Update for Microsoft Defender Antivirus - KB2267602 (Version 1.403.0.0)",
    "classification": "Definition Updates", "severity": "", "kb_article_ids": ["2267602"],
    "size_bytes": 5000000, "release_date": None, "reboot_behaviour": "never", "hotpatch": False, "downloaded": False,
}
ASSESS_SAMPLE = {
    "schema_version": 1, "operation": "assess", "computer": "WEB01",
    "os": {"caption": "Microsoft Windows Server 2022 Datacenter: Azure Edition", "version": "10.0.20348",
           "build": "20348.2227", "azure_edition": True, "last_boot_up_time": "2026-01-10T03:12:45.0000000Z"},
    "reboot_pending": {"component_based_servicing": False, "windows_update": False, "pending_file_rename": False},
    "updates": [CUMULATIVE, HOTPATCH, DEFENDER],
    "install": None,
    "errors": [],
}
INSTALL_SAMPLE = {
    **ASSESS_SAMPLE,
    "operation": "install",
    "reboot_pending": {"component_based_servicing": True, "windows_update": True, "pending_file_rename": False},
    "updates": [DEFENDER],
    "install": {
        "result_code": 3, "result": "SucceededWithErrors", "reboot_required": True,
        "updates": [
            {"id": "KB5034439", "result_code": 2, "result": "Succeeded", "hresult": 0},
            {"id": "KB2267602", "result_code": 4, "result": "Failed", "hresult": -2145124329},
        ],
        "not_offered": ["KB5030000"],
    },
}


def test_assess_sample_validates_and_normalises() -> None:
    report = parse_report(json.dumps(ASSESS_SAMPLE), "web01")
    cumulative, hotpatch, defender = report.missing
    assert cumulative.classification is Classification.SECURITY and cumulative.severity is Severity.CRITICAL
    assert cumulative.reboot_behaviour == "always" and cumulative.kb == "KB5034439"
    assert cumulative.release_date == date(2026, 1, 13)
    assert hotpatch.hotpatchable and hotpatch.reboot_behaviour == "never"
    assert defender.classification is Classification.DEFINITION and defender.severity is Severity.UNSPECIFIED


def test_powershell_utf8_bom_is_tolerated() -> None:
    assert parse_report("\ufeff" + json.dumps(ASSESS_SAMPLE), "web01").computer == "WEB01"


def test_enrollment_from_report() -> None:
    now = datetime(2026, 2, 1, tzinfo=timezone.utc)
    enrollment = enrollment_from_report(parse_report(json.dumps(ASSESS_SAMPLE), "web01"), "web01", now=now)
    assert enrollment.hotpatch_eligible and enrollment.package_manager == "windows-update"
    assert enrollment.reboot_detection == "windows-registry"
    assert enrollment.boot_id == "2026-01-10T03:12:45+00:00" and enrollment.build == "20348.2227"


def test_install_outcomes() -> None:
    report = parse_report(json.dumps(INSTALL_SAMPLE), "web01")
    requested = [Update(id="KB5034439"), Update(id="2267602"), Update(id="KB5030000"), Update(id="KB5999999")]
    states = {o.update_id: (o.state, o.reason) for o in install_outcomes(report, requested)}
    assert states["KB5034439"] == (ComplianceState.INSTALLED_PENDING_REBOOT, "")
    assert states["2267602"] == (ComplianceState.FAILED, "Failed (HRESULT 0x80240017)")
    assert states["KB5030000"][0] is ComplianceState.NOT_APPLICABLE
    assert states["KB5999999"] == (ComplianceState.FAILED, "not installed: missing from the agent's results")


def test_success_that_is_still_offered_is_a_failure() -> None:
    sample = copy.deepcopy(INSTALL_SAMPLE)
    sample["updates"] = [CUMULATIVE]
    sample["reboot_pending"] = {"component_based_servicing": False, "windows_update": False, "pending_file_rename": False}
    sample["install"]["reboot_required"] = False
    (outcome,) = install_outcomes(parse_report(json.dumps(sample), "web01"), [Update(id="KB5034439")])
    assert outcome.state is ComplianceState.FAILED and "still offers it" in outcome.reason


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(install=None, operation="install"), "install report carries 'install'"),
    (lambda s: s["updates"][0].update(reboot_behaviour="sometimes"), "updates.0.reboot_behaviour"),
    (lambda s: s["os"].update(last_boot_up_time="2026-01-10T03:12:45"), "os.last_boot_up_time"),
    (lambda s: s.update(extra_key=1), "extra_key"),
])
def test_bad_reports_name_host_and_field(change, message: str) -> None:  # type: ignore[no-untyped-def]
    sample = copy.deepcopy(ASSESS_SAMPLE)
    change(sample)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_report(json.dumps(sample), "web01")
    assert str(info.value).startswith("host web01: ")


def test_script_errors_and_non_json_are_reported() -> None:
    with pytest.raises(ValueError, match="host web01: Windows Update assess failed: COMException: 0x8024402C"):
        parse_report(json.dumps({**ASSESS_SAMPLE, "errors": ["COMException: 0x8024402C"]}), "web01")
    with pytest.raises(ValueError, match="did not print JSON"):
        parse_report("Access is denied.", "web01")


SCRIPT = windows_update.SCRIPT.read_text(encoding="utf-8")


def test_script_parses_without_errors() -> None:
    tree = ts.Parser(ts.Language(tsp.language())).parse(SCRIPT.encode("utf-8"))
    assert not tree.root_node.has_error


def _keys_written_by_script() -> set[str]:
    # Keys of the script's [ordered]@{ … } literals: `name = value` lines inside them.
    return set(re.findall(r"^\s+([a-z_]+)\s+=\s", SCRIPT, flags=re.MULTILINE))


def test_script_writes_exactly_the_model_fields() -> None:
    models = (WuReport, WuOs, WuRebootPending, WuUpdate, WuInstall, WuInstalledUpdate)
    fields = set().union(*(model.model_fields for model in models))
    assert _keys_written_by_script() == fields
