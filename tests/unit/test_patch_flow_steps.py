"""The patch run's decisions that need no host: reboot gate policy, policy choice, planning a
host against its window and the calendar, history records in a real local store, reports."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from configs.loader import load_config
from configs.models import HostConfig, LocalStorage
from configs.policies import Classification, PatchPolicy
from configs.secrets import remember
from connectors.stores import LocalBlobStore
from tasks.patching import history, report, survey
from tasks.patching.fleet import RecordStore, RunSetupError, resolve_policy
from tasks.patching.models import ComplianceState, Enrollment, HostPatchRecord, Update, UpdateOutcome
from tasks.patching.plan.host import HostAssessment, plan_host
from tasks.patching.plan.report import compliance_rows, summary_markdown
from tasks.patching.reboot_gate import decide

NOW = datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc)  # a Wednesday in a hotpatch month (default policy)


@pytest.mark.parametrize(
    ("policy", "pending", "calendar", "window", "reboot", "deferred"),
    [
        ("IfRequired", True, True, True, True, False),
        ("IfRequired", False, True, True, False, False),
        ("Always", False, True, True, True, False),
        ("Never", True, True, True, False, True),
        ("IfRequired", True, False, True, False, True),  # hotpatch month on a hotpatching host
        ("Always", False, False, True, False, False),
        ("IfRequired", True, True, False, False, True),  # outside the window without the flag
        ("Always", False, True, False, False, True),
    ],
)
def test_reboot_decision(policy: str, pending: bool, calendar: bool, window: bool, reboot: bool, deferred: bool) -> None:
    decision = decide(policy, pending=pending, calendar_allows=calendar, window_allows=window)  # type: ignore[arg-type]
    assert (decision.reboot, decision.deferred) == (reboot, deferred), decision.reason


def _config(tmp_path: Path, policies: dict[str, object]) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"},
                                    "hosts": [{"name": "h1", "transport": "local", "groups": ["web"]}],
                                    "patch_policies": policies}))
    return path


def test_policy_is_chosen_by_name_then_group_then_default(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path, {"web": {"max_errors": 2}, "default": {"max_errors": 5}}))
    assert resolve_policy(loaded, None, ["web"])[0] == "web"
    assert resolve_policy(loaded, None, ["db"]) == ("default", PatchPolicy(max_errors=5))
    assert resolve_policy(loaded, "web", None)[1].max_errors.count == 2
    empty = load_config(_config(tmp_path, {}))
    assert resolve_policy(empty, None, None) == ("built-in defaults", PatchPolicy())


def test_an_unknown_policy_name_names_the_file_and_the_known_ones(tmp_path: Path) -> None:
    path = _config(tmp_path, {"web": {}})
    with pytest.raises(RunSetupError, match=r"fleet\.yaml: patch_policies: no policy named 'weekly' \(defined: web\)"):
        resolve_policy(load_config(path), "weekly", None)


def _host(**overrides: object) -> HostConfig:
    fields: dict[str, object] = {"name": "h1", "transport": "local", "timezone": "Asia/Tokyo", "update_domain": 2}
    return HostConfig.model_validate({**fields, **overrides})


def _enrollment(hotpatch: bool = False) -> Enrollment:
    return Enrollment(host="h1", os_family="windows", os_name="Windows Server 2022", package_manager="windows-update",
                      hotpatch_eligible=hotpatch, reboot_detection="windows-registry", boot_id="b1", enrolled_at=NOW)


UPDATES = [
    Update(id="KB5000001", classification=Classification.SECURITY, hotpatchable=True, reboot_behaviour="never"),
    Update(id="KB5000002", classification=Classification.SECURITY, reboot_behaviour="always"),
    Update(id="KB5000003", classification=Classification.UPDATES),
]


def test_plan_in_a_hotpatch_month_selects_hotpatches_and_expects_no_reboot() -> None:
    window = [{"days": ["wed"], "start": "20:00", "duration_minutes": 120}]  # 20:00-22:00 Tokyo = 11:00-13:00 UTC
    plan = plan_host(_host(maintenance_windows=window), _enrollment(hotpatch=True),
                     HostAssessment(host="h1", ok=True, updates=UPDATES), PatchPolicy(), NOW, ignore_windows=False)
    assert plan.month_kind == "hotpatch" and plan.in_window and "open until" in plan.window
    assert [u.id for u in plan.install] == ["KB5000001"]
    assert {o.update_id: o.state for o in plan.held} == {"KB5000002": ComplianceState.MISSING,
                                                         "KB5000003": ComplianceState.EXCLUDED}
    assert "2027-01" in {o.update_id: o.reason for o in plan.held}["KB5000002"]
    assert not plan.expects_reboot and not plan.reboot_allowed_by_calendar


def test_plan_outside_the_window_is_held_unless_overridden() -> None:
    host = _host(maintenance_windows=[{"days": ["sun"], "start": "01:00", "duration_minutes": 60}])
    assessment = HostAssessment(host="h1", ok=True, updates=UPDATES)
    policy = PatchPolicy(baseline_months=[11])
    held = plan_host(host, _enrollment(), assessment, policy, NOW, ignore_windows=False)
    assert not held.in_window and held.window.startswith("closed; opens 2026-11-22T01:00+09:00")
    assert held.expects_reboot  # a baseline month, and KB5000002 always reboots
    forced = plan_host(host, _enrollment(), assessment, policy, NOW, ignore_windows=True)
    assert forced.in_window and forced.window.endswith("installing anyway (window override)")


def _record(host: str, started: datetime, run_id: str = "run1", **fields: object) -> HostPatchRecord:
    return HostPatchRecord.model_validate({"run_id": run_id, "host": host, "started_at": started,
                                           "month_kind": "baseline", "status": "succeeded", **fields})


def test_history_keeps_one_record_per_host_and_run_and_reads_back_the_last_days(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    going_down = _record("h1", NOW - timedelta(days=1), status="failed", reason="rebooting")
    key = history.write_record(store, going_down)
    assert key == "history/h1/20261117T120000Z-run1.json"
    history.write_record(store, going_down.model_copy(update={"status": "succeeded", "reason": ""}))
    history.write_record(store, _record("h1", NOW - timedelta(days=40), run_id="old"))
    history.write_record(store, _record("h2", NOW, run_id="other-host"))
    recent = history.history(store, "h1", now=NOW)
    assert [(r.run_id, r.status) for r in recent] == [("run1", "succeeded")]
    assert [r.run_id for r in history.history(store, "h1", days=60, now=NOW)] == ["run1", "old"]
    assert history.prune(store, now=NOW) == ["history/h1/20261009T120000Z-old.json"]
    assert [r.run_id for r in history.history(store, "h1", days=60, now=NOW)] == ["run1"]


def test_a_damaged_history_record_is_named(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    store.put("history/h1/20261118T000000Z-bad.json", b'{"run_id": "bad"}')
    with pytest.raises(history.HistoryError, match=r"history/h1/20261118T000000Z-bad\.json is not a valid patch record"):
        history.history(store, "h1", now=NOW)


def test_enrollment_records_round_trip(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    assert history.read_enrollment(store, "h1") is None
    history.write_enrollment(store, _enrollment())
    assert history.read_enrollment(store, "h1") == _enrollment()


def test_reports_list_every_update_and_never_a_secret() -> None:
    secret = remember("hunter2-not-for-reports")
    records = [
        _record("b", NOW, updates=[UpdateOutcome(update_id="KB1", state=ComplianceState.INSTALLED),
                                   UpdateOutcome(update_id="KB2", state=ComplianceState.FAILED, reason="0x80240022")]),
        _record("a", NOW, status="failed", reason=f"pre hook 'login {secret}' exited 1"),
    ]
    rows = compliance_rows(records)
    assert [(r["host"], r["update"], r["state"]) for r in rows] == [("a", "", ""), ("b", "KB1", "Installed"),
                                                                    ("b", "KB2", "Failed")]
    assert secret not in str(rows)
    markdown = summary_markdown("Patch run x", records, plan_text="plan", stopped="budget")
    assert "**1** failed, **1** succeeded" in markdown and "**Rollout stopped:** budget" in markdown
    assert "| b | succeeded | no | 1 | 0 | 0 | 1 |" in markdown
    # Escaped for markdown, the mask shows as *** and the secret's escaped form is not there either.
    assert secret not in markdown and "\\*\\*\\*" in markdown and "hunter2" not in markdown


@pytest.mark.parametrize(("hosts", "forks"), [(100, 50), (100, 5), (3, 50), (7, 2), (1, 1), (9, 4)])
def test_survey_batches_keep_every_host_once_and_exactly_forks_in_flight(hosts: int, forks: int) -> None:
    fleet = [HostConfig(name=f"h{i}", transport="local") for i in range(hosts)]
    batches = survey.survey_batches(fleet, forks)
    assert sorted(h.name for batch, _ in batches for h in batch) == sorted(h.name for h in fleet)
    assert len(batches) <= survey.SURVEY_TASKS
    in_flight = sum(min(threads, len(batch)) for batch, threads in batches)
    assert in_flight == min(forks, hosts) and sum(threads for _, threads in batches) <= forks


def test_writing_a_runs_records_trims_history_older_than_30_days(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    now = datetime.now(timezone.utc)
    history.write_record(store, _record("h1", now - timedelta(days=31), run_id="expired"))
    history.write_record(store, _record("h1", now - timedelta(days=29), run_id="kept"))
    written = report.write_records_task.fn(RecordStore(LocalStorage(path="store"), tmp_path),
                                           [_record("h1", now, run_id="current")], 1)
    remaining = sorted(info.key.rsplit("-", 1)[-1] for info in store.list("history/h1/"))
    assert remaining == ["current.json", "kept.json"]
    assert written == [info.key for info in store.list("history/h1/") if info.key.endswith("-current.json")]
