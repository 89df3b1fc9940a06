"""Direct-to-Azure upload of a Windows host's changed blocks, on Azurite.

No Windows host can run here: the host's side (hash the snapshot's blocks, PUT the changed ones
to the SAS URLs it is given) is done by the test with hashlib and a plain HTTP client, as the
PowerShell scanner would. Everything on the controller's side and the store is real.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import httpx
import pytest

from connectors.storage import AzureBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import SourceError
from tasks.backup.repository import RecoveryPoint, Repository
from tasks.backup.retention import prune
from tasks.backup.restore import restore
from tasks.backup.staged import StagedBlockSource, UploadPlan, plan_upload

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def _hashes(image: bytes) -> list[bytes]:
    return [hashlib.sha256(image[i:i + BLOCK]).digest() for i in range(0, len(image), BLOCK)]


def _host_uploads(plan: UploadPlan, image: bytes) -> None:
    for index, url in plan.urls.items():
        answer = httpx.put(url, content=image[index * BLOCK:(index + 1) * BLOCK], headers={"x-ms-blob-type": "BlockBlob"})
        answer.raise_for_status()


def _backup(repo: Repository, store: AzureBlobStore, image: bytes) -> tuple[UploadPlan, RecoveryPoint]:
    with repo.lock("backup"):
        plan = plan_upload(repo, "win-1", "c", len(image), BLOCK, _hashes(image))
        _host_uploads(plan, image)
        source = StagedBlockSource(store, plan)
        try:
            point = backup(repo, source, BackupRequest(host="win-1", disk="c", consistency="application-consistent",
                                                       snapshot_method="vss", block_size=BLOCK, workers=2))
        finally:
            source.discard()
    return plan, point


def test_windows_blocks_go_straight_to_the_store(azure_store: AzureBlobStore, tmp_path: Path) -> None:
    image = bytearray(random.Random(3).randbytes(20 * BLOCK + 123))
    repo = Repository.open(azure_store, create=True)
    plan, first = _backup(repo, azure_store, bytes(image))
    assert len(plan.urls) == 21 and "sig=" in next(iter(plan.urls.values()))

    image[5 * BLOCK:5 * BLOCK + 10] = b"0123456789"
    image[17 * BLOCK] ^= 0xFF
    plan, second = _backup(repo, azure_store, bytes(image))
    assert sorted(plan.urls) == [5, 17]
    assert second.totals.uploaded_chunks == 2
    assert list(azure_store.list("staging/")) == []
    restore(repo, second, tmp_path / "c.img")
    assert (tmp_path / "c.img").read_bytes() == bytes(image)


def test_a_block_that_does_not_match_its_reported_hash_is_refused(azure_store: AzureBlobStore) -> None:
    image = random.Random(4).randbytes(4 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-2", "c", len(image), BLOCK, _hashes(image))
    tampered = image[:BLOCK] + bytes(BLOCK) + image[2 * BLOCK:]
    _host_uploads(plan, tampered)
    with pytest.raises(SourceError, match="staged block 1 does not match"):
        backup(repo, StagedBlockSource(azure_store, plan), BackupRequest(host="win-2", disk="c", block_size=BLOCK))
    assert list(azure_store.list("points/")) == []
    # The run died without discarding its staging prefix: prune clears it once no backup runs.
    assert len(list(azure_store.list("staging/"))) == 4
    assert prune(repo).staged_deleted == 4
    assert list(azure_store.list("staging/")) == []
