"""Probes in a drill, through the one probe runner (tasks/probes.py): the primary's steady state
(as the patch pipeline's health checks run, read-only), and the copy's probes, run on the DR
target inside the copy's network namespace, which nothing outside it can reach.

The copy's probes may use the member's templates ({root}, {disk:NAME}) in their text fields;
they are retried as a round until all pass or the member's ready wait runs out, since an
application takes a moment to listen after it starts. Checksum probes compare restored files
with the recovery point they came from (digests read from the repository, tasks/drill/copy.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from configs.models import HostConfig
from configs.probes import ChecksumProbe, Probe
from connectors.agent import ScriptAgent
from connectors.base import Connector
from tasks.drill.evidence import ProbePhase, ProbeRecord, utcnow
from tasks.probes import ExpectedDigests, ProbeContext, ProbeResult, run_probes

#: Seconds between two rounds of a copy's probes while it starts: the first retry comes soon
#: (most copies are up by then and every wasted moment is RTO), later ones back off to the last.
RETRY_INTERVALS = (0.05, 0.1, 0.2, 0.5)


def _record(member: str, phase: ProbePhase, result: ProbeResult) -> ProbeRecord:
    return ProbeRecord(member=member, phase=phase, probe=result.probe, ok=result.ok, detail=result.detail,
                       seconds=round(result.seconds, 3), at=utcnow(), observed=result.observed)


def primary_probes(member: str, phase: ProbePhase, host: HostConfig, connector: Connector, probes: list[Probe],
                   base_dir: Path | None = None) -> list[ProbeRecord]:
    """The primary's steady-state probes, as its health checks run (read-only)."""
    ctx = ProbeContext.for_host(host, connector, base_dir=base_dir)
    return [_record(member, phase, r) for r in run_probes(ctx, probes)]


def fill_templates(probe: Probe, values: Mapping[str, str]) -> Probe:
    """The probe with {root}, {disk:NAME}… replaced in its text fields (other braces stay)."""
    def fill(value: object) -> object:
        if isinstance(value, str):
            for key, text in values.items():
                value = value.replace("{" + key + "}", text)
        elif isinstance(value, list):
            return [fill(v) for v in value]
        return value

    return type(probe).model_validate({k: fill(v) for k, v in probe.model_dump().items()})  # type: ignore[return-value]


def copy_probes(member: str, target: HostConfig, connector: Connector, probes: list[Probe], *,
                prefix: str, values: Mapping[str, str], expected: ExpectedDigests | None,
                wait_seconds: float, base_dir: Path | None = None,
                stopped: Callable[[], bool] = lambda: False, agent: ScriptAgent | None = None) -> list[ProbeRecord]:
    """Every probe of the copy, retried as a round until all pass or wait_seconds ran out; the
    last round is what the evidence keeps. Network probes address the copy on loopback."""
    filled = [fill_templates(p, values) for p in probes]
    ctx = ProbeContext(name=f"{target.name} (copy of {member})", address="127.0.0.1", connector=connector,
                       os_family=target.os_family, prefix=prefix, base_dir=base_dir, expected_digests=expected,
                       agent=agent)
    deadline = time.monotonic() + wait_seconds
    intervals = iter(RETRY_INTERVALS)
    while True:
        results = run_probes(ctx, filled)
        if all(r.ok for r in results) or time.monotonic() >= deadline or stopped():
            return [_record(member, "copy", r) for r in results]
        time.sleep(next(intervals, RETRY_INTERVALS[-1]))


def checksum_paths(probe: ChecksumProbe, disks: Mapping[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """The disk a checksum probe reads and (path in the point, path on the target) per file."""
    disk = probe.disk or (next(iter(disks)) if len(disks) == 1 else "")
    if disk not in disks:
        raise ValueError(f"checksum probe: name one of the member's disks ({', '.join(disks)}) with disk:")
    return disk, [(path, f"{disks[disk].rstrip('/')}/{path}") for path in probe.paths]
