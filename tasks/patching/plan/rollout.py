"""Availability-first rollout: batches by update domain, bounded concurrency, a failure budget.

Rules the planner and the state machine keep, whatever order results arrive in:
- update domains go one at a time, in ascending order; a batch never mixes two;
- a batch holds at most `max_concurrency` hosts (a count, or a share of its domain's hosts,
  at least one), and the next batch starts only when every host of the current one is recorded;
- once failures exceed `max_errors` (a count, or a share of the scheduled hosts) no new batch
  starts, while hosts already in flight are still recorded;
- a host outside its maintenance window is never scheduled: it is reported with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from configs.policies import Quota


@dataclass(frozen=True)
class RolloutHost:
    """What the planner needs to know of a host; the flow fills it from config and enrollment."""

    name: str
    update_domain: int
    in_window: bool = True
    window: str = ""  # its maintenance window in words, for the dry-run plan and skip reasons
    expects_reboot: bool = False


class Batch(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int = Field(description="1-based position in the rollout.")
    update_domain: int
    hosts: list[str]


class RolloutPlan(BaseModel):
    """The whole rollout decided up front: what `--dry-run` prints and what `Rollout` drives."""

    model_config = ConfigDict(frozen=True)

    batches: list[Batch]
    skipped: dict[str, str] = Field(description="Host → why it is not scheduled.")
    allowed_failures: int = Field(description="Failures tolerated; one more stops new batches.")
    concurrency: dict[int, int] = Field(description="Update domain → hosts per batch.")
    windows: dict[str, str] = Field(description="Host → its maintenance window as seen at planning time.")
    expected_reboots: list[str]

    @property
    def scheduled(self) -> list[str]:
        return [host for batch in self.batches for host in batch.hosts]

    def as_text(self) -> str:
        lines = [
            f"Rollout: {len(self.scheduled)} host(s) in {len(self.batches)} batch(es); "
            f"stops after {self.allowed_failures + 1} failure(s)",
        ]
        for batch in self.batches:
            reboots = [h for h in batch.hosts if h in self.expected_reboots]
            suffix = f"  (reboot: {', '.join(reboots)})" if reboots else ""
            lines.append(f"  batch {batch.index}  update domain {batch.update_domain}  {', '.join(batch.hosts)}{suffix}")
        if self.skipped:
            lines.append("Skipped:")
            lines.extend(f"  {host}: {reason}" for host, reason in self.skipped.items())
        if self.windows:
            lines.append("Windows:")
            lines.extend(f"  {host}: {window}" for host, window in self.windows.items())
        return "\n".join(lines)


def plan(hosts: Iterable[RolloutHost], max_concurrency: Quota, max_errors: Quota) -> RolloutPlan:
    hosts = list(hosts)
    seen: set[str] = set()
    for host in hosts:
        if host.name in seen:
            raise ValueError(f"host {host.name!r} appears twice in the rollout")
        seen.add(host.name)
    eligible = [h for h in hosts if h.in_window]
    skipped = {h.name: f"outside its maintenance window ({h.window or 'no window'})" for h in hosts if not h.in_window}
    batches: list[Batch] = []
    concurrency: dict[int, int] = {}
    for domain in sorted({h.update_domain for h in eligible}):
        members = [h.name for h in eligible if h.update_domain == domain]
        size = max_concurrency.of(len(members), at_least=1)
        concurrency[domain] = size
        for start in range(0, len(members), size):
            batches.append(Batch(index=len(batches) + 1, update_domain=domain, hosts=members[start:start + size]))
    return RolloutPlan(
        batches=batches,
        skipped=skipped,
        allowed_failures=max_errors.of(len(eligible)),
        concurrency=concurrency,
        windows={h.name: h.window for h in hosts if h.window},
        expected_reboots=[h.name for h in eligible if h.expects_reboot],
    )


class Rollout:
    """The state machine a patch flow drives: take a batch, run its hosts, record each result.

        rollout = Rollout(plan(...))
        while (batch := rollout.next_batch()) is not None:
            for host, ok in run_concurrently(batch.hosts):
                rollout.record(host, ok)
    """

    def __init__(self, rollout_plan: RolloutPlan) -> None:
        self.plan = rollout_plan
        self._pending = list(rollout_plan.batches)
        self._in_flight: set[str] = set()
        self.started: list[Batch] = []
        self.succeeded: list[str] = []
        self.failed: dict[str, str] = {}
        self._stopped: str | None = None

    def stop(self, reason: str) -> None:
        """Start no new batch (the run was cancelled or asked to stop); the one running ends."""
        self._stopped = self._stopped or reason

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    @property
    def budget_exceeded(self) -> bool:
        return len(self.failed) > self.plan.allowed_failures

    @property
    def stop_reason(self) -> str | None:
        if self._stopped:
            return f"{self._stopped}: no new batch was started"
        if not self.budget_exceeded:
            return None
        return (f"{len(self.failed)} failure(s) exceed the budget of {self.plan.allowed_failures}: "
                "no new batch was started")

    @property
    def not_started(self) -> list[str]:
        """Hosts the rollout never touched (left for a later run when it stopped)."""
        return [host for batch in self._pending for host in batch.hosts]

    @property
    def finished(self) -> bool:
        return not self._in_flight and (not self._pending or self.budget_exceeded or self._stopped is not None)

    def next_batch(self) -> Batch | None:
        """The next batch to start, or None when the rollout is done, stopped or out of budget."""
        if self._in_flight:
            raise RuntimeError(
                f"batch {self.started[-1].index} is still running ({', '.join(sorted(self._in_flight))}): "
                "record every host before asking for the next batch"
            )
        if self.budget_exceeded or self._stopped is not None or not self._pending:
            return None
        batch = self._pending.pop(0)
        self._in_flight.update(batch.hosts)
        self.started.append(batch)
        return batch

    def record(self, host: str, ok: bool, reason: str = "") -> None:
        """A host's final result: install, reboot gate and health probes all count."""
        if host not in self._in_flight:
            raise ValueError(f"host {host!r} is not in flight: it was never started or is already recorded")
        self._in_flight.discard(host)
        if ok:
            self.succeeded.append(host)
        else:
            self.failed[host] = reason or "failed"


__all__ = ["Batch", "Rollout", "RolloutHost", "RolloutPlan", "plan"]
