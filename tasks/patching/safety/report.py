"""The safety net in a run's reports: which recovery point each host was patched on and each
rollback with what it restored; measured unavailability per host, per update domain and for the run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tasks.patching.models import HostPatchRecord
from tasks.patching.safety.records import Unavailability
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

def _row(scope: str, name: str, measured: Sequence[Unavailability], probe: str) -> dict[str, str]:
    return {"scope": scope, "name": name, "hosts": str(len(measured)),
            "unavailable_seconds": f"{sum(m.seconds for m in measured):.2f}",
            "longest_seconds": f"{max(m.seconds for m in measured):.2f}",
            "resolution_seconds": f"{max(m.resolution_seconds for m in measured):.2g}",
            "outages": str(sum(len(m.outages) for m in measured)),
            "still_down": str(sum(not m.recovered for m in measured)), "probe": probe}


def unavailability_rows(records: Iterable[HostPatchRecord]) -> list[dict[str, str]]:
    """One row per measured host, then one per update domain, then the run's: the sum of the
    hosts' unavailable seconds, the longest, and the coarsest resolution among them."""
    measured = sorted(((r.host, r.unavailability) for r in records if r.unavailability is not None),
                      key=lambda pair: (pair[1].update_domain, pair[0]))
    if not measured:
        return []
    rows = [_row("host", host, [m], m.probe) for host, m in measured]
    for domain in sorted({m.update_domain for _, m in measured}):
        rows.append(_row("update domain", str(domain), [m for _, m in measured if m.update_domain == domain], ""))
    rows.append(_row("run", "all", [m for _, m in measured], ""))
    return rows


def unavailability_markdown(records: Iterable[HostPatchRecord]) -> list[str]:
    """The summary's section, as lines; none when no host was measured."""
    rows = unavailability_rows(records)
    if not rows:
        return []
    lines = ["## Measured unavailability", "",
             "From the first failed probe to the first passing one after the reboot (or install), "
             "to within the resolution.", "",
             "| scope | name | hosts | unavailable | longest | resolution | still down | probe |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['scope']} | {markdown_text(row['name'])} | {row['hosts']} | {row['unavailable_seconds']} s | "
              f"{row['longest_seconds']} s | ±{row['resolution_seconds']} s | {row['still_down']} | "
              f"{markdown_text(row['probe'])} |" for row in rows]
    return lines + [""]


def unavailability_trend(records: Sequence[HostPatchRecord]) -> str:
    """'unavailable, oldest to newest: 1.8 s (baseline) → 0.0 s (hotpatch)' of a host's records
    given newest first (as history() returns them); empty when none was measured."""
    measured = [r for r in reversed(records) if r.unavailability is not None]
    if not measured:
        return ""
    steps = [f"{r.unavailability.seconds:.1f} s ({r.month_kind})" for r in measured if r.unavailability is not None]
    return "unavailable, oldest to newest: " + " → ".join(steps)


__all__ = ["recovery_markdown", "unavailability_markdown", "unavailability_rows", "unavailability_trend"]
