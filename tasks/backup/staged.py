"""Direct upload for Windows hosts: raw changed blocks go from the host to Azure Blob under a
short-lived SAS URL, never through WinRM; the controller turns them into chunks.

docs/repository.md, *Windows hosts*, is the protocol: the host reports SHA-256 block hashes
(small, over WinRM), `plan_upload` compares them with the parent point and returns one write-only
URL per changed block under staging/<host>/<disk>/<run>/, the host PUTs the blocks, and a backup
with `StagedBlockSource` verifies each against the hash the host reported, stores it as a chunk
like any other, writes the point, and `discard` removes the staging prefix.
"""

from __future__ import annotations

import hashlib
import uuid
from functools import partial
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

from connectors.storage import BlobNotFound, BlobStore
from tasks.backup.blockmap import BlockMap
from tasks.backup.errors import SourceError
from tasks.backup.remote_source import changed_blocks
from tasks.backup.repository import Repository
from tasks.backup.source import BufferPool, SourceBlock, nothing_to_release

FINGERPRINT = "sha256"


def sha256_fingerprint(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class UploadPlan:
    """What a host is asked to upload: block index -> URL, all under one staging prefix."""

    host: str
    disk: str
    prefix: str
    size: int
    block_size: int
    fingerprints: list[bytes]
    urls: dict[int, str]


def plan_upload(repo: Repository, host: str, disk: str, size: int, block_size: int, fingerprints: list[bytes],
                *, expires_in: timedelta = timedelta(minutes=30)) -> UploadPlan:
    """Upload URLs for the blocks that changed since the last point of host/disk.

    Hold `repo.lock("backup")` from here until the staged backup is done and discarded: prune
    deletes staging blobs whenever no backup holds a lock.
    """
    expected = -(-size // block_size) if size else 0
    if len(fingerprints) != expected:
        raise SourceError(f"host {host} disk {disk}: {len(fingerprints)} block hashes reported for {expected} blocks")
    parent = repo.latest_point(host, disk)
    previous = None
    if parent is not None and parent.kind == "block":
        previous = BlockMap.from_json(repo.get_map(parent.map.id, point=parent.key), point=parent.key)
    prefix = f"staging/{host}/{disk}/{uuid.uuid4().hex}"
    urls = {i: repo.store.upload_url(f"{prefix}/{i}", expires_in=expires_in)
            for i in changed_blocks(fingerprints, previous, FINGERPRINT, block_size)}
    return UploadPlan(host, disk, prefix, size, block_size, fingerprints, urls)


class StagedBlockSource:
    """The blocks of an UploadPlan: uploaded ones read from staging and checked, the rest
    unchanged since the parent point."""

    fingerprint = FINGERPRINT

    def __init__(self, store: BlobStore, plan: UploadPlan) -> None:
        self.store = store
        self.plan = plan
        self.path = f"{store.name}/{plan.prefix}"

    def prepare(self, block_size: int) -> int:
        if block_size != self.plan.block_size:
            raise SourceError(f"{self.path}: staged with {self.plan.block_size}-byte blocks, not {block_size}")
        return self.plan.size

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]:
        plan = self.plan
        for index, fingerprint in enumerate(plan.fingerprints):
            length = min(block_size, plan.size - index * block_size)
            if index not in plan.urls:
                yield SourceBlock(index, length, None, fingerprint, nothing_to_release)
                continue
            try:
                data = self.store.get(f"{plan.prefix}/{index}")
            except BlobNotFound:
                raise SourceError(f"host {plan.host} disk {plan.disk}: block {index} was never uploaded to "
                                  f"{plan.prefix}") from None
            if len(data) != length or sha256_fingerprint(data) != fingerprint:
                raise SourceError(f"host {plan.host} disk {plan.disk}: staged block {index} does not match the hash "
                                  "the host reported (changed during upload, or truncated)")
            buffer = pool.acquire()
            buffer[:length] = data
            yield SourceBlock(index, length, memoryview(buffer)[:length], fingerprint, partial(pool.release, buffer))

    def discard(self) -> None:
        """Remove the staging prefix (after the point is written, or after giving up)."""
        for info in list(self.store.list(self.plan.prefix + "/")):
            try:
                self.store.delete(info.key)
            except BlobNotFound:
                pass
