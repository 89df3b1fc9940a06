"""A plan's failover state kept in Azure Blob (Azurite): which failover is in effect, what may
start next, commit by a run id's prefix, a failback closing the failover."""

from __future__ import annotations

from datetime import timedelta

import pytest

from connectors.stores import AzureBlobStore
from tasks.drill.evidence import DrillEvidence, Step, utcnow
from tasks.drill.failover import (
    FailoverError, active_failover, check_can_start, commit_failover, failover_state, store_evidence,
)

pytestmark = pytest.mark.integration


def _run(run_id: str, kind: str, outcome: str, minutes: int, *steps: str) -> DrillEvidence:
    started = utcnow() + timedelta(minutes=minutes)
    return DrillEvidence(run_id=run_id, kind=kind, plan="pg", plan_version="v1", operator="ops",  # type: ignore[arg-type]
                         started=started, outcome=outcome, rto_target_seconds=600,  # type: ignore[arg-type]
                         rpo_target_seconds=3600,
                         steps=[Step(name=s, started=started, finished=started, ok=True) for s in steps])


def test_the_plans_state_follows_its_runs_in_the_store(azure_store: AzureBlobStore) -> None:
    assert check_can_start(azure_store, "pg", "planned-failover") is None
    with pytest.raises(FailoverError, match="no failover in effect"):
        check_can_start(azure_store, "pg", "failback")

    # A failover stopped after it stopped the primary blocks the next one until cancelled.
    store_evidence(azure_store, _run("aaaa1111", "planned-failover", "cancelled", 0, "stop-primary"))
    assert failover_state(active_failover(azure_store, "pg")) == "cancelled part-way, not committed: cancel it"  # type: ignore[arg-type]
    with pytest.raises(FailoverError, match="aaaa1111 of plan pg ended cancelled part-way: cancel it first"):
        check_can_start(azure_store, "pg", "unplanned-failover")
    store_evidence(azure_store, _run("aaaa1111", "planned-failover", "cancelled", 0, "stop-primary", "cancel"))
    assert active_failover(azure_store, "pg") is None

    # A passed failover is in effect: no second failover, no failback before its commit.
    store_evidence(azure_store, _run("bbbb2222", "unplanned-failover", "passed", 1, "restore", "start", "probe"))
    with pytest.raises(FailoverError, match="already serves from its copies"):
        check_can_start(azure_store, "pg", "planned-failover")
    with pytest.raises(FailoverError, match="is not committed"):
        check_can_start(azure_store, "pg", "failback")
    assert failover_state(commit_failover(azure_store, "bbbb", "ops")) == "committed"
    undone = check_can_start(azure_store, "pg", "failback")
    assert undone is not None and undone.run_id == "bbbb2222"

    # Failed back: the plan is home, a new failover may start.
    store_evidence(azure_store, _run("cccc3333", "failback", "passed", 2, "restore", "start", "probe"))
    assert active_failover(azure_store, "pg") is None
    assert check_can_start(azure_store, "pg", "planned-failover") is None
