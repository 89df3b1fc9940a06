"""Evidence records of finished drills, as the drill flow writes them, for the report tests: one
that passed, one whose web copy failed its probe, and names an attacker could put in a plan."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

from tasks.drill.evidence import (
    Checksum, CleanupItem, DrillEvidence, GroupResult, PointUsed, ProbeRecord, Step,
)

START = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
# Each would run or fetch something if a report printed it as markup.
HOSTILE_PLAN = "<script>document.documentElement.setAttribute('data-pwned','plan')</script>"
HOSTILE_MEMBER = "db-01<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','member')\">"
HOSTILE_PROBE = "sql</td><script>document.title='pwned'</script>|**bold**"


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def _step(name: str, begin: float, end: float | None, ok: bool | None, *, group: str | None = None,
          member: str | None = None, detail: str = "") -> Step:
    return Step(name=name, group=group, member=member, started=at(begin),
                finished=None if end is None else at(end), ok=ok, detail=detail)


def drill(*, passed: bool = True, plan: str = "shop", db: str = "db-01", probe: str = "orders row count",
          started: datetime = START, rto_target: float = 300, rpo_target: float = 3600,
          run_id: str = "run-1") -> DrillEvidence:
    """A two-group drill (db, then web). When `passed` is False the web copy's HTTP probe fails:
    the web group never passes, so there is no RTO, and cleanup still runs and proves itself."""
    shift = started - START
    web_ok = passed
    steps = [
        _step("readiness", 0, 4, True),
        _step("restore", 4, 64, True, group="db", member=db, detail="2.0 GiB, delta"),
        _step("start", 64, 70, True, group="db", member=db),
        _step("probe", 70, 74, True, group="db", member=db),
        _step("restore", 74, 104, True, group="web", member="web-01"),
        _step("start", 104, 107, True, group="web", member="web-01"),
        _step("probe", 107, 111, web_ok, group="web", member="web-01",
              detail="" if web_ok else "GET /health answered 500"),
        _step("cleanup", 111, 118, True),
    ]
    probes = [
        ProbeRecord(member=db, phase="primary-before", probe=probe, ok=True, detail="42 rows", seconds=0.2, at=at(1),
                    observed="42"),
        ProbeRecord(member=db, phase="copy", probe=probe, ok=True, detail="42 rows", seconds=0.3, at=at(72),
                    observed="42"),
        ProbeRecord(member="web-01", phase="copy", probe="http /health", ok=web_ok,
                    detail="200 OK" if web_ok else "status 500, expected 200", seconds=0.1, at=at(109)),
        ProbeRecord(member=db, phase="primary-after", probe=probe, ok=True, detail="42 rows", seconds=0.2, at=at(117),
                    observed="42"),
    ]
    cleanup = [
        CleanupItem(member=db, kind="process", target="dr-01", identifier="pid 4242", action="stopped",
                    verified=True, evidence="kill -0 4242: no such process"),
        CleanupItem(member=db, kind="namespace", target="dr-01", identifier="pd-run-1-db", action="deleted",
                    verified=True, evidence="ip netns list: absent"),
        CleanupItem(member="web-01", kind="files", target="dr-01", identifier="/srv/dr/web-01", action="removed",
                    verified=True, evidence="stat: No such file or directory"),
    ]
    evidence = DrillEvidence(
        run_id=run_id, kind="test-failover", plan=plan, plan_version="9f2c" * 16, operator="ops@example",
        started=START, finished=at(118), outcome="passed" if passed else "failed",
        rto_target_seconds=rto_target, rpo_target_seconds=rpo_target,
        groups=[GroupResult(name="db", started=at(4), probes_passed_at=at(74), ok=True),
                GroupResult(name="web", started=at(74), probes_passed_at=at(111) if web_ok else None, ok=web_ok,
                            detail="" if web_ok else "http /health failed")],
        points=[PointUsed(member=db, host="db-prod", disk="data", point_id="20261201T0230Z", taken_at=at(-1800),
                          consistency="application", bytes_written=2 << 30, restore_seconds=60.0),
                PointUsed(member="web-01", host="web-prod", disk="root", point_id="20261201T0245Z",
                          taken_at=at(-900), consistency="file-system", bytes_written=12 << 20, restore_seconds=30.0)],
        steps=steps, probes=probes, cleanup=cleanup, cleanup_verified=True,
        primary_checksums=[Checksum(host="db-prod", disk="data", before="b3:aa11", after="b3:aa11")],
        notes=["delta restore: a previous copy was on dr-01"],
    )
    if shift:
        # Move every timestamp together so history tests can line up runs on different days.
        evidence = DrillEvidence.model_validate_json(evidence.model_dump_json())
        moved = evidence.model_dump()
        _shift(moved, shift)
        evidence = DrillEvidence.model_validate(moved)
    return evidence


def _shift(value: object, by: timedelta) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, datetime):
                value[key] = item + by
            else:
                _shift(item, by)
    elif isinstance(value, list):
        for item in value:
            _shift(item, by)


class Page(HTMLParser):
    """Every element (tag and attributes) and every piece of text a browser would build."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(source)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.elements if tag == name]

    @property
    def all_text(self) -> str:
        return "".join(self.text)
