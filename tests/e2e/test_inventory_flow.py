"""A whole flow on a real Prefect test server: task runs, structlog events in the run's logs,
the table artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId

from flows.inventory import inventory_check
from tests.config_reads import count_config_reads

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_inventory_flow_logs_and_artifact(prefect_server: None, tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [
            {"name": "here", "transport": "local"},
            {"name": "gone", "transport": "ssh", "address": "127.0.0.1", "port": 1, "user": "u", "connect_timeout": 1},
        ],
    }))
    state = inventory_check(str(cfg), return_state=True)
    rows = {r.host: r for r in state.result()}
    assert rows["here"].reachable and not rows["gone"].reachable

    import anyio

    async def fetch() -> tuple[list[str], list[dict]]:  # type: ignore[type-arg]
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["inventory-all"])))
        return [entry.message for entry in logs], [a.data for a in arts]

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # run logs are shipped in batches; send what is buffered
    messages, artifacts = anyio.run(fetch)
    assert any("host up" in m and "here" in m for m in messages), messages
    assert any("host unreachable" in m and "gone" in m for m in messages), messages
    assert artifacts and any("gone" in str(data) for data in artifacts)


def test_inventory_flow_reads_its_config_once(prefect_server: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ping task gets its host's settings from the flow, not the config path to read again."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"},
                                   "hosts": [{"name": f"here-{i}", "transport": "local"} for i in range(3)]}))
    reads = count_config_reads(monkeypatch)

    rows = inventory_check(str(cfg))

    assert sorted(r.host for r in rows if r.reachable) == ["here-0", "here-1", "here-2"]
    assert reads == [str(cfg)]
