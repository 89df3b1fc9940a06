"""Direct upload for Windows hosts: raw changed blocks go from the host to Azure Blob under a
short-lived SAS URL, never through WinRM; the controller turns them into chunks.

docs/repository.md, *Windows hosts*, is the protocol: the host reports SHA-256 block hashes
(small, over WinRM), `plan_upload` compares them with the parent point and returns one write-only
URL per changed block under staging/<host>/<disk>/<run>/, the host PUTs the blocks, and a backup
with `StagedBlockSource` verifies each against the hash the host reported, stores it as a chunk
like any other, writes the point, and `discard` removes the staging prefix.

`scan_on_host` and `upload_from_host` drive the host's side over a connector (tasks/backup/disk.py
puts them together): host_scripts/win_blockscan.ps1 scans the snapshot (one call), then PUTs the changed blocks in batches; each batch's URLs are
signed just before the host gets them and live only as long as that batch needs.

The host holds write URLs, so it can do more with them than upload: lease or snapshot its
staging blobs, Put Block without committing, upload more than a block. The controller checks a
staged blob's size before reading it, deletes staging with leases broken and snapshots and
uncommitted blocks included, and never lets a leftover turn a written point into a failure.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Iterator, Literal

import structlog
from pydantic import BaseModel, Field, ValidationError

from connectors.base import CommandResult, Connector
from connectors.stores import BlobNotFound, BlobStore
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.blockmap import BlockMap
from tasks.backup.repo.damage import damaged_blocks, damaged_chunks, unmatchable
from tasks.backup.errors import SourceError
from tasks.backup.sources.remote import changed_blocks
from tasks.backup.repo.repository import Repository, staged_block_key, staging_prefix
from tasks.backup.repo.staging import StagingCleanup, remove_staged
from tasks.backup.sources.base import BufferPool, SourceBlock, ZeroFingerprints, hole_block, nothing_to_release

log = structlog.stdlib.get_logger("patchdrill.backup")

FINGERPRINT = "sha256"
HOST_SCRIPT = Path(__file__).parents[1] / "host_scripts" / "win_blockscan.ps1"
MIB = 1024 * 1024
#: A host call uploads at most this many blocks (URLs are ~300 characters each, so one call's
#: text stays modest) and this many bytes (so its URLs need to live only minutes).
URLS_PER_CALL = 256
BYTES_PER_CALL = 256 * MIB
#: The slowest upload a batch's URLs allow for: a URL need only be valid when its PUT starts,
#: and at this rate the last PUT of a full batch starts within about four minutes. A slower host
#: gets 403s late in a batch and the run fails, never a point with holes.
SLOWEST_UPLOAD_BYTES_PER_SECOND = 1 * MIB
#: Added to every batch's lifetime: the WinRM call's start, clock skew with the service, the
#: host's retries of a failed PUT.
URL_LIFETIME_MARGIN = timedelta(minutes=5)
URL_LIFETIME_LIMIT = timedelta(minutes=30)
_HOST_TIMEOUT = 6 * 3600.0


def sha256_fingerprint(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class UploadPlan:
    """What a host is asked to upload: the changed blocks, under one staging prefix. URLs are
    signed per batch (`sign_batch`), when the host is about to use them."""

    host: str
    disk: str
    prefix: str
    size: int
    block_size: int
    fingerprints: list[bytes]
    changed: tuple[int, ...]

    def key(self, index: int) -> str:
        return staged_block_key(self.prefix, index)

    def length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def holes(self) -> set[int]:
        """The blocks the host reported reading as zeros: recorded as holes, never uploaded."""
        zero = ZeroFingerprints(sha256_fingerprint)
        return {i for i, fp in enumerate(self.fingerprints) if fp == zero(self.length(i))}

    def batches(self) -> Iterator[list[int]]:
        """The changed blocks in host calls of at most URLS_PER_CALL blocks and BYTES_PER_CALL bytes."""
        per_call = max(1, min(URLS_PER_CALL, BYTES_PER_CALL // self.block_size))
        for start in range(0, len(self.changed), per_call):
            yield list(self.changed[start:start + per_call])


@dataclass(frozen=True)
class SignedBatch:
    """Upload URLs for one host call, all signed at `signed_at` and expiring `lifetime` later."""

    urls: dict[int, str]
    signed_at: datetime
    lifetime: timedelta


def url_lifetime(blocks: int, block_size: int) -> timedelta:
    """How long a batch's URLs must stay valid: until its last PUT can start at the slowest rate."""
    needed = URL_LIFETIME_MARGIN + timedelta(seconds=blocks * block_size / SLOWEST_UPLOAD_BYTES_PER_SECOND)
    return min(needed, URL_LIFETIME_LIMIT)


def sign_batch(store: BlobStore, plan: UploadPlan, indexes: list[int]) -> SignedBatch:
    """A write-only URL for each of these blocks, valid from now for what uploading them needs."""
    lifetime = url_lifetime(len(indexes), plan.block_size)
    signed_at = datetime.now(timezone.utc)
    urls = {i: store.upload_url(plan.key(i), expires_in=lifetime) for i in indexes}
    log.debug("backup.urls_signed", prefix=plan.prefix, blocks=len(urls),
              expires=(signed_at + lifetime).isoformat(timespec="seconds"))
    return SignedBatch(urls, signed_at, lifetime)


def plan_upload(repo: Repository, host: str, disk: str, size: int, block_size: int,
                fingerprints: list[bytes], *, rehash: bool = False) -> UploadPlan:
    """The blocks that changed since the last point of host/disk, and where they are staged.

    A block the host reports unchanged is asked for all the same when the parent's chunk for it
    is damaged (recorded by verify) or missing from the store: the backup writes it again, as a
    local or SSH backup does. `rehash` (the policy's) asks for every block.

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
    prefix = staging_prefix(host, disk, uuid.uuid4().hex)
    if rehash:
        changed = tuple(range(expected))
    else:
        index = chunk_index.load(repo)
        forced = damaged_blocks(previous, damaged_chunks(repo, previous, index, set(index.listing or ())))
        changed = tuple(changed_blocks(fingerprints, unmatchable(previous, forced), FINGERPRINT, block_size))
    plan = UploadPlan(host, disk, prefix, size, block_size, fingerprints, changed)
    # A block that reads as zeros is known by its hash: the host need not send it.
    holes = plan.holes()
    return replace(plan, changed=tuple(i for i in changed if i not in holes))


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
        changed = set(plan.changed)
        # Sizes from the listing (the blobs' properties), so a blob the host made larger than its
        # block is refused before a byte of it is downloaded.
        staged = {info.key: info.size for info in self.store.list(plan.prefix + "/")} if changed else {}
        holes = plan.holes()
        for index, fingerprint in enumerate(plan.fingerprints):
            length = plan.length(index)
            if index in holes:
                yield hole_block(index, length, fingerprint)
                continue
            if index not in changed:
                yield SourceBlock(index, length, None, fingerprint, nothing_to_release)
                continue
            size = staged.get(plan.key(index))
            if size is None:
                raise SourceError(f"host {plan.host} disk {plan.disk}: block {index} was never uploaded to "
                                  f"{plan.prefix}")
            if size != length:
                raise SourceError(f"host {plan.host} disk {plan.disk}: staged block {index} is {size} bytes, not "
                                  f"{length}: refused unread")
            buffer = pool.acquire()
            try:
                read = self._read_into(index, buffer, length)
            except BaseException:
                pool.release(buffer)
                raise
            if read != length or sha256_fingerprint(memoryview(buffer)[:length]) != fingerprint:
                pool.release(buffer)
                raise SourceError(f"host {plan.host} disk {plan.disk}: staged block {index} does not match the hash "
                                  "the host reported (changed during upload, cut short or grown)")
            yield SourceBlock(index, length, memoryview(buffer)[:length], fingerprint, partial(pool.release, buffer))

    def _read_into(self, index: int, buffer: bytearray, length: int) -> int:
        """Stream the staged block into buffer; a blob grown since it was listed stops the read
        at its block's length instead of being downloaded whole."""
        try:
            pieces = self.store.open(self.plan.key(index))
        except BlobNotFound:
            raise SourceError(f"host {self.plan.host} disk {self.plan.disk}: staged block {index} vanished from "
                              f"{self.plan.prefix} before it was read") from None
        read = 0
        for piece in pieces:
            if read + len(piece) > length:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                return read + len(piece)
            buffer[read:read + len(piece)] = piece
            read += len(piece)
        return read

    def discard(self) -> StagingCleanup:
        """Remove the staging prefix (after the point is written, or after giving up); what
        cannot be removed is logged and left for prune, never raised."""
        return remove_staged(self.store, self.plan.prefix + "/")


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
        raise SourceError(f"host {result.host}: {doing} failed: "
                          f"{result.tail(1) or f'exit {result.exit_code}'}")
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


def upload_from_host(connector: Connector, store: BlobStore, plan: UploadPlan, path: str, *, threads: int = 4) -> int:
    """Have the host PUT the plan's blocks to staging; returns the bytes it sent."""
    sent = 0
    for batch in plan.batches():
        # Signed now, not at plan time: a late batch reaches the host with its full lifetime.
        signed = sign_batch(store, plan, batch)
        listing = "\n".join(f"{i} {url}" for i, url in signed.urls.items())
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
