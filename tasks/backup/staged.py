"""Direct upload for Windows hosts: raw changed blocks go from the host to Azure Blob under a
short-lived SAS URL, never through WinRM; the controller turns them into chunks.

docs/repository.md, *Windows hosts*, is the protocol: the host reports SHA-256 block hashes
(small, over WinRM), `plan_upload` compares them with the parent point and returns one write-only
URL per changed block under staging/<host>/<disk>/<run>/, the host PUTs the blocks, and a backup
with `StagedBlockSource` verifies each against the hash the host reported, stores it as a chunk
like any other, writes the point, and `discard` removes the staging prefix.

`back_up_from_host` drives the host's side over a connector: connectors/remote/win_blockscan.ps1
scans the snapshot (one call), then PUTs the changed blocks in batches of signed URLs.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from functools import partial
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Literal

import structlog
from pydantic import BaseModel, Field, ValidationError

from connectors.base import CommandResult, Connector
from connectors.storage import BlobNotFound, BlobStore
from tasks.backup.blockmap import BlockMap
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import SourceError
from tasks.backup.remote_source import changed_blocks
from tasks.backup.repository import RecoveryPoint, Repository
from tasks.backup.source import BufferPool, SourceBlock, nothing_to_release

log = structlog.stdlib.get_logger("patchdrill.backup")

FINGERPRINT = "sha256"
HOST_SCRIPT = "win_blockscan.ps1"
#: Upload URLs per host call: ~300 characters each, so one call's text stays modest, and a long
#: upload gets its later URLs signed when their batch starts rather than all at plan time.
URLS_PER_CALL = 256
URL_LIFETIME = timedelta(minutes=30)
_HOST_TIMEOUT = 6 * 3600.0


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
    urls = sign_urls(repo.store, prefix, changed_blocks(fingerprints, previous, FINGERPRINT, block_size), expires_in)
    return UploadPlan(host, disk, prefix, size, block_size, fingerprints, urls)


def sign_urls(store: BlobStore, prefix: str, indexes: list[int], expires_in: timedelta = URL_LIFETIME) -> dict[int, str]:
    """A write-only URL for each block index under the staging prefix."""
    return {i: store.upload_url(f"{prefix}/{i}", expires_in=expires_in) for i in indexes}


class StagedBlockSource:
    """The blocks of an UploadPlan: uploaded ones read from staging and checked, the rest
    unchanged since the parent point."""

    fingerprint = FINGERPRINT

    def __init__(self, store: BlobStore, plan: UploadPlan, path: str | None = None) -> None:
        """`path`: what the point records as its source (the host's read path); the staging
        prefix when not given."""
        self.store = store
        self.plan = plan
        self.path = path or f"{store.name}/{plan.prefix}"

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


# The host's side, driven over a connector -------------------------------------------------------

class HostScan(BaseModel):
    """What win_blockscan.ps1 -Mode Scan prints."""

    kind: Literal["block", "directory"]
    hash: Literal["sha256"] | None = None
    size: int = Field(default=0, ge=0)
    block_size: int = Field(default=0, ge=0)
    fingerprints: str = Field(default="", pattern=r"^(?:[0-9a-fA-F]{64})*$")
    path: str | None = None

    def hashes(self) -> list[bytes]:
        raw = bytes.fromhex(self.fingerprints)
        return [raw[i:i + 32] for i in range(0, len(raw), 32)]


class UploadedBlock(BaseModel):
    index: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class HostUpload(BaseModel):
    """What win_blockscan.ps1 -Mode Upload prints."""

    blocks: list[UploadedBlock]
    bytes_sent: int = Field(ge=0)


def check_direct_upload(store: BlobStore, host: str, disk: str, kind: str) -> None:
    """Refuse, before any snapshot is taken, a Windows disk this path cannot back up."""
    if kind == "directory":
        raise SourceError(f"host {host} disk {disk}: directory disks of Windows hosts are not supported; back up "
                          "an image file (VHD, VHDX or raw) instead: win_blockscan.ps1 reads block images only")
    if not store.supports_upload_url:
        # WinRM moves ~100 KB per round trip: a disk through it would take days, so there is
        # no fallback through the connector.
        raise SourceError(f"host {host} disk {disk}: Windows backups need an Azure Blob repository (hosts upload "
                          f"straight to it with short-lived SAS URLs); {store.name} cannot issue upload URLs")


def _report(result: CommandResult, model: type[BaseModel], doing: str) -> BaseModel:
    if not result.ok:
        problem = result.stderr.strip().splitlines()[-1:] or [f"exit {result.exit_code}"]
        raise SourceError(f"host {result.host}: {doing} failed: {problem[0]}")
    try:
        return model.model_validate_json(result.stdout.strip())
    except ValidationError as exc:
        raise SourceError(f"host {result.host}: {doing} printed no valid report ({exc.error_count()} problems, "
                          f"first: {exc.errors()[0]['msg']}): {result.stdout[:200]!r}") from None


def scan_on_host(connector: Connector, path: str, block_size: int) -> HostScan:
    result = connector.run_script(HOST_SCRIPT, ["-Mode", "Scan", "-Path", path, "-BlockSize", str(block_size)],
                                  timeout=_HOST_TIMEOUT)
    scan = _report(result, HostScan, f"block scan of {path!r}")
    assert isinstance(scan, HostScan)
    if scan.kind == "directory":
        raise SourceError(f"host {connector.name}: {path!r} is a directory; directory disks of Windows hosts are not "
                          "supported (set the disk's kind to block and point it at an image file)")
    if scan.block_size != block_size or len(scan.fingerprints) != 64 * (-(-scan.size // block_size)):
        raise SourceError(f"host {connector.name}: block scan of {path!r} reported {len(scan.fingerprints) // 64} "
                          f"hashes of {scan.block_size}-byte blocks for {scan.size} bytes")
    return scan


def upload_from_host(connector: Connector, store: BlobStore, plan: UploadPlan, path: str, *, threads: int = 4,
                     expires_in: timedelta = URL_LIFETIME) -> int:
    """Have the host PUT the plan's blocks to staging; returns the bytes it sent."""
    signed_at = time.monotonic()
    indexes = sorted(plan.urls)
    sent = 0
    for start in range(0, len(indexes), URLS_PER_CALL):
        batch = indexes[start:start + URLS_PER_CALL]
        urls = {i: plan.urls[i] for i in batch}
        if time.monotonic() - signed_at > expires_in.total_seconds() / 3:
            # Earlier batches took long enough that these URLs could expire mid-batch.
            urls = sign_urls(store, plan.prefix, batch, expires_in)
        listing = "\n".join(f"{i} {url}" for i, url in urls.items())
        result = connector.run_script(HOST_SCRIPT, ["-Mode", "Upload", "-Path", path, "-BlockSize", str(plan.block_size),
                                                    "-Threads", str(threads), "-Uploads", listing],
                                      timeout=_HOST_TIMEOUT)
        report = _report(result, HostUpload, f"upload of {len(batch)} blocks of {path!r}")
        assert isinstance(report, HostUpload)
        reported = {b.index: b for b in report.blocks}
        for index in batch:
            block = reported.get(index)
            if block is None:
                raise SourceError(f"host {connector.name}: block {index} of {path!r} was not reported uploaded")
            if bytes.fromhex(block.sha256) != plan.fingerprints[index]:
                raise SourceError(f"host {connector.name}: block {index} of {path!r} changed between the scan and the "
                                  "upload (is the path a snapshot?)")
        sent += report.bytes_sent
    return sent


def back_up_from_host(repo: Repository, connector: Connector, path: str, request: BackupRequest) -> RecoveryPoint:
    """Back up an image file on a Windows host: the host scans it and uploads changed blocks
    straight to the store; the controller makes chunks, the map and the point, and always
    removes the staging prefix."""
    check_direct_upload(repo.store, request.host, request.disk, "block")
    scan = scan_on_host(connector, path, request.block_size)
    # Held until staging is discarded: prune deletes staging blobs whenever no backup holds a lock.
    with repo.lock("backup", wait=request.lock_wait):
        plan = plan_upload(repo, request.host, request.disk, scan.size, request.block_size, scan.hashes())
        source = StagedBlockSource(repo.store, plan, path)
        try:
            sent = upload_from_host(connector, repo.store, plan, path, threads=request.workers)
            log.info("backup.staged", host=request.host, disk=request.disk, blocks=len(plan.urls), bytes_sent=sent)
            return backup(repo, source, request)
        finally:
            source.discard()
