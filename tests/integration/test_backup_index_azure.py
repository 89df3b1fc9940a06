"""On Azure Blob (Azurite), a backup's list calls do not grow with the number of stored chunks:
it reads the index instead of listing chunks/. Every HTTP request is counted as it leaves the SDK."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from azure.storage.blob import ContainerClient

from connectors.stores import AzureBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.repository import Repository
from tasks.backup.sources.local import LocalBlockSource
from tests.hosts.azurite import AzuriteServer, ListRequests

BLOCK = 64 * 1024
#: Listing chunks/ costs a request per 5,000 names; what shows that a backup does not grow with
#: them at any size is that it never lists chunks/ at all (bench/repo_index.py counts requests at
#: 1,000 and 10,000 chunks), so the test stays below a page to stay quick.
EXTRA_CHUNKS = 1_000


@pytest.fixture
def counted(azurite: AzuriteServer) -> Iterator[tuple[AzureBlobStore, ListRequests]]:
    calls = ListRequests()
    container = ContainerClient.from_connection_string(azurite.connection_string, f"t-{uuid.uuid4().hex[:24]}",
                                                       raw_request_hook=calls)
    container.create_container()
    try:
        yield AzureBlobStore(container), calls
    finally:
        container.delete_container()
        container.close()


def _backup_counting(repo: Repository, image: Path, calls: ListRequests, block: int) -> list[str]:
    with open(image, "r+b") as handle:
        handle.seek(block * BLOCK)
        handle.write(random.Random(block + 100).randbytes(BLOCK))
    calls.prefixes.clear()
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="data", block_size=BLOCK, workers=2))
    assert point.totals.uploaded_chunks == 1
    return list(calls.prefixes)


def test_list_calls_per_backup_do_not_grow_with_stored_chunks(counted: tuple[AzureBlobStore, ListRequests],
                                                               tmp_path: Path) -> None:
    store, calls = counted
    repo = Repository.open(store, create=True)
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(8 * BLOCK))
    backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="data", block_size=BLOCK, workers=2))
    small = _backup_counting(repo, image, calls, 0)

    # Other disks' data: thousands of chunks, indexed as their backups would have left them.
    def put(n: int) -> bytes:
        data = n.to_bytes(8, "big") * 8
        chunk_id = repo.codec.chunk_id(data)
        repo.put_chunk(chunk_id, data)
        return chunk_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        extra = set(pool.map(put, range(EXTRA_CHUNKS)))
    repo.write_index(extra)
    assert len(chunk_index.load(repo).ids) > EXTRA_CHUNKS

    large = _backup_counting(repo, image, calls, 1)
    assert large == small, f"{len(small)} list calls at 9 chunks, {len(large)} at {EXTRA_CHUNKS + 10}"
    assert "index/" in small and not any(prefix.startswith("chunks/") for prefix in small + large)
