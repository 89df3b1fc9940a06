"""Measured unavailability: how long a host was down while it was patched, from probing it.

A meter probes the host at a fixed interval from before its install until it answers again
after the reboot gate: with the policy's health probes (all must pass), or, when the policy has
none, with a connect over the host's own transport (a login and a read of its boot identity).
An outage runs from the first failed probe to the first passing one after it; a host that
never failed was unavailable 0 s, to within the interval.

Each probe is timestamped where it proves the most: a failed probe when its failure was seen
(the host was down then), a passing one when it started (the host was up from then). The
error of an outage's length is then at most the gap between the two probes at each of its
edges, which is the interval unless a probe outlasted it; the reported resolution is that
interval, or the wider gap when there was one, so the figure never claims more precision than
the probing had. Prefect-free: the patch task starts a meter around its install and reboot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType

from configs.models import HostConfig
from configs.patch_safety import UnavailabilityProbing
from configs.probes import Probe
from configs.secrets import redact
from connectors import connect
from connectors.base import ConnectorError, RetryPolicy
from tasks.patching.safety.records import Outage, Unavailability
from tasks.probes import check_health, failure_summary

#: A probe: None when the host passed, else what failed.
HostProbe = Callable[[], "str | None"]
#: Extra time finish() allows a probe in flight beyond its own timeout before giving up on it.
_PROBE_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Observation:
    started: float
    ended: float
    ok: bool
    detail: str = ""

    @property
    def evidence(self) -> float:
        """When the probe proved the host's state: its start if it passed, its end if it failed."""
        return self.started if self.ok else self.ended


def measure(observations: Sequence[Observation], *, interval: float, probe: str, update_domain: int,
            wall_at: Callable[[float], datetime]) -> Unavailability:
    """The outages these observations show, in order; `wall_at` turns a monotonic time into a date."""
    outages: list[Outage] = []
    gaps = [interval]
    first_fail: Observation | None = None
    last_pass: Observation | None = None
    last_fail: Observation | None = None
    for obs in observations:
        if not obs.ok:
            if first_fail is None:
                first_fail = obs
                if last_pass is not None:
                    gaps.append(obs.evidence - last_pass.ended)
            last_fail = obs
            continue
        if first_fail is not None and last_fail is not None:
            gaps.append(obs.evidence - last_fail.evidence)
            outages.append(Outage(started_at=wall_at(first_fail.evidence), recovered=True, detail=first_fail.detail,
                                  seconds=max(0.0, obs.evidence - first_fail.evidence)))
            first_fail = None
        last_pass = obs
    if first_fail is not None and last_fail is not None:
        outages.append(Outage(started_at=wall_at(first_fail.evidence), recovered=False, detail=first_fail.detail,
                              seconds=max(0.0, last_fail.evidence - first_fail.evidence)))
    return Unavailability(seconds=sum(o.seconds for o in outages), resolution_seconds=max(gaps),
                          interval_seconds=interval, probe=probe, update_domain=update_domain,
                          probes=len(observations), outages=outages)


class UnavailabilityMeter:
    """Probes a host in a thread of its own from `with` until finish() (or the block's end)."""

    def __init__(self, probe: HostProbe, *, label: str, interval: float, update_domain: int = 0,
                 probe_timeout: float = 60.0) -> None:
        self._probe = probe
        self.label = label
        self.interval = interval
        self.update_domain = update_domain
        self._probe_timeout = probe_timeout
        self._observations: list[Observation] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"unavailability-{label}", daemon=True)
        self._wall, self._mono = datetime.now(timezone.utc), time.monotonic()

    def __enter__(self) -> "UnavailabilityMeter":
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._halt()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                failed = self._probe()
            except Exception as exc:  # noqa: BLE001 - a probe that cannot run saw the host unavailable
                failed = f"{type(exc).__name__}: {exc}"
            ended = time.monotonic()
            with self._changed:
                self._observations.append(Observation(started, ended, failed is None, redact(failed or "")))
                self._changed.notify_all()
            # A probe that outlasted the interval is followed at once; the gap shows in the resolution.
            next_tick = max(next_tick + self.interval, time.monotonic())
            self._stop.wait(next_tick - time.monotonic())

    def _wait_for(self, ready: Callable[[list[Observation]], bool], until: float) -> bool:
        with self._changed:
            while not ready(self._observations):
                left = until - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._changed.wait(left)
            return True

    def finish(self, settle_seconds: float = 0.0) -> Unavailability:
        """Stop probing once a probe begun from now on is in and, while the host still fails,
        for up to `settle_seconds` more until one passes; then the measurement."""
        asked = time.monotonic()
        limit = asked + self.interval + self._probe_timeout + _PROBE_GRACE_SECONDS
        self._wait_for(lambda seen: bool(seen) and seen[-1].started >= asked, limit)
        deadline = time.monotonic() + settle_seconds
        self._wait_for(lambda seen: bool(seen) and seen[-1].ok, deadline)
        self._halt()
        with self._changed:
            seen = list(self._observations)
        return measure(seen, interval=self.interval, probe=self.label, update_domain=self.update_domain,
                       wall_at=lambda mono: self._wall + timedelta(seconds=mono - self._mono))

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def reachability_probe(host: HostConfig, base_dir: Path | None, timeout: float) -> HostProbe:
    """A login over the host's transport and a read of its boot identity, within `timeout`,
    never retried: a retry would hide the very outage being measured."""
    quick = host.model_copy(update={"connect_timeout": timeout})

    def probe() -> str | None:
        conn = connect(quick, base_dir=base_dir, retry=RetryPolicy(attempts=1))
        try:
            conn.boot_identity()
        except ConnectorError as exc:
            return exc.message
        finally:
            conn.close()
        return None

    return probe


def health_probe(host: HostConfig, base_dir: Path | None, probes: Sequence[Probe], timeout: float) -> HostProbe:
    """Every health probe of the policy over a fresh connection; passes only when all pass."""
    quick = host.model_copy(update={"connect_timeout": timeout})

    def probe() -> str | None:
        with connect(quick, base_dir=base_dir, retry=RetryPolicy(attempts=1)) as conn:
            return failure_summary(check_health(host, conn, probes, base_dir=base_dir)) or None

    return probe


def meter_for(host: HostConfig, base_dir: Path | None, settings: UnavailabilityProbing, probes: Sequence[Probe],
              update_domain: int) -> UnavailabilityMeter:
    """The meter a patched host gets: its policy's health probes, or a connect when there are none."""
    if probes:
        label = redact("health probes: " + ", ".join(p.label for p in probes))
        slowest = max(p.timeout_seconds for p in probes) * len(probes) + settings.timeout_seconds
        return UnavailabilityMeter(health_probe(host, base_dir, probes, settings.timeout_seconds), label=label,
                                   interval=settings.interval_seconds, update_domain=update_domain, probe_timeout=slowest)
    label = "local" if host.transport == "local" else f"{host.transport} connect"
    return UnavailabilityMeter(reachability_probe(host, base_dir, settings.timeout_seconds), label=label,
                               interval=settings.interval_seconds, update_domain=update_domain,
                               probe_timeout=settings.timeout_seconds)


__all__ = ["HostProbe", "Observation", "UnavailabilityMeter", "health_probe", "measure", "meter_for",
           "reachability_probe"]
