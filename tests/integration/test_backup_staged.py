"""Direct-to-Azure upload of a Windows host's changed blocks, on Azurite.

No Windows host can run here: the host's side (hash the snapshot's blocks, PUT the changed ones
to the SAS URLs it is given) is done by the test with hashlib and a plain HTTP client, as the
PowerShell scanner would. A hostile host does the same with its URLs: lease, snapshot, Put
Block, oversized PUTs, all sent to the real Azurite. Everything on the controller's side and the
store is real.
"""

from __future__ import annotations

import base64
import hashlib
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from azure.storage.blob import ContainerClient

from configs.secrets import redact, remembered_count
from connectors.stores import AzureBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import SourceError
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.repo.retention import prune
from tasks.backup.sources.base import BufferPool
from tasks.backup.restore import restore
from tasks.backup.sources.windows_direct_upload import BYTES_PER_CALL, StagedBlockSource, UploadPlan, plan_upload, sign_batch, url_lifetime
from tests.hosts.azurite import AzuriteServer

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def _hashes(image: bytes) -> list[bytes]:
    return [hashlib.sha256(image[i:i + BLOCK]).digest() for i in range(0, len(image), BLOCK)]


def _signed_urls(store: AzureBlobStore, plan: UploadPlan) -> dict[int, str]:
    return {i: url for batch in plan.batches() for i, url in sign_batch(store, plan, batch).urls.items()}


def _host_uploads(store: AzureBlobStore, plan: UploadPlan, image: bytes) -> dict[int, str]:
    urls = _signed_urls(store, plan)
    for index, url in urls.items():
        answer = httpx.put(url, content=image[index * BLOCK:(index + 1) * BLOCK], headers={"x-ms-blob-type": "BlockBlob"})
        answer.raise_for_status()
    return urls


def _backup(repo: Repository, store: AzureBlobStore, image: bytes) -> tuple[UploadPlan, RecoveryPoint]:
    with repo.lock("backup"):
        plan = plan_upload(repo, "win-1", "c", len(image), BLOCK, _hashes(image))
        _host_uploads(store, plan, image)
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
    assert plan.changed == tuple(range(21))

    image[5 * BLOCK:5 * BLOCK + 10] = b"0123456789"
    image[17 * BLOCK] ^= 0xFF
    plan, second = _backup(repo, azure_store, bytes(image))
    assert plan.changed == (5, 17)
    assert second.totals.uploaded_chunks == 2
    assert list(azure_store.list("staging/")) == []
    restore(repo, second, tmp_path / "c.img")
    assert (tmp_path / "c.img").read_bytes() == bytes(image)


def test_a_block_that_does_not_match_its_reported_hash_is_refused(azure_store: AzureBlobStore) -> None:
    image = random.Random(4).randbytes(4 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-2", "c", len(image), BLOCK, _hashes(image))
    tampered = image[:BLOCK] + bytes(BLOCK) + image[2 * BLOCK:]
    _host_uploads(azure_store, plan, tampered)
    with pytest.raises(SourceError, match="staged block 1 does not match"):
        backup(repo, StagedBlockSource(azure_store, plan), BackupRequest(host="win-2", disk="c", block_size=BLOCK))
    assert list(azure_store.list("points/")) == []
    # The run died without discarding its staging prefix: prune clears it once no backup runs.
    assert len(list(azure_store.list("staging/"))) == 4
    assert prune(repo).staged_deleted == 4
    assert list(azure_store.list("staging/")) == []


# A host that uses its write URLs for more than uploading ------------------------------------------

def _lease_forever(url: str) -> None:
    """What a write SAS also allows: an infinite lease, taken with the host's own upload URL."""
    answer = httpx.put(url + "&comp=lease", headers={"x-ms-lease-action": "acquire", "x-ms-lease-duration": "-1"})
    assert answer.status_code == 201, answer.text


def _snapshot(url: str) -> None:
    answer = httpx.put(url + "&comp=snapshot")
    assert answer.status_code == 201, answer.text


def _everything_staged(store: AzureBlobStore) -> list[str]:
    """Staging as the service holds it: committed, uncommitted and snapshots."""
    names = store.container.list_blobs(name_starts_with="staging/", include=["snapshots", "uncommittedblobs"])
    return [blob.name for blob in names]


@pytest.mark.parametrize("hostile", [_lease_forever, _snapshot], ids=["leased", "snapshotted"])
def test_a_leased_or_snapshotted_staging_blob_neither_fails_the_point_nor_stays(
        azure_store: AzureBlobStore, hostile: Callable[[str], None]) -> None:
    image = random.Random(5).randbytes(6 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    with repo.lock("backup"):
        plan = plan_upload(repo, "win-3", "c", len(image), BLOCK, _hashes(image))
        urls = _host_uploads(azure_store, plan, image)
        for url in list(urls.values())[:3]:
            hostile(url)
        source = StagedBlockSource(azure_store, plan)
        point = backup(repo, source, BackupRequest(host="win-3", disk="c", block_size=BLOCK))
        cleanup = source.discard()
    assert (cleanup.deleted, cleanup.left) == (6, [])
    assert _everything_staged(azure_store) == []
    assert repo.find_point("win-3", "c", None).key == point.key


def test_prune_removes_leased_and_snapshotted_leftovers_of_a_killed_run(azure_store: AzureBlobStore) -> None:
    image = random.Random(6).randbytes(3 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-4", "c", len(image), BLOCK, _hashes(image))
    urls = _host_uploads(azure_store, plan, image)
    _lease_forever(urls[0])
    _snapshot(urls[1])
    _snapshot(urls[2])
    _lease_forever(urls[2])
    report = prune(repo)
    assert (report.staged_deleted, report.staged_left) == (3, 0)
    assert _everything_staged(azure_store) == []


def test_a_staging_blob_that_cannot_be_deleted_is_a_warning_for_prune(
        azure_store: AzureBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that takes its lease again the moment it is broken. Azurite cannot race us on cue,
    so the host's re-acquire (through its own URL, for real) is hooked in right after each break."""
    image = random.Random(7).randbytes(2 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-5", "c", len(image), BLOCK, _hashes(image))
    urls = _host_uploads(azure_store, plan, image)
    _lease_forever(urls[1])
    original = AzureBlobStore._break_lease

    def break_then_host_leases_again(self: AzureBlobStore, name: str, key: str) -> None:
        original(self, name, key)
        _lease_forever(urls[int(key.rsplit("/", 1)[1])])

    monkeypatch.setattr(AzureBlobStore, "_break_lease", break_then_host_leases_again)
    report = prune(repo)
    assert (report.staged_deleted, report.staged_left) == (1, 1)
    monkeypatch.undo()
    assert prune(repo).staged_deleted == 1
    assert _everything_staged(azure_store) == []


def test_uncommitted_blocks_put_by_a_host_are_found_and_removed(azure_store: AzureBlobStore) -> None:
    """Azurite keeps uncommitted blocks and lists them with include=uncommittedblobs, as Azure does."""
    image = random.Random(8).randbytes(2 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-6", "c", len(image), BLOCK, _hashes(image))
    url = _signed_urls(azure_store, plan)[0]
    block_id = base64.b64encode(b"block-0").decode()
    answer = httpx.put(f"{url}&comp=block&blockid={quote(block_id, safe='')}", content=image[:BLOCK])
    assert answer.status_code == 201, answer.text
    assert list(azure_store.list("staging/")) == []  # invisible to a plain listing
    assert _everything_staged(azure_store) == [plan.key(0)]
    assert prune(repo).staged_deleted == 1
    assert _everything_staged(azure_store) == []


class _CountingDownloads:
    """Bytes the service sent for GETs of staging blobs, seen on the SDK's own responses."""

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, response: Any) -> None:
        request = response.http_request
        if request.method == "GET" and "/staging/" in request.url:
            self.bytes += int(response.http_response.headers.get("Content-Length", 0))


def test_an_oversized_staged_blob_is_refused_unread(azurite: AzuriteServer, azure_store: AzureBlobStore) -> None:
    image = random.Random(9).randbytes(3 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-7", "c", len(image), BLOCK, _hashes(image))
    urls = _host_uploads(azure_store, plan, image)
    answer = httpx.put(urls[0], content=bytes(8 * 1024 * 1024), headers={"x-ms-blob-type": "BlockBlob"})
    assert answer.status_code == 201
    downloads = _CountingDownloads()
    counted = ContainerClient.from_connection_string(azurite.connection_string, azure_store.container.container_name,
                                                     raw_response_hook=downloads)
    store = AzureBlobStore(counted, create_container=False)
    with pytest.raises(SourceError, match="staged block 0 is 8388608 bytes, not 65536: refused unread"):
        backup(Repository.open(store), StagedBlockSource(store, plan), BackupRequest(host="win-7", disk="c",
                                                                                   block_size=BLOCK))
    assert downloads.bytes == 0
    assert list(azure_store.list("points/")) == []


# Signing: per batch, with lifetimes that fit the batch, and without slowing down ----------------

def test_thirty_thousand_urls_are_signed_per_batch_with_constant_redaction_work(azure_store: AzureBlobStore) -> None:
    """Linear work, counted rather than timed: each URL is signed once, and the redaction set —
    which every log line and message walks — does not grow with them (bench/sas_signing.py times it)."""
    blocks = 30_000
    repo = Repository.open(azure_store, create=True)
    fingerprints = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(blocks)]
    plan = plan_upload(repo, "win-8", "c", blocks * 4096, 4096, fingerprints)
    assert len(plan.changed) == blocks
    remembered = remembered_count()
    signed: list[str] = []
    for batch in plan.batches():
        signed.extend(sign_batch(azure_store, plan, batch).urls.values())
    assert len(signed) == blocks and len(set(signed)) == blocks
    assert remembered_count() == remembered
    for url in signed:
        masked = redact(f"PUT {url} failed")
        assert parse_qs(urlsplit(url).query)["sig"][0] not in masked and "sig=" not in masked
        assert masked.startswith(f"PUT {url.split('?')[0]}?***")


def test_urls_expire_with_their_batch_and_speak_https_outside_a_lab(azure_store: AzureBlobStore) -> None:
    image = random.Random(10).randbytes(40 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-9", "c", len(image), BLOCK, _hashes(image))
    batch = next(plan.batches())
    before = datetime.now(timezone.utc)
    signed = sign_batch(azure_store, plan, batch)
    after = datetime.now(timezone.utc)
    assert signed.lifetime == url_lifetime(len(batch), BLOCK) < timedelta(minutes=6)
    for url in signed.urls.values():
        query = parse_qs(urlsplit(url).query)
        expiry = datetime.strptime(query["se"][0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        # se is written to the second, so it may fall up to a second before signing + lifetime.
        assert before + signed.lifetime - timedelta(seconds=1) <= expiry <= after + signed.lifetime
        assert query["sp"] == ["cw"]
        assert query["spr"] == ["https,http"]  # Azurite on loopback over plain HTTP: a lab

    # The largest batch of the largest blocks still ends well before the old 30 minutes.
    assert url_lifetime(BYTES_PER_CALL // (64 * 1024 * 1024), 64 * 1024 * 1024) <= timedelta(minutes=10)


def test_uncommitted_blocks_are_discarded_by_committing_an_empty_list(azure_store: AzureBlobStore) -> None:
    """Azurite's Delete Blob removes a blob of uncommitted blocks only; should Azure's answer 404
    instead, delete() falls back to committing an empty block list first. That fallback, here."""
    blob = azure_store.container.get_blob_client("staging/h/d/run/0")
    blob.stage_block(base64.b64encode(b"block-0").decode(), b"raw block")
    assert azure_store._discard_uncommitted(blob.blob_name, "staging/h/d/run/0")
    assert blob.get_block_list("all") == ([], []) and blob.get_blob_properties().size == 0
    assert not azure_store._discard_uncommitted(blob.blob_name, "staging/h/d/run/0")  # nothing left to discard
    azure_store.delete("staging/h/d/run/0")
    assert _everything_staged(azure_store) == []


def test_a_staged_blob_grown_after_the_listing_is_read_no_further_than_its_block(
        azurite: AzuriteServer, azure_store: AzureBlobStore) -> None:
    """The host rewrites a staged blob larger between the controller's listing and its read."""
    image = random.Random(11).randbytes(2 * BLOCK)
    repo = Repository.open(azure_store, create=True)
    plan = plan_upload(repo, "win-10", "c", len(image), BLOCK, _hashes(image))
    urls = _host_uploads(azure_store, plan, image)
    downloads = _CountingDownloads()
    counted = ContainerClient.from_connection_string(azurite.connection_string, azure_store.container.container_name,
                                                     raw_response_hook=downloads, max_single_get_size=BLOCK,
                                                     max_chunk_get_size=BLOCK)
    store = AzureBlobStore(counted, create_container=False, max_concurrency=1)
    blocks = StagedBlockSource(store, plan).blocks(BLOCK, None, BufferPool(2, BLOCK))
    next(blocks).release()  # block 0: listed and read as uploaded
    grown = 64 * BLOCK
    assert httpx.put(urls[1], content=bytes(grown), headers={"x-ms-blob-type": "BlockBlob"}).status_code == 201
    with pytest.raises(SourceError, match="staged block 1 does not match the hash"):
        next(blocks)
    assert downloads.bytes <= 3 * BLOCK < grown


def test_prune_removes_the_uncommitted_blocks_of_a_killed_chunk_upload(azure_store: AzureBlobStore) -> None:
    repo = Repository.open(azure_store, create=True)
    chunk_id = hashlib.sha256(b"never committed").hexdigest()
    blob = azure_store.container.get_blob_client(f"chunks/{chunk_id[:2]}/{chunk_id}")
    blob.stage_block(base64.b64encode(b"block-0").decode(), b"part of a large chunk")
    assert list(azure_store.list("chunks/")) == []
    assert prune(repo).chunks_deleted == 1
    assert list(azure_store.list("chunks/", uncommitted=True)) == []


def test_a_windows_host_uploads_no_zero_block(azure_store: AzureBlobStore, tmp_path: Path) -> None:
    """The host reports every block's SHA-256; the controller knows a zero block (the last,
    shorter one too) by the hash of zeros and never signs a URL for it."""
    image = bytearray(40 * BLOCK + 500)
    for index in (2, 30):
        image[index * BLOCK:(index + 1) * BLOCK] = random.Random(index).randbytes(BLOCK)
    repo = Repository.open(azure_store, create=True)
    first_image = bytes(image)
    plan, first = _backup(repo, azure_store, first_image)
    assert plan.changed == (2, 30)
    assert first.totals.uploaded_chunks == 2 and first.totals.used == 2 * BLOCK

    image[2 * BLOCK:3 * BLOCK] = bytes(BLOCK)  # data becomes zeros: changed, still nothing to upload
    image[7 * BLOCK] = 1
    plan, second = _backup(repo, azure_store, bytes(image))
    assert plan.changed == (7,) and second.totals.changed_blocks == 2 and second.totals.used == 2 * BLOCK
    restore(repo, second, tmp_path / "c.img")
    assert (tmp_path / "c.img").read_bytes() == bytes(image)
    live = tmp_path / "live.img"
    live.write_bytes(random.Random(5).randbytes(len(image)))
    restore(repo, first, live, force=True)
    assert live.read_bytes() == first_image
