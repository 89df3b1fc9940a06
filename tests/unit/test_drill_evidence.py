"""RTO and RPO as the journal computes them from its own timestamps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pydantic import BaseModel

from tasks.drill.evidence import DrillEvidence, GroupResult, PointUsed, evidence_key, plan_version

START = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)


def _evidence(**changes: object) -> DrillEvidence:
    base = DrillEvidence(run_id="r1", kind="test-failover", plan="web", plan_version="v", operator="ops",
                         started=START, rto_target_seconds=600, rpo_target_seconds=3600)
    return base.model_copy(update=changes)


def _point(member: str, minutes_before: int) -> PointUsed:
    return PointUsed(member=member, host=member, disk="data", point_id=f"{member}-p",
                     taken_at=START - timedelta(minutes=minutes_before), consistency="application")


def test_rto_is_start_to_the_last_group_passing() -> None:
    groups = [GroupResult(name="db", started=START, probes_passed_at=START + timedelta(seconds=120), ok=True),
              GroupResult(name="web", started=START, probes_passed_at=START + timedelta(seconds=700), ok=True)]
    evidence = _evidence(groups=groups)
    assert evidence.rto_seconds == 700
    assert evidence.group_rto_seconds("db") == 120
    assert evidence.rto_ok is False


def test_rto_is_unknown_while_a_group_never_passed() -> None:
    groups = [GroupResult(name="db", started=START, probes_passed_at=START + timedelta(seconds=5), ok=True),
              GroupResult(name="web", started=START)]
    evidence = _evidence(groups=groups)
    assert evidence.rto_seconds is None and evidence.rto_ok is None


def test_rpo_is_the_oldest_point_restored() -> None:
    evidence = _evidence(points=[_point("db", 30), _point("web", 90)])
    assert evidence.rpo_seconds == 90 * 60
    assert evidence.rpo_ok is False
    assert _evidence(points=[_point("db", 30)]).rpo_ok is True
    assert _evidence(points=[_point("db", -2)]).rpo_seconds == 0.0  # a planned failover's final point


def test_plan_version_follows_content_and_the_record_round_trips() -> None:
    class Plan(BaseModel):
        name: str
        rto: int

    assert plan_version(Plan(name="a", rto=1)) == plan_version(Plan(name="a", rto=1))
    assert plan_version(Plan(name="a", rto=1)) != plan_version(Plan(name="a", rto=2))
    evidence = _evidence(points=[_point("db", 30)])
    assert DrillEvidence.model_validate_json(evidence.model_dump_json()) == evidence
    assert evidence_key("web", "r1") == "evidence/drills/web/r1.json"
