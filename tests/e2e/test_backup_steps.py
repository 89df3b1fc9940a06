"""The backup flow shows its runbook: per disk, snapshot, scan and upload, recovery point and
snapshot removal are task runs of their own on a real Prefect server, and removal runs (and is
recorded) when the upload fails, leaving nothing of the snapshot on the host."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import anyio
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import TaskRun
from prefect.client.schemas.sorting import TaskRunSort

from flows.backup import backup_run
from tests.hosts.loopfs import xfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
STEPS = ("snapshot", "scan and upload", "recovery point", "remove snapshot")
FINAL = {"Completed", "Failed", "Crashed", "Cancelled", "RolledBack"}


def _task_runs(flow_run_id: UUID) -> list[TaskRun]:
    async def fetch() -> list[TaskRun]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return anyio.run(fetch)


def _messages(flow_run_id: UUID) -> list[str]:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # run logs are shipped in batches; send what is buffered

    async def fetch() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return [entry.message for entry in logs]
    return anyio.run(fetch)


def _steps_of(runs: list[TaskRun], disk: str) -> list[tuple[str, str]]:
    """(step, state) of one disk's step runs, in the order they started."""
    ordered = sorted((r for r in runs if r.start_time is not None), key=lambda r: r.start_time)  # type: ignore[arg-type, return-value]
    return [(step, r.state_name or "") for r in ordered for step in STEPS if r.name == f"{step} lab-1/{disk}"]


def _recorded_steps(flow_run_id: UUID, disk: str, count: int) -> list[tuple[str, str]]:
    """The disk's step runs once the server has recorded `count` of them in a final state: task
    run states reach it as events, written a moment after the flow itself has returned."""
    deadline = time.monotonic() + 120
    while True:
        runs = _task_runs(flow_run_id)
        steps = _steps_of(runs, disk)
        disk_runs = [r.state_name for r in runs if r.name == f"backup lab-1/{disk}"]
        settled = len(steps) >= count and all(state in FINAL for _, state in steps) and disk_runs \
            and all(state in FINAL for state in disk_runs)
        if settled or time.monotonic() > deadline:
            return steps
        time.sleep(0.5)


def _config(tmp_path: Path, image: Path, store: Path) -> Path:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": str(store)},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "vm", "path": str(image), "kind": "block"}]}],
        "backup_policies": {"nightly": {"block_size": BLOCK}},
    }))
    return cfg


def test_each_step_of_a_disk_is_a_task_run_in_runbook_order(prefect_server: None, tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(random.Random(1).randbytes(8 * BLOCK))
    state = backup_run(str(_config(tmp_path, image, tmp_path / "store")), policy="nightly", return_state=True)
    assert state.is_completed(), state.message
    assert _recorded_steps(state.state_details.flow_run_id, "vm", 4) == [(step, "Completed") for step in STEPS]
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.state_name for r in runs if r.name == "backup lab-1/vm"] == ["Completed"]


@pytest.fixture
def full_store(tmp_path: Path) -> Iterator[Path]:
    """A store on a 64 KiB tmpfs: the repository's config fits, a chunk does not (ENOSPC)."""
    store = tmp_path / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield store
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_failing_upload_still_removes_the_snapshot(prefect_server: None, tmp_path: Path, xfs: Path,  # noqa: F811
                                                     full_store: Path) -> None:
    """A real reflink clone on XFS, and a store that runs out of space at the first chunk."""
    image = xfs / "vm.img"
    image.write_bytes(random.Random(2).randbytes(8 * BLOCK))
    state = backup_run(str(_config(tmp_path, image, full_store)), policy="nightly", return_state=True)
    assert state.is_failed()
    assert _recorded_steps(state.state_details.flow_run_id, "vm", 3) == [
        ("snapshot", "Completed"), ("scan and upload", "Failed"), ("remove snapshot", "Completed")]
    # The snapshot really was a clone beside the image, and it is gone.
    messages = _messages(state.state_details.flow_run_id)
    assert any("snapshot.taken" in m and "reflink" in m for m in messages), messages
    assert any("snapshot.removed" in m for m in messages), messages
    assert sorted(p.name for p in xfs.iterdir()) == ["vm.img"]
    assert not list(full_store.glob("points/**/*.json"))
