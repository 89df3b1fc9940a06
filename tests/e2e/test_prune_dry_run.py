"""`patchdrill prune --dry-run` reports what the real prune then frees, and deletes nothing: from the
command, with flows on the Prefect test server, on a local store and on Azurite."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pytest
import yaml

from connectors.stores import BlobStore, LocalBlobStore
from tests.e2e.test_backup_cli import cli  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
BLOCKS = 16
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(params=["local", "azure"])
def repository(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, object], BlobStore]:
    """The config's storage section and a store to look into the same repository with."""
    if request.param == "local":
        return {"kind": "local", "path": "store"}, LocalBlobStore(tmp_path / "store")
    azure_store = request.getfixturevalue("azure_store")
    monkeypatch.setenv("PD_PRUNE_AZURE", request.getfixturevalue("azurite_connection_string"))
    return ({"kind": "azure", "container": request.getfixturevalue("azure_container_name"),
             "connection_string": "env:PD_PRUNE_AZURE"}, azure_store)


def _contents(store: BlobStore) -> dict[str, int]:
    return {info.key: info.size for info in store.list()}


def _rewrite_half(image: Path, seed: int) -> None:
    with open(image, "r+b") as handle:
        for index in range(0, BLOCKS, 2):
            handle.seek(index * BLOCK)
            handle.write(random.Random(seed * 1000 + index).randbytes(BLOCK))


def test_dry_run_counts_what_the_real_prune_deletes(prefect_server: None, tmp_path: Path, cli: Cli,
                                                    repository: tuple[dict[str, object], BlobStore]) -> None:
    storage, store = repository
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(BLOCKS * BLOCK))
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump({
        "storage": storage,
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "os", "path": "disk.img"}]}],
        "backup_policies": {"default": {"block_size": BLOCK, "keep_last": 1}, "everything": {"block_size": BLOCK}},
    }))
    for seed in range(3):  # three points; each older one alone holds half a disk of chunks
        _rewrite_half(image, seed)
        code, _, err = cli("backup", "-c", str(config), "--policy", "everything", "--json")
        assert code == 0, err
    before = _contents(store)

    code, out, err = cli("prune", "-c", str(config), "--dry-run", "--json")
    assert code == 0, err
    dry = json.loads(out)
    assert _contents(store) == before, "the dry run changed the repository"
    assert (len(dry["forgotten"]), dry["chunks_deleted"], dry["maps_deleted"]) == (2, 2 * BLOCKS // 2, 2)
    assert dry["dry_run"] and dry["bytes_freed"] > 2 * BLOCKS // 2 * BLOCK  # random data does not compress

    code, out, err = cli("prune", "-c", str(config), "--json")
    assert code == 0, err
    real = json.loads(out)
    after = _contents(store)
    gone = {key: size for key, size in before.items() if key not in after}
    assert {name: real[name] for name in ("forgotten", "chunks_deleted", "maps_deleted", "chunks_kept", "bytes_freed")} \
        == {name: dry[name] for name in ("forgotten", "chunks_deleted", "maps_deleted", "chunks_kept", "bytes_freed")}
    assert sum(1 for key in gone if key.startswith("chunks/")) == real["chunks_deleted"]
    # What went is the chunks, the maps, the two forgotten points' files and the index files prune
    # consolidated: bytes_freed is the data.
    assert sum(size for key, size in gone.items() if key.startswith(("chunks/", "maps/"))) == real["bytes_freed"]

    code, out, err = cli("prune", "-c", str(config), "--dry-run")
    assert code == 0 and "would forget 0 points; would delete 0 chunks and 0 maps" in out, out + err
