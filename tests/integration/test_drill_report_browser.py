"""The drill's HTML report opened in a real headless chromium with no network at all: the DOM
the browser builds holds the SVG timeline, the RTO/RPO verdicts and the hostile names as text,
and nothing on the page ran.

Two control pages prove the checks can fail: a plain inline script does run in this browser and
is seen, and the same script slipped into a report is refused by the report's own policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.drill.evidence import DrillEvidence
from tasks.drill.report import drill_html, write_html_report
from tests.drill_samples import HOSTILE_MEMBER, HOSTILE_PLAN, HOSTILE_PROBE, Page, drill
from tests.hosts.chromium import dump_dom, screenshot

pytestmark = pytest.mark.integration

PWN = "<script>document.documentElement.setAttribute('data-pwned','{}')</script>"


def _open(evidence: DrillEvidence, tmp_path: Path) -> Page:
    return Page(dump_dom(write_html_report(evidence, tmp_path / "reports"), tmp_path))


def _by_id(page: Page, tag: str, element_id: str) -> dict[str, str | None]:
    found = [attrs for attrs in page.tags(tag) if attrs.get("id") == element_id]
    assert len(found) == 1, f"{tag}#{element_id}: {len(found)} found"
    return found[0]


def _nothing_ran(page: Page) -> None:
    assert "data-pwned" not in page.tags("html")[0]
    assert not page.tags("script") and not page.tags("img")


def test_a_passing_drill_in_chromium_shows_timeline_and_verdicts(tmp_path: Path) -> None:
    evidence = drill()
    page = _open(evidence, tmp_path)
    _by_id(page, "svg", "timeline")
    bars = [a for a in page.tags("rect") if (a.get("class") or "").startswith("bar ")]
    assert len(bars) == len(evidence.steps) and {a["class"] for a in bars} == {"bar ok"}
    for text in ("1 min 51 s against 5 min 00 s: pass ✓", "30 min 00 s against 1 h 00 min: pass ✓",
                 "RTO target 5 min 00 s", "verified (3/3 items proven)", "unchanged ✓", "both met ✓"):
        assert text in page.all_text, text
    _nothing_ran(page)
    png = screenshot(tmp_path / "reports" / "drill-shop-run-1.html", tmp_path / "passed.png", tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_drill_with_hostile_names_in_chromium_shows_them_as_text_and_runs_nothing(tmp_path: Path) -> None:
    page = _open(drill(passed=False, plan=HOSTILE_PLAN, db=HOSTILE_MEMBER, probe=HOSTILE_PROBE), tmp_path)
    _by_id(page, "svg", "timeline")
    states = [a["class"] for a in page.tags("rect") if (a.get("class") or "").startswith("bar ")]
    assert states.count("bar failed") == 1
    for text in ("not reached (target 5 min 00 s)", "30 min 00 s against 1 h 00 min: pass ✓", "not met ✗",
                 HOSTILE_PLAN, HOSTILE_MEMBER, HOSTILE_PROBE):
        assert text in page.all_text, text
    _nothing_ran(page)
    titles = [t for t in page.text if t.startswith("Drill <script>")]
    assert titles, "the document's title is the escaped plan name, not what a script set"


def test_control_an_inline_script_runs_in_this_browser_and_is_seen(tmp_path: Path) -> None:
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body>{PWN.format('control')}</body></html>", encoding="utf-8")
    page = Page(dump_dom(control, tmp_path))
    assert page.tags("html")[0].get("data-pwned") == "control"


def test_control_a_script_slipped_into_a_report_is_refused_by_its_policy(tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.html"
    tampered.write_text(drill_html(drill()).replace("<body>", "<body>" + PWN.format("csp"), 1), encoding="utf-8")
    page = Page(dump_dom(tampered, tmp_path))
    assert page.tags("script"), "the script is in the page"
    assert "data-pwned" not in page.tags("html")[0]
