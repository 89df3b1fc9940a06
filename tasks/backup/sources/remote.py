"""Disks on another host: the host scans, the controller fetches only what changed.

The scan runs on the host (host_scripts/blockscan.py, standard library only). Changed
blocks are read over the connector's SFTP session when it offers one (`sftp()`), else through
blockscan's read mode, which works over any connector that runs Python. A block source compares
host-side block hashes, and knows a block that reads as zeros by its hash (the scan does not
read holes): such a block is neither fetched nor stored. A tree source compares file size,
mtime, ctime and inode with the parent point.
"""

from __future__ import annotations

import base64
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping

import structlog

from connectors.base import Connector
from tasks.backup.host_scripts import blockscan
from tasks.backup.repo.blockmap import BlockMap, TreeEntry
from tasks.backup.errors import SourceError
from tasks.backup.sources.base import (
    BufferPool, SourceBlock, SourceFile, TrackedChanges, ZeroFingerprints, entry_from_scan, hole_block,
    nothing_to_release, tracked_blocks, unchanged,
)

log = structlog.stdlib.get_logger("patchdrill.backup")
FINGERPRINT = "blake2b-256"
SCRIPT = Path(blockscan.__file__)
#: block data per read request: bounds the text one call returns over a connector's stdout
_READ_BYTES = 32 * 1024 * 1024
_SCAN_TIMEOUT = 6 * 3600.0


def _batches(indexes: list[int], block_size: int) -> Iterator[list[int]]:
    per_call = max(1, _READ_BYTES // block_size)
    for start in range(0, len(indexes), per_call):
        yield indexes[start:start + per_call]


def changed_blocks(fingerprints: list[bytes], previous: BlockMap | None, algorithm: str, block_size: int) -> list[int]:
    """Indexes whose host-side hash differs from the parent point's (all, when not comparable)."""
    old: list[bytes] = []
    if previous is not None and previous.fingerprint == algorithm and previous.block_size == block_size:
        old = previous.fingerprints or []
    return [i for i, fp in enumerate(fingerprints) if i >= len(old) or old[i] != fp]


def host_fingerprint(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


#: A block the host fingerprints as zeros is a hole: neither fetched nor stored.
_ZERO = ZeroFingerprints(host_fingerprint)


_EMPTY = memoryview(b"")


def _placeholder(index: int, length: int) -> SourceBlock:
    """A block marked for reading, without its data: what planning a tracked fetch needs."""
    return SourceBlock(index, length, _EMPTY, None, nothing_to_release)


class RemoteBlockSource:
    fingerprint = FINGERPRINT

    def __init__(self, connector: Connector, path: str) -> None:
        self.connector = connector
        self.path = path
        self._scan: dict[str, Any] | None = None
        self._scan_block_size = 0
        #: set when the host's file system told what changed: no host-side scan then
        self.tracked: TrackedChanges | None = None

    def _scanned(self, block_size: int) -> dict[str, Any]:
        if self._scan is None or self._scan_block_size != block_size:
            result = self.connector.run_script(SCRIPT, ["scan", self.path, str(block_size)], timeout=_SCAN_TIMEOUT)
            if not result.ok:
                raise SourceError(f"host {self.connector.name}: block scan of {self.path!r} failed: "
                                  f"{result.tail(1) or f'exit {result.exit_code}'}")
            try:
                self._scan = json.loads(result.stdout)
            except ValueError:
                raise SourceError(f"host {self.connector.name}: block scan of {self.path!r} returned no JSON "
                                  "(is python3 installed on the host?)") from None
            self._scan_block_size = block_size
        return self._scan

    def prepare(self, block_size: int) -> int:
        """Run the scan on the host (unless the changes are tracked); returns the disk's size."""
        if self.tracked is not None:
            return self.tracked.size
        return int(self._scanned(block_size)["size"])

    def scan(self, block_size: int) -> list[bytes]:
        raw = bytes.fromhex(self._scanned(block_size)["fingerprints"])
        return [raw[i:i + 32] for i in range(0, len(raw), 32)]

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]:
        if self.tracked is not None:
            yield from self._tracked_blocks(self.tracked, block_size, previous, pool)
            return
        fingerprints = self.scan(block_size)
        size = self.prepare(block_size)
        holes = {i for i, fp in enumerate(fingerprints) if fp == _ZERO(min(block_size, size - i * block_size))}
        changed = [i for i in changed_blocks(fingerprints, previous, FINGERPRINT, block_size) if i not in holes]
        wanted = set(changed)
        fetched = self.fetch(changed, block_size, size)
        for index, fp in enumerate(fingerprints):
            length = min(block_size, size - index * block_size)
            if index in holes:
                yield hole_block(index, length, fp)
            elif index in wanted:
                yield self._arrived(fetched, index, length, pool)
            else:
                yield SourceBlock(index, length, None, fp, nothing_to_release)

    def _tracked_blocks(self, tracked: TrackedChanges, block_size: int, previous: BlockMap | None,
                        pool: BufferPool) -> Iterator[SourceBlock]:
        # Which blocks tracked_blocks will ask for, so they are fetched in pipelined batches.
        wanted = [block.index for block in tracked_blocks(tracked, previous, block_size, _placeholder)
                  if block.data is not None]
        fetched = self.fetch(wanted, block_size, tracked.size)
        yield from tracked_blocks(tracked, previous, block_size,
                                  lambda index, length: self._arrived(fetched, index, length, pool))

    def _arrived(self, fetched: Iterator[tuple[int, bytes]], index: int, length: int, pool: BufferPool) -> SourceBlock:
        """The next fetched block, which must be block `index` of `length` bytes."""
        got_index, data = next(fetched)
        if got_index != index or len(data) != length:
            raise SourceError(f"host {self.connector.name}: {self.path!r} changed size while being read "
                              f"(block {index}: expected {length} bytes, got {len(data)})")
        # Hash what actually arrived: the disk may have changed since the scan.
        arrived = host_fingerprint(data)
        if arrived == _ZERO(length):
            return hole_block(index, length, arrived)
        buffer = pool.acquire()
        buffer[:length] = data
        return SourceBlock(index, length, memoryview(buffer)[:length], arrived, partial(pool.release, buffer))

    def fetch(self, indexes: list[int], block_size: int, size: int) -> Iterator[tuple[int, bytes]]:
        sftp_factory = getattr(self.connector, "sftp", None)
        if callable(sftp_factory):
            yield from self._fetch_sftp(sftp_factory(), indexes, block_size, size)
            return
        for batch in _batches(indexes, block_size):
            result = self.connector.run_script(SCRIPT, ["read", self.path, str(block_size), *map(str, batch)],
                                               timeout=_SCAN_TIMEOUT)
            if not result.ok:
                raise SourceError(f"host {self.connector.name}: reading blocks of {self.path!r} failed: "
                                  f"{result.tail() or f'exit {result.exit_code}'}")
            for line in result.stdout.splitlines():
                index, _, data = line.partition(" ")
                yield int(index), base64.b64decode(data)

    def _fetch_sftp(self, sftp: Any, indexes: list[int], block_size: int, size: int) -> Iterator[tuple[int, bytes]]:
        with sftp.open(self.path, "rb") as handle:
            for batch in _batches(indexes, block_size):
                ranges = [(i * block_size, min(block_size, size - i * block_size)) for i in batch]
                # readv pipelines the requests: one round trip per batch, not per block.
                yield from zip(batch, handle.readv(ranges), strict=True)


class RemoteTreeSource:
    """A directory on another host: the host lists metadata; the files the engine will read
    (changed by size, mtime, ctime or inode against the parent point) come over in batches, many small files
    per round trip, large ones block by block."""

    def __init__(self, connector: Connector, path: str, *, batch_bytes: int = _READ_BYTES) -> None:
        self.connector = connector
        self.path = path.rstrip("/") or "/"
        self.batch_bytes = batch_bytes
        self.skipped: list[str] = []
        self.root: TreeEntry | None = None
        self._queue: list[tuple[str, int]] = []  # files still to read, in walk order
        self._fetched: dict[str, list[bytes]] = {}

    def walk(self, previous: Mapping[str, TreeEntry]) -> Iterator[SourceFile]:
        result = self.connector.run_script(SCRIPT, ["tree", self.path, "0"], timeout=_SCAN_TIMEOUT)
        if not result.ok:
            raise SourceError(f"host {self.connector.name}: listing {self.path!r} failed: "
                              f"{result.tail(1) or f'exit {result.exit_code}'}")
        entries = []
        for line in result.stdout.splitlines():
            body = json.loads(line)
            if "skipped" in body:
                self.skipped.append(f"{body['skipped']}: {body['why']}")
                log.warning("backup.skipped", host=self.connector.name, source=self.path, entry=body["skipped"],
                            why=body["why"])
            elif body["path"] == "":
                self.root = entry_from_scan(body)
            elif body["type"] != "other":
                entries.append(entry_from_scan(body))
        self._queue = [(e.path, e.size) for e in entries if e.type == "file" and not unchanged(previous.get(e.path), e)]
        for entry in entries:
            reader = partial(self._read_file, entry.path, entry.size) if entry.type == "file" else None
            yield SourceFile(entry, reader)

    def _read_file(self, path: str, size: int, block_size: int, pool: BufferPool) -> Iterator[SourceBlock]:
        if size > self.batch_bytes:
            source = RemoteBlockSource(self.connector, f"{self.path}/{path}")
            pieces: Iterator[tuple[int, bytes]] = source.fetch(list(range(-(-size // block_size))), block_size, size)
        else:
            if path not in self._fetched:
                self._fetch_batch(path, block_size)
            pieces = enumerate(self._fetched.pop(path))
        for index, data in pieces:
            buffer = pool.acquire()
            buffer[:len(data)] = data
            yield SourceBlock(index, len(data), memoryview(buffer)[:len(data)], None, partial(pool.release, buffer))

    def _fetch_batch(self, first: str, block_size: int) -> None:
        """Read `first` and the small files queued after it, up to batch_bytes, in one call."""
        names = [p for p, _ in self._queue]
        start = names.index(first) if first in names else len(names)
        batch, total = [first], 0
        for path, size in self._queue[start + 1:]:
            if size > self.batch_bytes or total + size > self.batch_bytes:
                break
            batch.append(path)
            total += size
        self._queue = self._queue[start + len(batch):]
        result = self.connector.run_script(SCRIPT, ["files", self.path, str(block_size), *batch], timeout=_SCAN_TIMEOUT)
        if not result.ok:
            raise SourceError(f"host {self.connector.name}: reading files under {self.path!r} failed: "
                              f"{result.tail(1) or f'exit {result.exit_code}'}")
        fetched: dict[str, list[bytes]] = {p: [] for p in batch}
        for line in result.stdout.splitlines():
            number, _, data = line.partition(" ")
            fetched[batch[int(number)]].append(base64.b64decode(data))
        self._fetched.update(fetched)
