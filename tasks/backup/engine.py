"""Backing up one disk: scan, compare with the parent point, upload what is new, write the point.

The order follows docs/repository.md, *Write order and invariants*: every block is hashed and
compared with the parent's map before anything is compressed (most blocks of an incremental are
unchanged, and zstd is the expensive step), chunks go up in a bounded thread pool (BLAKE3, zstd
and AES-GCM release the GIL), and the point is written last and never overwritten.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import structlog

from tasks.backup import progress as progress_mod
from tasks.backup.blockmap import BlockMap, TreeEntry, TreeMap
from tasks.backup.progress import ProgressSink
from tasks.backup.repository import (
    Consistency, MapRef, RecoveryPoint, Repository, Totals, utcnow,
)
from tasks.backup.source import BlockSource, BufferPool, SourceBlock, TreeSource, unchanged

log = structlog.stdlib.get_logger("patchdrill.backup")


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


class _ChunkWriter:
    """Hashes blocks, decides what is new, uploads it; shared by the pool's workers."""

    def __init__(self, repo: Repository, known: set[bytes], progress: ProgressSink) -> None:
        self.repo = repo
        self.known = known
        self.progress = progress
        self.totals = Totals()
        self._totals_lock = threading.Lock()
        self._known_lock = threading.Lock()

    def process(self, block: SourceBlock, previous_id: bytes | None) -> tuple[bytes, bytes]:
        """(chunk id, fingerprint) of the block; uploads it if the store lacks it."""
        try:
            if block.data is None:
                assert previous_id is not None and block.fingerprint is not None
                return previous_id, block.fingerprint
            chunk_id = self.repo.codec.chunk_id(block.data)
            self._count(scanned=block.length)
            if chunk_id != previous_id:
                self._count(changed_blocks=1, changed_bytes=block.length)
                with self._known_lock:
                    new = chunk_id not in self.known
                    self.known.add(chunk_id)
                if new:
                    # Claimed before the upload: a sibling worker with the same block skips it,
                    # and if this upload fails the whole backup fails before any point is written.
                    stored = self.repo.put_chunk(chunk_id, block.data)
                    self._count(uploaded_chunks=1 if stored else 0, uploaded_bytes=block.length if stored else 0,
                                stored_bytes=stored)
                    self.progress.advance("uploaded", block.length)
            return chunk_id, block.fingerprint or chunk_id
        finally:
            block.release()

    def _count(self, **amounts: int) -> None:
        with self._totals_lock:
            for name, amount in amounts.items():
                setattr(self.totals, name, getattr(self.totals, name) + amount)
        if "scanned" in amounts:
            self.progress.advance("scanned", amounts["scanned"])


@dataclass(frozen=True)
class BackupRequest:
    host: str
    disk: str
    consistency: Consistency = "crash-consistent"
    snapshot_method: str = "none"
    #: why the consistency level is what it is (fallbacks taken by the snapshot step)
    notes: tuple[str, ...] = ()
    block_size: int = 4 * 1024 * 1024
    workers: int = field(default_factory=default_workers)
    #: how long to wait for a running prune to finish before failing with RepositoryBusy
    lock_wait: timedelta = timedelta(minutes=30)
    #: read and hash everything, trusting no size/mtime/ctime/inode match or host-side hash
    rehash: bool = False


def backup(repo: Repository, source: BlockSource | TreeSource, request: BackupRequest,
           progress: ProgressSink | None = None) -> RecoveryPoint:
    """Back up one disk and return its recovery point (already written to the repository)."""
    sink = progress or progress_mod.current()
    started = time.monotonic()
    moment = utcnow()
    with repo.lock("backup", wait=request.lock_wait):
        parent = repo.latest_point(request.host, request.disk)
        known = repo.chunk_ids()
        writer = _ChunkWriter(repo, known, sink)
        with ThreadPoolExecutor(max_workers=request.workers, thread_name_prefix=f"backup-{request.disk}") as pool_exec:
            buffers = BufferPool(request.workers * 2 + 1, request.block_size)
            scan = _scan_tree if isinstance(source, TreeSource) else _scan_blocks
            scanned = scan(repo, source, request, parent, writer, pool_exec, buffers, sink)  # type: ignore[arg-type]
        map_id = repo.put_map(scanned.map_body)
        totals = writer.totals.model_copy(update={"size": scanned.size, "skipped": len(getattr(source, "skipped", []))})
        point = RecoveryPoint(
            host=request.host, disk=request.disk, time=moment, kind=scanned.kind, source_path=source.path,
            consistency=request.consistency, snapshot_method=request.snapshot_method, notes=list(request.notes),
            block_size=request.block_size, map=MapRef(id=map_id, blocks=scanned.blocks, files=scanned.files),
            parent=parent.key if parent else None,
            totals=totals,
            seconds=round(time.monotonic() - started, 3),
        )
        repo.write_point(point)
    log.info("backup.point", host=request.host, disk=request.disk, point=point.key, consistency=point.consistency,
             changed_blocks=totals.changed_blocks, uploaded_bytes=totals.uploaded_bytes, seconds=point.seconds)
    return point


def _collect(futures: list[Future[tuple[bytes, bytes]]], failed: threading.Event) -> list[tuple[bytes, bytes]]:
    try:
        return [f.result() for f in futures]
    except BaseException:
        failed.set()
        for f in futures:
            f.cancel()
        raise


@dataclass(frozen=True)
class _Scanned:
    kind: Literal["block", "directory"]
    map_body: dict[str, Any]
    size: int
    blocks: int
    files: int | None


def _submit(executor: ThreadPoolExecutor, writer: _ChunkWriter, block: SourceBlock, previous_id: bytes | None,
            failed: threading.Event) -> Future[tuple[bytes, bytes]]:
    future = executor.submit(writer.process, block, previous_id)

    def note_failure(done: Future[tuple[bytes, bytes]]) -> None:
        if not done.cancelled() and done.exception() is not None:
            failed.set()  # the reader stops feeding blocks at its next step

    future.add_done_callback(note_failure)
    return future


def _scan_blocks(repo: Repository, source: BlockSource, request: BackupRequest, parent: RecoveryPoint | None,
                 writer: _ChunkWriter, executor: ThreadPoolExecutor, buffers: BufferPool,
                 sink: ProgressSink) -> _Scanned:
    previous = None
    if parent is not None and parent.kind == "block" and parent.block_size == request.block_size:
        previous = BlockMap.from_json(repo.get_map(parent.map.id, point=parent.key), point=parent.key)
    sink.add_total("scanned", source.prepare(request.block_size))
    failed = threading.Event()
    futures: list[Future[tuple[bytes, bytes]]] = []
    size = 0
    for block in source.blocks(request.block_size, None if request.rehash else previous, buffers):
        if failed.is_set():
            block.release()
            break  # a worker failed: stop reading, the error surfaces in _collect
        prev_id = previous.chunks[block.index] if previous and block.index < len(previous.chunks) else None
        size += block.length  # what was read: a live image may have shrunk since prepare()
        futures.append(_submit(executor, writer, block, prev_id, failed))
    results = _collect(futures, failed)
    host_side = source.fingerprint != "chunk-id"
    block_map = BlockMap(size=size, block_size=request.block_size, chunks=[cid for cid, _ in results],
                         fingerprint=source.fingerprint,
                         fingerprints=[fp for _, fp in results] if host_side else None)
    return _Scanned("block", block_map.to_json(), size, len(results), None)


def _scan_tree(repo: Repository, source: TreeSource, request: BackupRequest, parent: RecoveryPoint | None,
               writer: _ChunkWriter, executor: ThreadPoolExecutor, buffers: BufferPool,
               sink: ProgressSink) -> _Scanned:
    previous: dict[str, TreeEntry] = {}
    if parent is not None and parent.kind == "directory" and parent.block_size == request.block_size:
        previous = TreeMap.from_json(repo.get_map(parent.map.id, point=parent.key), point=parent.key).by_path()
    failed = threading.Event()
    entries: list[TreeEntry] = []
    pending: list[tuple[TreeEntry, list[Future[tuple[bytes, bytes]]], list[int]]] = []
    for item in source.walk({} if request.rehash else previous):
        entry = item.entry
        entries.append(entry)
        if entry.type != "file" or item.read_blocks is None:
            continue
        old = previous.get(entry.path)
        if not request.rehash and unchanged(old, entry):
            entry.chunks = list(old.chunks)  # type: ignore[union-attr]  # not read at all
            continue
        sink.add_total("scanned", entry.size)
        futures, lengths = [], []
        for block in item.read_blocks(request.block_size, buffers):
            if failed.is_set():
                block.release()
                break
            prev_id = old.chunks[block.index] if old and old.type == "file" and block.index < len(old.chunks) else None
            lengths.append(block.length)
            futures.append(_submit(executor, writer, block, prev_id, failed))
        pending.append((entry, futures, lengths))
    for entry, futures, lengths in pending:
        entry.chunks = [cid for cid, _ in _collect(futures, failed)]
        entry.size = sum(lengths)  # what was read, should the file have changed under the scan
    tree = TreeMap(block_size=request.block_size, entries=entries, root=getattr(source, "root", None),
                   skipped=list(getattr(source, "skipped", [])))
    size = sum(e.size for e in entries)
    return _Scanned("directory", tree.to_json(), size, sum(len(e.chunks) for e in entries), len(entries))
