"""The safety net in a run's summary artifact: which recovery point each host was patched on,
and each rollback with what it restored."""

from __future__ import annotations

from tasks.patching.models import HostPatchRecord
from tasks.rendering import markdown_text


def recovery_markdown(records: list[HostPatchRecord]) -> list[str]:
    """The summary's "Recovery points" section; no lines when no host went through the gate."""
    rows = []
    for record in sorted(records, key=lambda r: r.host):
        recovery = record.recovery
        if recovery is None:
            continue
        for used in recovery.points:
            rows.append(f"| {markdown_text(record.host)} | {markdown_text(used.disk)} | {markdown_text(used.point)} | "
                        f"{used.consistency} | {'taken before install' if used.taken else 'existing'} |")
        if recovery.rollback is not None:
            rows.append(f"| {markdown_text(record.host)} | rollback | | | {markdown_text(recovery.rollback.describe())} |")
    if not rows:
        return []
    return ["", "## Recovery points", "", "| host | disk | point | consistency | how |", "|---|---|---|---|---|", *rows]
