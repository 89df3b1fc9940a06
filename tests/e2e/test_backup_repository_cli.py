"""Repository integrity from the `patchdrill` command: verify → backup or repair heals a flipped
chunk, prune under a held lock deletes nothing, unlock, weak passphrases; flows on the Prefect
test server, a real local store."""

from __future__ import annotations

import json
import random
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable

import anyio
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from connectors.stores import LocalBlobStore
from flows.backup import backup_run
from tasks.backup.repo.repository import utcnow
from tests.e2e.test_backup_cli import cli, lab  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
Cli = Callable[..., tuple[int, str, str]]


def _flip_a_chunk(store: Path) -> Path:
    victim = next(p for p in sorted((store / "chunks").rglob("*")) if p.is_file())
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    return victim


def _foreign_lock(store: Path, *, kind: str = "backup") -> None:
    now = utcnow().isoformat()
    LocalBlobStore(store).put("locks/elsewhere.json", json.dumps(
        {"kind": kind, "host": "db-7.example", "pid": 4242, "created": now, "refreshed": now}).encode())


def test_a_flipped_chunk_heals_by_backup_and_by_repair(prefect_server: None, lab: Path, tmp_path: Path, cli: Cli) -> None:
    assert cli("backup", "-c", str(lab), "--json")[0] == 0
    _flip_a_chunk(tmp_path / "store")
    assert cli("verify", "-c", str(lab))[0] == 1
    code, out, err = cli("backup", "-c", str(lab), "--json")  # the disk did not change
    assert code == 0, err
    assert [row["repaired_chunks"] for row in json.loads(out)] == [1]
    code, out, err = cli("points", "-c", str(lab), "--json")
    [point] = json.loads(out)  # keep_last: 1
    assert (point["version"], point["policy"], point["tool"]) == (2, "default", package_version("patchdrill"))
    assert point["completed"] >= point["time"] and point["source_path"] is None  # sealed: listed without the key
    code, out, err = cli("verify", "-c", str(lab), "--json")
    assert code == 0 and json.loads(out)["ok"], err

    _flip_a_chunk(tmp_path / "store")
    code, out, err = cli("repair", "-c", str(lab))
    assert code == 0 and "no damage recorded (run `patchdrill verify` first)" in out
    assert cli("verify", "-c", str(lab))[0] == 1
    code, out, err = cli("repair", "-c", str(lab))
    assert code == 0, err
    assert "repaired 1 of 1 damaged chunks; no point remains damaged" in out
    assert cli("verify", "-c", str(lab))[0] == 0

    # Data the live disk no longer holds cannot come back: the point stays damaged, and says so.
    _flip_a_chunk(tmp_path / "store")
    (tmp_path / "disk.img").write_bytes(random.Random(99).randbytes(24 * BLOCK))
    assert cli("verify", "-c", str(lab))[0] == 1
    code, out, err = cli("repair", "-c", str(lab), "--json")
    report = json.loads(out)
    assert code == 1 and report["repaired"] == [] and len(report["damaged_points"]) == 1
    assert report["damaged_points"][0].startswith("points/lab-1/os/")


def test_prune_under_a_held_lock_deletes_nothing_then_unlock(prefect_server: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, cli: Cli) -> None:
    (tmp_path / "disk.img").write_bytes(random.Random(5).randbytes(4 * BLOCK))
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "os", "path": "disk.img"}]}],
        "backup_policies": {"default": {"block_size": BLOCK, "keep_last": 1}, "everything": {"block_size": BLOCK}},
    }))
    for _ in range(3):
        assert cli("backup", "-c", str(cfg), "--policy", "everything", "--json")[0] == 0
    points = sorted((tmp_path / "store" / "points").rglob("*.json"))
    _foreign_lock(tmp_path / "store")

    code, out, err = cli("prune", "-c", str(cfg))
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert "repository busy: a backup lock (locks/elsewhere.json) of pid 4242 on host db-7.example: refreshed" in line
    assert sorted((tmp_path / "store" / "points").rglob("*.json")) == points  # nothing forgotten first

    code, out, err = cli("unlock", "-c", str(cfg))
    assert code == 0 and "still held" in out and (tmp_path / "store" / "locks" / "elsewhere.json").exists()
    code, out, err = cli("unlock", "-c", str(cfg), "--all")
    assert code == 0 and "warning: removed a live lock" in err and "db-7.example" in err
    assert not (tmp_path / "store" / "locks" / "elsewhere.json").exists()

    code, out, err = cli("prune", "-c", str(cfg), "--json")
    assert code == 0, err
    assert len(json.loads(out)["forgotten"]) == 2


def test_an_empty_passphrase_creates_no_repository(lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   cli: Cli, prefect_server: None) -> None:
    monkeypatch.setenv("PD_CLI_REPO_KEY", "")
    code, out, err = cli("backup", "-c", str(lab))
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert "the passphrase from env:PD_CLI_REPO_KEY is empty: a new encrypted repository needs at least 12 characters" in line
    assert not (tmp_path / "store" / "config.json").exists()


def test_nightly_run_shows_prune_deferred_in_its_artifact(prefect_server: None, tmp_path: Path) -> None:
    (tmp_path / "vm.img").write_bytes(random.Random(1).randbytes(8 * BLOCK))
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "vm", "path": "vm.img"}]}],
        "backup_policies": {"nightly": {"block_size": BLOCK, "keep_last": 1}},
    }))
    backup_run(str(cfg))
    _foreign_lock(tmp_path / "store")  # a backup on another host, still running: backups share, prune waits
    backup_run(str(cfg))

    async def descriptions() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["backup-all"])))
        return [a.description or "" for a in found]

    latest = [d for d in anyio.run(descriptions) if "prune deferred" in d]
    assert latest and "repository busy: a backup lock (locks/elsewhere.json) of pid 4242 on host db-7.example" in latest[0]
    assert len(list((tmp_path / "store" / "points").rglob("*.json"))) == 2


def test_repair_rebuilds_a_deleted_index_from_the_command(prefect_server: None, lab: Path, tmp_path: Path,
                                                         cli: Cli) -> None:
    assert cli("backup", "-c", str(lab))[0] == 0
    index = tmp_path / "store" / "index"
    chunks = {p.name for p in (tmp_path / "store" / "chunks").rglob("*") if p.is_file()}
    for leftover in index.iterdir():
        leftover.unlink()
    code, out, err = cli("repair", "-c", str(lab))
    assert code == 0, err
    assert f"index rebuilt from the store's {len(chunks)} chunks (0 stale entries, {len(chunks)} chunks" in out
    assert len(list(index.iterdir())) == 1
    code, out, err = cli("repair", "-c", str(lab), "--json")
    assert code == 0 and json.loads(out)["index"] == {"stored": len(chunks), "stale": 0, "unindexed": 0,
                                                     "unreadable": 0, "rebuilt": False, "folded": 0}
