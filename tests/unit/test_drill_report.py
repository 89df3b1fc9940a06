"""A drill's reports rendered from its evidence alone: the markdown and table artifacts, the HTML
page (escaped, self-contained, with its timeline chart) and the RTO history across runs.

The markdown is rendered by markdown-it (CommonMark plus tables, as the Prefect UI renders it) and
the HTML parsed by the standard library's parser, so the tests read what a viewer would."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from configs.secrets import remember
from tasks.drill.evidence import DrillEvidence
from tasks.drill.report import (
    CHART_LEFT, CHART_WIDTH, drill_html, drill_markdown, history_rows, html_report_name, member_rows,
    primary_untouched, rto_line, rto_trend, sparkline, timeline_chart, write_html_report,
)
from tests.drill_samples import HOSTILE_MEMBER, HOSTILE_PLAN, HOSTILE_PROBE, START, Page, at, drill

MARKDOWN = MarkdownIt("commonmark").enable("table")


def _with_rto(evidence: DrillEvidence, seconds: float | None) -> DrillEvidence:
    """The same run with its last group passing `seconds` after the start (or never)."""
    groups = [g.model_copy(update={"probes_passed_at": None if seconds is None else evidence.started + timedelta(seconds=seconds)})
              if g.name == "web" else g for g in evidence.groups]
    return evidence.model_copy(update={"groups": groups})


def _table_cells(html: str) -> list[list[str]]:
    rows: list[list[str]] = []
    for line in html.split("<tr>")[1:]:
        rows.append(line.split("</tr>")[0].split("<t")[1:])
    return rows


# --- markdown artifact -----------------------------------------------------------------------


def test_markdown_of_a_passing_drill_states_verdicts_timeline_probes_points_cleanup_and_checksums() -> None:
    text = drill_markdown(drill())
    assert "- **RTO:** 1 min 51 s against 5 min 00 s: pass ✓" in text
    assert "- **RPO:** 30 min 00 s against 1 h 00 min: pass ✓" in text
    assert "- **Cleanup:** verified (3/3 items proven)" in text
    assert "- **Primary:** unchanged ✓" in text
    assert "| db | +4.0 s | 2026-12-01 03:01:14Z | 1 min 14 s | yes |  |" in text
    assert "| probe | web | web-01 | +1 min 47 s | 4.0 s | ok |  |" in text
    for phase in ("### primary, before", "### test copy", "### primary, after"):
        assert phase in text
    assert "| db-01 | db-prod | data | 20261201T0230Z | 2026-12-01 02:30:00Z | application | 2.0 GiB | 1 min 00 s |" in text
    assert "| db-01 | namespace | dr-01 | pd-run-1-db | deleted | yes | ip netns list: absent |" in text
    assert "| db-prod | data | b3:aa11 | b3:aa11 | unchanged ✓ |" in text
    assert "- delta restore: a previous copy was on dr-01" in text


def test_markdown_of_a_failed_drill_says_the_rto_was_not_reached_and_which_probe_failed() -> None:
    evidence = drill(passed=False)
    text = drill_markdown(evidence)
    assert text.startswith("# Drill shop (test-failover): failed")
    assert "- **RTO:** not reached (target 5 min 00 s)" in text
    assert "| web-01 | http /health | no | 0.10 |  | status 500, expected 200 |" in text
    assert "| probe | web | web-01 | +1 min 47 s | 4.0 s | failed | GET /health answered 500 |" in text
    assert "- **Cleanup:** verified (3/3 items proven)" in text
    assert rto_line(evidence.model_copy(update={"outcome": "running"})) == "not reached yet (target 5 min 00 s)"


def test_markdown_shows_hostile_names_as_text_and_keeps_every_table_whole() -> None:
    text = drill_markdown(drill(passed=False, plan=HOSTILE_PLAN, db=HOSTILE_MEMBER, probe=HOSTILE_PROBE))
    html = MARKDOWN.render(text)
    assert "<script" not in html and "<img" not in html and "<strong>bold" not in html
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;|**bold**" in html.replace("&quot;", '"')
    for table in html.split("<table>")[1:]:
        widths = {len(row) for row in _table_cells(table.split("</table>")[0])}
        assert len(widths) == 1, widths  # a `|` in a name did not add a column


def test_a_secret_in_a_probe_detail_never_reaches_any_report() -> None:
    secret = remember("s3cr3t-drill-token-81b2")
    evidence = drill()
    evidence.probes[0] = evidence.probes[0].model_copy(update={"detail": f"psql failed for password {secret}"})
    evidence.notes.append(f"token={secret}")
    for rendered in (drill_markdown(evidence), drill_html(evidence), str(member_rows(evidence))):
        assert secret not in rendered
    assert "***" in drill_html(evidence)


# --- table artifact --------------------------------------------------------------------------


def test_table_has_one_row_per_member_with_its_point_restore_probes_cleanup_and_group_rto() -> None:
    rows = member_rows(drill(passed=False))
    assert [r["member"] for r in rows] == ["db-01", "web-01"]
    db, web = rows
    assert db == {
        "member": "db-01", "group": "db", "disks": "db-prod:data", "point taken": "2026-12-01 02:30:00Z",
        "consistency": "application", "restore": "1 min 00 s", "written": "2.0 GiB", "probes before": "1/1 passed",
        "probes on copy": "1/1 passed", "probes after": "1/1 passed", "cleanup": "2/2 verified",
        "group RTO": "1 min 14 s", "failed steps": "",
    }
    assert (web["probes on copy"], web["group RTO"], web["failed steps"]) == ("0/1 passed", "—", "probe")


def test_primary_untouched_needs_every_disk_checked_after_and_equal() -> None:
    evidence = drill()
    assert primary_untouched(evidence) is True
    changed = evidence.primary_checksums[0].model_copy(update={"after": "b3:ffff"})
    assert primary_untouched(evidence.model_copy(update={"primary_checksums": [changed]})) is False
    unchecked = evidence.primary_checksums[0].model_copy(update={"after": None})
    assert primary_untouched(evidence.model_copy(update={"primary_checksums": [unchecked]})) is None
    assert primary_untouched(evidence.model_copy(update={"primary_checksums": []})) is None
    assert "- **Primary:** CHANGED ✗" in drill_markdown(evidence.model_copy(update={"primary_checksums": [changed]}))


# --- HTML report -----------------------------------------------------------------------------


def test_html_escapes_hostile_plan_member_and_probe_names_everywhere() -> None:
    page = Page(drill_html(drill(passed=False, plan=HOSTILE_PLAN, db=HOSTILE_MEMBER, probe=HOSTILE_PROBE)))
    assert not page.tags("script") and not page.tags("img")
    assert not any(name.startswith("on") for _, attrs in page.elements for name in attrs)
    assert HOSTILE_PLAN in page.all_text and HOSTILE_MEMBER in page.all_text and HOSTILE_PROBE in page.all_text
    # The lane label in the chart is cut to fit but still escaped; its tooltip holds it whole.
    assert f"db / {HOSTILE_MEMBER}" in page.all_text


def test_html_is_self_contained_and_forbids_scripts_and_fetches() -> None:
    source = drill_html(drill())
    page = Page(source)
    policy = [a["content"] for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert policy == ["default-src 'none'; style-src 'unsafe-inline'"]
    for _, attrs in page.elements:
        for name in ("src", "href", "action", "poster", "data"):
            assert name not in attrs, attrs
    assert not page.tags("link") and not page.tags("script") and "@import" not in source and "url(" not in source


def test_html_chart_draws_a_bar_per_step_and_the_rto_target_where_it_belongs() -> None:
    evidence = drill()
    chart = timeline_chart(evidence)
    assert len(chart.bars) == len(evidence.steps)
    assert [lane.label for lane in chart.lanes] == ["plan", "db / db-01", "web / web-01"]
    named = drill(db="db/db-prod#0")
    assert [lane.label for lane in timeline_chart(named).lanes] == ["plan", "db/db-prod#0", "web / web-01"]
    span = evidence.rto_target_seconds  # 300 s: longer than the run, so it sets the scale
    target, measured = chart.lines
    assert target.x == pytest.approx(CHART_LEFT + CHART_WIDTH)
    assert measured.x == pytest.approx(CHART_LEFT + 111 / span * CHART_WIDTH) and measured.css == "measured ok"
    first_restore = chart.bars[1]
    assert first_restore.x == pytest.approx(CHART_LEFT + 4 / span * CHART_WIDTH)
    assert first_restore.width == pytest.approx(60 / span * CHART_WIDTH) and first_restore.state == "ok"

    page = Page(drill_html(evidence))
    assert len(page.tags("svg")) == 1
    bars = [a for a in page.tags("rect") if (a.get("class") or "").startswith("bar ")]
    assert [a["class"] for a in bars] == ["bar ok"] * len(evidence.steps)
    assert "RTO target 5 min 00 s" in page.all_text and "RTO 1 min 51 s" in page.all_text


def test_html_of_a_failed_drill_marks_the_failed_step_and_draws_no_measured_rto() -> None:
    evidence = drill(passed=False)
    assert [line.css for line in timeline_chart(evidence).lines] == ["target"]
    page = Page(drill_html(evidence))
    states = [a["class"] for a in page.tags("rect") if (a.get("class") or "").startswith("bar ")]
    assert states.count("bar failed") == 1
    assert "not reached (target 5 min 00 s)" in page.all_text
    assert "FAIL" not in rto_line(evidence) and "not met ✗" in page.all_text


def test_a_step_still_running_is_drawn_to_the_end_of_the_run() -> None:
    evidence = drill()
    evidence.steps[-1] = evidence.steps[-1].model_copy(update={"finished": None, "ok": None})
    bar = timeline_chart(evidence).bars[-1]
    assert bar.state == "running"
    assert bar.x + bar.width == pytest.approx(CHART_LEFT + 118 / 300 * CHART_WIDTH)


def test_a_step_begun_before_the_clock_is_drawn_from_its_start() -> None:
    evidence = drill()
    evidence.steps.insert(0, evidence.steps[0].model_copy(update={"name": "wait for slot", "started": at(-30), "finished": at(0)}))
    bar = timeline_chart(evidence).bars[0]
    assert (bar.x, bar.width) == (CHART_LEFT, 2.0)


def test_steps_before_the_clock_read_as_negative_starts_in_markdown_and_html() -> None:
    """The test network is made before failover start (the RTO clock's zero): its start reads
    `-1.7 s`, never `+-1.7 s`, and the page says what a negative start means."""
    evidence = drill()
    evidence.steps.insert(0, evidence.steps[0].model_copy(update={"name": "isolate", "started": at(-1.7),
                                                                  "finished": at(-0.2)}))
    markdown = drill_markdown(evidence)
    [row] = [line for line in markdown.splitlines() if line.startswith("| isolate ")]
    assert "| -1.7 s | 1.5 s |" in row and "+-" not in markdown
    assert "a negative start came before it" in markdown
    page = Page(drill_html(evidence))
    assert "-1.7 s" in page.all_text and "+-" not in page.all_text and "a negative start came before it" in page.all_text
    assert "+4.0 s" in page.all_text  # the first restore, on the clock


def test_html_report_is_written_whole_under_a_safe_name(tmp_path: Path) -> None:
    evidence = drill(plan="../../etc/Shop Plan", run_id="Run/7")
    path = write_html_report(evidence, tmp_path / "reports")
    assert path == tmp_path / "reports" / "drill-etc-shop-plan-run-7.html" == tmp_path / "reports" / html_report_name(evidence)
    assert path.read_text(encoding="utf-8") == drill_html(evidence)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# --- history ---------------------------------------------------------------------------------


def test_history_rows_are_oldest_first_with_verdicts() -> None:
    first = drill(run_id="a", started=START)
    second = drill(run_id="b", started=START + timedelta(days=90), passed=False)
    rows = history_rows([second, first])
    assert [r["run"] for r in rows] == ["a", "b"]
    assert rows[0] == {"date": "2026-12-01 03:00:00Z", "plan": "shop", "kind": "test-failover", "run": "a",
                       "outcome": "passed", "RTO": "1 min 51 s", "RTO target": "5 min 00 s", "RPO": "30 min 00 s",
                       "RPO target": "1 h 00 min", "targets met": "yes"}
    assert (rows[1]["date"], rows[1]["RTO"], rows[1]["targets met"]) == ("2027-03-01 03:00:00Z", "—", "no")


def test_rto_trend_per_plan_shows_change_against_the_previous_run_and_a_sparkline() -> None:
    runs = [_with_rto(drill(run_id=str(i), started=START + timedelta(days=30 * i)), rto)
            for i, rto in enumerate([100, None, 150, 120])]
    other = drill(plan="billing", run_id="x", started=START + timedelta(days=1))
    trend = rto_trend([*runs, other])
    assert [r["plan"] for r in trend] == ["billing", "shop"]
    shop = trend[1]
    assert shop == {"plan": "shop", "runs": "4", "latest RTO": "2 min 00 s", "change": "-30.0 s (-20%)",
                    "best": "1 min 40 s", "worst": "2 min 30 s", "RTO target": "5 min 00 s",
                    "targets met": "3/4", "trend": "▁×█▄"}
    assert trend[0]["change"] == "—" and trend[0]["trend"] == "▁"


def test_sparkline_keeps_its_length_and_marks_runs_without_rto() -> None:
    assert sparkline([]) == ""
    assert sparkline([None, None]) == "××"
    assert sparkline([5, 5, 5]) == "▁▁▁"
    assert sparkline([0, 70, 35]) == "▁█▅"


def test_trend_of_a_plan_whose_latest_run_never_reached_rto() -> None:
    runs = [_with_rto(drill(run_id=str(i), started=START + timedelta(days=i)), rto) for i, rto in enumerate([90, None])]
    shop = rto_trend(runs)[0]
    assert (shop["latest RTO"], shop["change"], shop["trend"]) == ("—", "—", "▁×")


def test_group_timestamps_drive_the_report_not_the_steps() -> None:
    evidence = drill()
    late = [g.model_copy(update={"probes_passed_at": at(400)}) if g.name == "web" else g for g in evidence.groups]
    text = drill_markdown(evidence.model_copy(update={"groups": late}))
    assert "- **RTO:** 6 min 40 s against 5 min 00 s: FAIL ✗" in text
