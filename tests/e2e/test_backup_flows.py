"""backup_run, restore_run and verify_run as real Prefect flows on the test server."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.backup import backup_run
from flows.restore import restore_run
from flows.verify import verify_run

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024


def _config(tmp_path: Path, *, extra_disk: bool = False) -> Path:
    data = tmp_path / "data"
    (data / "etc").mkdir(parents=True, exist_ok=True)
    (data / "etc" / "app.conf").write_text("port = 8080\n")
    (data / "etc" / "link").symlink_to("app.conf")
    (tmp_path / "vm.img").write_bytes(random.Random(1).randbytes(40 * BLOCK))
    disks = [{"name": "vm", "path": "vm.img", "kind": "block"}, {"name": "etc", "path": "data", "kind": "directory"}]
    if extra_disk:
        disks.append({"name": "gone", "path": "no-such.img", "kind": "block"})
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": disks}],
        "backup_policies": {"nightly": {"block_size": BLOCK, "keep_last": 2, "max_parallel_disks": 2}},
    }))
    return cfg


def _artifact(key: str) -> list[dict]:  # type: ignore[type-arg]
    async def fetch() -> list[dict]:  # type: ignore[type-arg]
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return [a.data for a in found]
    return anyio.run(fetch)


def test_backup_then_restore_as_flows(prefect_server: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    first = backup_run(str(cfg), policy="nightly")
    assert {(r.disk, r.status, r.consistency) for r in first} == {
        ("vm", "ok", "crash-consistent"), ("etc", "ok", "crash-consistent")}

    with open(tmp_path / "vm.img", "r+b") as handle:
        handle.seek(7 * BLOCK)
        handle.write(random.Random(2).randbytes(BLOCK))
    second = {r.disk: r for r in backup_run(str(cfg), policy="nightly")}
    assert second["vm"].changed_bytes == BLOCK and second["vm"].uploaded_bytes == BLOCK
    assert second["etc"].uploaded_bytes == 0
    backup_run(str(cfg), policy="nightly")
    points = sorted(p.name for p in (tmp_path / "store" / "points" / "lab-1" / "vm").iterdir())
    assert len(points) == 2  # keep_last: 2 applied after the third run
    assert any("lab-1" in str(data) and "vm" in str(data) for data in _artifact("backup-all-nightly"))

    result = restore_run(str(cfg), "lab-1", "vm", str(tmp_path / "restored.img"), policy="nightly")
    assert (tmp_path / "restored.img").read_bytes() == (tmp_path / "vm.img").read_bytes()
    assert result.point.endswith(points[-1])
    restore_run(str(cfg), "lab-1", "etc", str(tmp_path / "etc-out"), policy="nightly")
    assert (tmp_path / "etc-out" / "etc" / "app.conf").read_text() == "port = 8080\n"
    assert (tmp_path / "etc-out" / "etc" / "link").readlink() == Path("app.conf")

    report = verify_run(str(cfg), policy="nightly")
    assert report.ok and report.chunks_checked > 0


def test_a_failing_disk_fails_the_run_but_not_the_others(prefect_server: None, tmp_path: Path) -> None:
    cfg = _config(tmp_path, extra_disk=True)
    state = backup_run(str(cfg), policy="nightly", return_state=True)
    assert state.is_failed()
    assert "lab-1/gone" in str(state.message) or "no-such.img" in str(state.message)
    assert len(list((tmp_path / "store" / "points" / "lab-1").iterdir())) == 2
    rows = [row for data in _artifact("backup-all-nightly") for row in (json.loads(data) if isinstance(data, str) else data)]
    assert {(row["disk"], row["status"]) for row in rows} >= {("gone", "failed"), ("vm", "ok"), ("etc", "ok")}
    assert "no-such.img" in next(row["error"] for row in rows if row["disk"] == "gone")


def test_each_flow_run_reads_the_config_once(prefect_server: None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow loads and validates the file; its tasks get typed models, never the path."""
    import sys

    import configs.loader

    original = configs.loader.load_config
    reads: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(str(args[0]))
        return original(*args, **kwargs)

    # Every module that imported the loader by name, so no reader escapes the count.
    for module in list(sys.modules.values()):
        if getattr(module, "load_config", None) is original:
            monkeypatch.setattr(module, "load_config", counted)
    cfg = _config(tmp_path)
    assert {r.status for r in backup_run(str(cfg), policy="nightly")} == {"ok"}
    assert len(reads) == 1, reads
    restore_run(str(cfg), "lab-1", "vm", str(tmp_path / "restored.img"), policy="nightly")
    assert len(reads) == 2, reads
    assert verify_run(str(cfg), policy="nightly").ok
    assert reads == [str(cfg)] * 3
