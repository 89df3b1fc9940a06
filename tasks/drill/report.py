"""A drill's reports, rendered from its evidence record alone (no Prefect, no store, no run): the
markdown and table artifacts, the self-contained HTML report and the RTO history across runs.

Every report is built from the same view of the record (`_verdict`, `_duration`, `member_rows`…)
so the markdown, the table, the HTML page and `drill history` never disagree on a figure.
The HTML page is one file that opens offline: inline CSS, an inline SVG chart, no script at all
(a Content-Security-Policy forbids scripts and every fetch), and every string from the plan, the
hosts or the probes escaped by Jinja2's autoescape and redacted like every other artifact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from configs.secrets import redact
from tasks.drill.evidence import DrillEvidence, ProbePhase, Step
from tasks.rendering import artifact_key, human_size, markdown_text

PROBE_PHASES: tuple[tuple[ProbePhase, str], ...] = (
    ("primary-before", "primary, before"),
    ("copy", "test copy"),
    ("target", "DR target"),
    ("primary-after", "primary, after"),
)
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
NO_RTO_MARK = "×"


# ---------------------------------------------------------------------------------------------
# Shared wording: one place decides how a verdict, a duration and a time read.


def _duration(seconds: float | None) -> str:
    """`7.25` → `7.2 s`, `245` → `4 min 05 s`, `7380` → `2 h 03 min`; RTOs are read in minutes."""
    if seconds is None:
        return "—"
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{sign}{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{sign}{hours} h {rest:02d} min"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _verdict(ok: bool | None, *, missing: str = "not measured") -> str:
    return missing if ok is None else ("pass ✓" if ok else "FAIL ✗")


def _step_ok(ok: bool | None) -> str:
    return "running" if ok is None else ("ok" if ok else "failed")


def _target_line(measured: float | None, target: float, ok: bool | None, *, missing: str) -> str:
    if measured is None or ok is None:
        return f"{missing} (target {_duration(target)})"
    return f"{_duration(measured)} against {_duration(target)}: {_verdict(ok)}"


def _rto_missing(evidence: DrillEvidence) -> str:
    """Why there is no RTO: still running, or the last group's probes never all passed."""
    return "not reached yet" if evidence.outcome == "running" else "not reached"


def rto_line(evidence: DrillEvidence) -> str:
    """`4 min 05 s against 10 min 00 s: pass ✓` (or `not reached (target 10 min 00 s)`): the
    plan's RTO verdict in one line."""
    return _target_line(evidence.rto_seconds, evidence.rto_target_seconds, evidence.rto_ok,
                        missing=_rto_missing(evidence))


def rpo_line(evidence: DrillEvidence) -> str:
    return _target_line(evidence.rpo_seconds, evidence.rpo_target_seconds, evidence.rpo_ok,
                        missing="no point used")


def targets_met(evidence: DrillEvidence) -> bool:
    """Both targets measured and met: an RTO never reached is not a met target."""
    return evidence.rto_ok is True and evidence.rpo_ok is True


def _offset(evidence: DrillEvidence, moment: datetime) -> float:
    return (moment - evidence.started).total_seconds()


CLOCK_NOTE = ("Starts count from failover start, where the RTO clock starts; a negative start came before it "
              "(readiness, the primary's checksums and the test networks, which a real failover does not have).")


def _since_clock(evidence: DrillEvidence, moment: datetime) -> str:
    """`+4.0 s` after failover start (the RTO clock's zero); `-1.7 s` for what came before it
    (readiness, the primary's checksums, the test networks)."""
    offset = _offset(evidence, moment)
    return ("+" if offset >= 0 else "") + _duration(offset)


def _member_groups(evidence: DrillEvidence) -> dict[str, str]:
    """Which group each member ran in, as its steps recorded it."""
    groups: dict[str, str] = {}
    for step in evidence.steps:
        if step.member and step.group:
            groups.setdefault(step.member, step.group)
    return groups


def _members(evidence: DrillEvidence) -> list[str]:
    """Every member the record names, in the order the run met them."""
    seen: dict[str, None] = {}
    for name in [p.member for p in evidence.points] + [s.member for s in evidence.steps] \
            + [p.member for p in evidence.probes] + [c.member for c in evidence.cleanup]:
        if name:
            seen.setdefault(name, None)
    return list(seen)


def _passed(oks: Sequence[bool]) -> str:
    return f"{sum(oks)}/{len(oks)} passed" if oks else "—"


# ---------------------------------------------------------------------------------------------
# Prefect table artifact: one row per member, what an operator scans first after a drill.


def member_rows(evidence: DrillEvidence) -> list[dict[str, str]]:
    """One row per member: where its point came from, how its restore went, what its probes said,
    whether what it left behind is proven gone, and its group's RTO."""
    groups = _member_groups(evidence)
    rows: list[dict[str, str]] = []
    for member in _members(evidence):
        points = [p for p in evidence.points if p.member == member]
        probes = [p for p in evidence.probes if p.member == member]
        cleanup = [c for c in evidence.cleanup if c.member == member]
        written = [p.bytes_written for p in points if p.bytes_written is not None]
        restore = [p.restore_seconds for p in points if p.restore_seconds is not None]
        steps_failed = [s.name for s in evidence.steps if s.member == member and s.ok is False]
        group = groups.get(member)
        rows.append({
            "member": member,
            "group": group or "",
            "disks": ", ".join(f"{p.host}:{p.disk}" for p in points),
            "point taken": ", ".join(_when(p.taken_at) for p in points),
            "consistency": ", ".join(sorted({p.consistency for p in points})),
            "restore": _duration(sum(restore)) if restore else "—",
            "written": human_size(sum(written)) if written else "—",
            "probes before": _passed([p.ok for p in probes if p.phase == "primary-before"]),
            "probes on copy": _passed([p.ok for p in probes if p.phase in ("copy", "target")]),
            "probes after": _passed([p.ok for p in probes if p.phase == "primary-after"]),
            "cleanup": f"{sum(c.verified for c in cleanup)}/{len(cleanup)} verified" if cleanup else "—",
            "group RTO": _duration(evidence.group_rto_seconds(group)) if group else "—",
            "failed steps": ", ".join(steps_failed),
        })
    return [{column: redact(value) for column, value in row.items()} for row in rows]


# ---------------------------------------------------------------------------------------------
# Prefect markdown artifact.


def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_text(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def drill_title(evidence: DrillEvidence) -> str:
    return f"Drill {evidence.plan} ({evidence.kind}): {evidence.outcome}"


def drill_markdown(evidence: DrillEvidence) -> str:
    """The run's markdown artifact: verdicts first, then the timeline, probes, points used,
    cleanup proof, the primary's checksums and notes."""
    e = evidence
    lines = [f"# {markdown_text(drill_title(e))}", "",
             f"- **Outcome:** {markdown_text(e.outcome)}",
             f"- **RTO:** {markdown_text(rto_line(e))}",
             f"- **RPO:** {markdown_text(rpo_line(e))}",
             f"- **Run:** {markdown_text(e.run_id)}, by {markdown_text(e.operator)}, "
             f"{markdown_text(_when(e.started))} → {markdown_text(_when(e.finished))}",
             f"- **Plan version:** {markdown_text(e.plan_version[:12])}",
             f"- **Cleanup:** {markdown_text(_cleanup_summary(e))}"]
    if e.primary_checksums:
        lines.append(f"- **Primary:** {markdown_text(_unchanged(primary_untouched(e)))}")
    lines.append("")
    if e.groups:
        lines += ["## RTO per group", ""]
        lines += _md_table(["group", "started", "probes passed", "RTO", "ok", "detail"],
                           [(g.name, _since_clock(e, g.started), _when(g.probes_passed_at),
                             _duration(e.group_rto_seconds(g.name)), "yes" if g.ok else "no", g.detail)
                            for g in e.groups])
    lines += ["## Timeline", "", CLOCK_NOTE, ""]
    lines += _md_table(["step", "group", "member", "start", "duration", "ok", "detail"],
                       [(s.name, s.group or "", s.member or "", _since_clock(e, s.started),
                         _duration(s.seconds), _step_ok(s.ok), s.detail) for s in e.steps]) \
        if e.steps else ["No step recorded.", ""]
    lines += ["## Probes", ""]
    for phase, title in PROBE_PHASES:
        probes = [p for p in e.probes if p.phase == phase]
        if probes:
            lines += [f"### {title}", ""]
            lines += _md_table(["member", "probe", "ok", "seconds", "observed", "detail"],
                               [(p.member, p.probe, "yes" if p.ok else "no", f"{p.seconds:.2f}",
                                 p.observed or "", p.detail) for p in probes])
    if not e.probes:
        lines += ["No probe ran.", ""]
    lines += ["## Points used", ""]
    lines += _md_table(["member", "host", "disk", "point", "taken at", "consistency", "bytes written", "restore"],
                       [(p.member, p.host, p.disk, p.point_id, _when(p.taken_at), p.consistency,
                         human_size(p.bytes_written) if p.bytes_written is not None else "—",
                         _duration(p.restore_seconds)) for p in e.points]) \
        if e.points else ["No recovery point used.", ""]
    lines += ["## Cleanup proof", ""]
    lines += _md_table(["member", "kind", "target", "item", "action", "verified", "evidence"],
                       [(c.member or "", c.kind, c.target, c.identifier, c.action,
                         "yes" if c.verified else "NO", c.evidence) for c in e.cleanup]) \
        if e.cleanup else ["Nothing was created, so nothing was cleaned up.", ""]
    if e.primary_checksums:
        lines += ["## Primary checksums", ""]
        lines += _md_table(["host", "disk", "before", "after", "unchanged"],
                           [(c.host, c.disk, c.before, c.after or "—", _unchanged(c.unchanged))
                            for c in e.primary_checksums])
    if e.notes:
        lines += ["## Notes", ""] + [f"- {markdown_text(note)}" for note in e.notes] + [""]
    return redact("\n".join(lines))


def _unchanged(unchanged: bool | None) -> str:
    return "not checked after" if unchanged is None else ("unchanged ✓" if unchanged else "CHANGED ✗")


def primary_untouched(evidence: DrillEvidence) -> bool | None:
    """Every primary disk checksummed before and after and found equal; None until all were
    checked after (or when none was checksummed)."""
    states = [c.unchanged for c in evidence.primary_checksums]
    if False in states:
        return False
    return None if not states or None in states else True


def _cleanup_summary(evidence: DrillEvidence) -> str:
    items = evidence.cleanup
    verified = sum(c.verified for c in items)
    state = {True: "verified", False: "NOT verified", None: "not run"}[evidence.cleanup_verified]
    return f"{state} ({verified}/{len(items)} items proven)"


def artifact_keys(evidence: DrillEvidence) -> dict[str, str]:
    """The artifact keys of a plan's drills: one history per plan and kind in the Prefect UI."""
    return {kind: artifact_key("drill", evidence.plan, evidence.kind, kind) for kind in ("summary", "members")}


# ---------------------------------------------------------------------------------------------
# The self-contained HTML report.

CHART_LEFT = 220  # room for a lane's label
CHART_WIDTH = 720  # the time axis
LANE_HEIGHT = 26
BAR_HEIGHT = 16
AXIS_ROOM = 34
LABEL_CHARS = 30


@dataclass(frozen=True)
class _Bar:
    x: float
    width: float
    y: float
    state: str  # ok | failed | running: the CSS class of the bar
    tip: str


@dataclass(frozen=True)
class _Lane:
    label: str
    y: float

    @property
    def short(self) -> str:
        """What fits left of the axis; the whole label is the lane's tooltip."""
        return self.label if len(self.label) <= LABEL_CHARS else self.label[:LABEL_CHARS - 1] + "…"


@dataclass(frozen=True)
class _Mark:
    x: float
    label: str
    css: str

    @property
    def anchor(self) -> str:
        """Labels in the right half of the chart read leftwards, so none runs off its edge."""
        return "end" if self.x > CHART_LEFT + CHART_WIDTH / 2 else "start"


@dataclass(frozen=True)
class _Chart:
    width: int
    height: int
    plot_left: int
    plot_bottom: float
    lanes: list[_Lane]
    bars: list[_Bar]
    ticks: list[_Mark]
    lines: list[_Mark]


def _lane_label(step: Step) -> str:
    """`db / db-01`; a member id that already names its group (`db/db-01#0`) stands alone."""
    if step.group and step.member and not step.member.startswith(f"{step.group}/"):
        return f"{step.group} / {step.member}"
    return step.member or step.group or "plan"


def _tick_step(span: float) -> float:
    """A round tick interval giving about five ticks over span seconds."""
    for candidate in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400):
        if span / candidate <= 6:
            return candidate
    return span / 5


def timeline_chart(evidence: DrillEvidence) -> _Chart:
    """A Gantt of the steps, one lane per group/member, with the RTO target and the measured RTO
    drawn across it; a step that never finished runs to the end of the run (or of the chart)."""
    e = evidence
    ends = [_offset(e, s.finished or s.started) for s in e.steps]
    end_of_run = _offset(e, e.finished) if e.finished else max(ends, default=0.0)
    span = max([*ends, end_of_run, e.rto_target_seconds, e.rto_seconds or 0.0, 1.0])
    scale = CHART_WIDTH / span
    lanes: dict[str, _Lane] = {}
    bars: list[_Bar] = []
    for step in e.steps:
        label = _lane_label(step)
        lane = lanes.setdefault(label, _Lane(label=label, y=AXIS_ROOM / 2 + len(lanes) * LANE_HEIGHT))
        # A step begun before the clock started (waiting for the plan's slot) is drawn from 0.
        start = max(_offset(e, step.started), 0.0)
        stop = max(_offset(e, step.finished) if step.finished else end_of_run, start)
        state = "running" if step.ok is None else ("ok" if step.ok else "failed")
        bars.append(_Bar(x=CHART_LEFT + start * scale, width=max((stop - start) * scale, 2.0),
                         y=lane.y + (LANE_HEIGHT - BAR_HEIGHT) / 2, state=state,
                         tip=f"{step.name}: +{_duration(start)}, {_duration(step.seconds)}, {_step_ok(step.ok)}"
                             + (f" — {step.detail}" if step.detail else "")))
    plot_bottom = AXIS_ROOM / 2 + max(len(lanes), 1) * LANE_HEIGHT
    interval = _tick_step(span)
    ticks = [_Mark(x=CHART_LEFT + i * interval * scale, label=_duration(i * interval), css="tick")
             for i in range(int(span // interval) + 1)]
    lines = [_Mark(x=CHART_LEFT + e.rto_target_seconds * scale, label=f"RTO target {_duration(e.rto_target_seconds)}",
                   css="target")]
    if e.rto_seconds is not None:
        lines.append(_Mark(x=CHART_LEFT + e.rto_seconds * scale, label=f"RTO {_duration(e.rto_seconds)}",
                           css="measured " + ("ok" if e.rto_ok else "failed")))
    return _Chart(width=CHART_LEFT + CHART_WIDTH + 20, height=int(plot_bottom + AXIS_ROOM), plot_left=CHART_LEFT,
                  plot_bottom=plot_bottom, lanes=list(lanes.values()), bars=bars, ticks=ticks, lines=lines)


def _redacted(value: object) -> object:
    """Jinja2 `finalize`: every printed string is redacted before autoescape sees it."""
    return redact(value) if isinstance(value, str) else value


_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True, undefined=jinja2.StrictUndefined, finalize=_redacted,
    trim_blocks=True, lstrip_blocks=True,
)
_TEMPLATES.filters.update(duration=_duration, when=_when, verdict=_verdict, step_ok=_step_ok,
                          unchanged=_unchanged, size=human_size)


def drill_html(evidence: DrillEvidence) -> str:
    """The whole report as one HTML document that opens offline in any browser."""
    e = evidence
    return _TEMPLATES.get_template("drill_report.html.j2").render(
        e=e, title=drill_title(e), rto=rto_line(e), rpo=rpo_line(e), targets_met=targets_met(e),
        cleanup=_cleanup_summary(e), primary_untouched=primary_untouched(e), chart=timeline_chart(e), members=member_rows(e),
        probe_phases=[(title, [p for p in e.probes if p.phase == phase]) for phase, title in PROBE_PHASES],
        since_clock=lambda moment: _since_clock(e, moment), clock_note=CLOCK_NOTE, group_rto=e.group_rto_seconds,
    )


def html_report_name(evidence: DrillEvidence) -> str:
    """A file name safe on any file system: `drill-<plan>-<run>.html`."""
    return artifact_key("drill", evidence.plan, evidence.run_id) + ".html"


def write_html_report(evidence: DrillEvidence, directory: Path) -> Path:
    """Write the HTML report into directory atomically (a reader never sees half a page)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / html_report_name(evidence)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".report-", suffix=".html")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(drill_html(evidence))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# `drill history`: RTO across runs.


def history_rows(records: Iterable[DrillEvidence]) -> list[dict[str, str]]:
    """One row per run, oldest first: the trend reads top to bottom."""
    return [{
        "date": _when(r.started), "plan": redact(r.plan), "kind": r.kind, "run": redact(r.run_id),
        "outcome": r.outcome,
        "RTO": _duration(r.rto_seconds), "RTO target": _duration(r.rto_target_seconds),
        "RPO": _duration(r.rpo_seconds), "RPO target": _duration(r.rpo_target_seconds),
        "targets met": "yes" if targets_met(r) else "no",
    } for r in sorted(records, key=lambda r: r.started)]


def sparkline(values: Sequence[float | None]) -> str:
    """`[10, 20, None, 40]` → `▁▃×█`: one block per run, scaled between the lowest and the
    highest value; × marks a run whose RTO was never reached."""
    known = [v for v in values if v is not None]
    if not known:
        return NO_RTO_MARK * len(values)
    low, high = min(known), max(known)
    top = len(SPARK_BLOCKS) - 1
    return "".join(NO_RTO_MARK if v is None else
                   SPARK_BLOCKS[0 if high == low else round((v - low) / (high - low) * top)] for v in values)


def _change(latest: float | None, previous: float | None) -> str:
    if latest is None or previous is None:
        return "—"
    delta = latest - previous
    percent = f" ({delta / previous:+.0%})" if previous else ""
    return ("+" if delta >= 0 else "") + _duration(delta) + percent


def rto_trend(records: Iterable[DrillEvidence], *, last: int = 12) -> list[dict[str, str]]:
    """Per plan: how many runs, the latest RTO and its change against the run before, the best
    and worst, how often both targets were met, and a sparkline of the last `last` runs."""
    by_plan: dict[str, list[DrillEvidence]] = {}
    for record in sorted(records, key=lambda r: r.started):
        by_plan.setdefault(record.plan, []).append(record)
    rows: list[dict[str, str]] = []
    for plan, runs in sorted(by_plan.items()):
        rtos = [r.rto_seconds for r in runs]
        known = [v for v in rtos if v is not None]
        rows.append({
            "plan": redact(plan), "runs": str(len(runs)),
            "latest RTO": _duration(rtos[-1]),
            "change": _change(rtos[-1], rtos[-2] if len(rtos) > 1 else None),
            "best": _duration(min(known) if known else None), "worst": _duration(max(known) if known else None),
            "RTO target": _duration(runs[-1].rto_target_seconds),
            "targets met": f"{sum(targets_met(r) for r in runs)}/{len(runs)}",
            "trend": sparkline(rtos[-last:]),
        })
    return rows


__all__ = [
    "artifact_keys", "drill_html", "drill_markdown", "drill_title", "history_rows", "html_report_name",
    "member_rows", "primary_untouched", "rpo_line", "rto_line", "rto_trend", "sparkline", "targets_met", "timeline_chart",
    "write_html_report",
]
