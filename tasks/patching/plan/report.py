"""The run's reports built from its host records: compliance rows and the Markdown summary."""

from __future__ import annotations

from configs.secrets import redact
from tasks.patching.models import ComplianceState, HostPatchRecord
from tasks.patching.safety.report import recovery_markdown, unavailability_markdown
from tasks.rendering import markdown_text


def compliance_rows(records: list[HostPatchRecord]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for record in sorted(records, key=lambda r: r.host):
        base = {"host": record.host, "status": record.status, "rebooted": "yes" if record.rebooted else "no",
                "unavailable": record.unavailability.text() if record.unavailability else "not measured"}
        if not record.updates:
            rows.append({**base, "update": "", "classification": "", "state": "", "reason": redact(record.reason)})
        for outcome in record.updates:
            rows.append({**base, "update": outcome.update_id, "classification": outcome.classification.value,
                         "state": outcome.state.value, "reason": redact(outcome.reason)})
    return rows


def summary_markdown(title: str, records: list[HostPatchRecord], *, plan_text: str, stopped: str | None) -> str:
    by_status: dict[str, int] = {}
    for record in records:
        by_status[record.status] = by_status.get(record.status, 0) + 1
    lines = [f"# {markdown_text(title)}", "", ", ".join(f"**{count}** {status}" for status, count in sorted(by_status.items())), ""]
    if stopped:
        lines += [f"**Rollout stopped:** {markdown_text(stopped)}", ""]
    lines += ["| host | status | rebooted | installed | pending reboot | missing | failed | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r.host):
        counts = [r.count(s) for s in (ComplianceState.INSTALLED, ComplianceState.INSTALLED_PENDING_REBOOT,
                                       ComplianceState.MISSING, ComplianceState.FAILED)]
        lines.append(f"| {markdown_text(r.host)} | {r.status} | {'yes' if r.rebooted else 'no'} | "
                     + " | ".join(str(c) for c in counts) + f" | {markdown_text(r.reason)} |")
    lines += recovery_markdown(records)
    lines += ["", *unavailability_markdown(records), "## Plan", "", "```", plan_text, "```"]
    return redact("\n".join(lines))
