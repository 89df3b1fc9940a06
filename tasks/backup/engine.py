"""Backing up one disk: scan, compare with the parent point, upload what is new, write the point.

The order follows docs/repository.md, *Write order and invariants*: every block is hashed and
compared with the parent's map before anything is compressed (most blocks of an incremental are
unchanged, and zstd is the expensive step), chunks go up in a bounded thread pool (BLAKE3, zstd
and AES-GCM release the GIL), and the point is written last and never overwritten.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Container, Literal, Sequence

import structlog
from pydantic import BaseModel, ConfigDict

from tasks.backup import cancel, progress as progress_mod
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.blockmap import CHUNK_ID_FINGERPRINT, HOLE, BlockMap, TreeEntry, TreeMap
from tasks.backup.progress import ProgressSink
from tasks.backup.repo.damage import PreviousMap, damaged_blocks, damaged_chunks, unmatchable
from tasks.backup.scheduling import default_workers
from tasks.backup.repo.repository import (
    Consistency, KeptClone, MapRef, RecoveryPoint, Repository, Totals, tool_version, utcnow,
)
from tasks.backup.sources.base import BlockSource, BufferPool, SourceBlock, TreeSource, unchanged

log = structlog.stdlib.get_logger("patchdrill.backup")


class _ChunkWriter:
    """Hashes blocks, decides what is new, uploads it; shared by the pool's workers.

    `damaged` holds chunk ids the store has in a bad state (verify recorded them corrupt, or a
    point names them and the listing lacks them): a block hashing to one is written again,
    replacing the bad blob, even when the block is unchanged since the parent point.
    `only_damaged` (repair) writes nothing else.
    """

    def __init__(self, repo: Repository, indexed: Container[bytes], progress: ProgressSink,
                 damaged: set[bytes] | None = None, *, only_damaged: bool = False,
                 found: set[bytes] | None = None) -> None:
        self.repo = repo
        self.damaged = set(damaged or ())
        #: what the index files name: a changed block matching one is looked up before it is
        #: skipped, since a chunk deleted behind the index's back must be uploaded again
        self.indexed = indexed
        #: stored ids this run wrote, found already there or looked up (`found`: those it knew
        #: of before the scan); its own index file names those the index does not
        self.seen: set[bytes] = set(found or ()) - self.damaged
        self.repaired: set[bytes] = set()
        self.only_damaged = only_damaged
        self.progress = progress
        self.totals = Totals()
        self._totals_lock = threading.Lock()
        self._known_lock = threading.Lock()
        self._zero_ids: dict[int, bytes] = {}

    def process(self, block: SourceBlock, previous_id: bytes | None) -> tuple[bytes, bytes]:
        """(chunk id, fingerprint) of the block; uploads it if the store lacks it."""
        try:
            cancel.check()  # blocks queued before a stop are dropped, not uploaded
            if block.hole:  # reads as zeros: the map records a hole, and nothing is stored
                if previous_id not in (HOLE, self._zero_id(block.length)):
                    self._count(changed_blocks=1, changed_bytes=block.length)
                self.progress.advance("scanned", block.length)
                return HOLE, block.fingerprint or HOLE
            if block.data is None:
                assert previous_id is not None and block.fingerprint is not None
                return previous_id, block.fingerprint
            chunk_id = self.repo.codec.chunk_id(block.data)
            self._count(scanned=block.length)
            changed = chunk_id != previous_id
            if changed:
                self._count(changed_blocks=1, changed_bytes=block.length)
            with self._known_lock:
                # Claimed before the upload: a sibling worker with the same block skips it,
                # and if this upload fails the whole backup fails before any point is written.
                rewrite = chunk_id in self.damaged
                self.damaged.discard(chunk_id)
                wanted = changed and not self.only_damaged and not rewrite and chunk_id not in self.seen
                look_up = wanted and chunk_id in self.indexed
                new = wanted and not look_up
                if new or rewrite or look_up:
                    self.seen.add(chunk_id)
            if look_up and not self.repo.has_chunk(chunk_id):
                log.warning("backup.index_stale", chunk=chunk_id.hex())
                new = True
            if rewrite or new:
                stored = self.repo.put_chunk(chunk_id, block.data, replace=rewrite)
                self._count(uploaded_chunks=1 if stored else 0, uploaded_bytes=block.length if stored else 0,
                            stored_bytes=stored, repaired_chunks=int(rewrite))
                if rewrite:
                    with self._known_lock:
                        self.repaired.add(chunk_id)
                    log.warning("backup.chunk_repaired", chunk=chunk_id.hex())
                self.progress.advance("uploaded", block.length)
            return chunk_id, block.fingerprint or chunk_id
        finally:
            block.release()

    def _zero_id(self, length: int) -> bytes:
        """The chunk id of zeros, which maps before holes were recorded hold instead of a hole."""
        found = self._zero_ids.get(length)
        if found is None:
            found = self._zero_ids[length] = self.repo.codec.chunk_id(bytes(length))
        return found

    def write_index(self) -> str | None:
        """This run's index file (its key; None when there was nothing new): the stored chunks the
        index did not name. Written after every upload and before the point, so a point's new
        chunks are indexed before it exists."""
        return self.repo.write_index({chunk_id for chunk_id in self.seen if chunk_id not in self.indexed})

    def _count(self, **amounts: int) -> None:
        with self._totals_lock:
            for name, amount in amounts.items():
                setattr(self.totals, name, getattr(self.totals, name) + amount)
        if "scanned" in amounts:
            self.progress.advance("scanned", amounts["scanned"])


#: How long a backup waits for a running prune to finish before failing with RepositoryBusy.
LOCK_WAIT = timedelta(minutes=30)


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
    lock_wait: timedelta = LOCK_WAIT
    #: when the snapshot the source reads was taken; None when the source is live, and the
    #: point's time is then the moment reading began (after any wait for the lock)
    snapshot_time: datetime | None = None
    #: the name of the backup policy that made the point, recorded in it
    policy: str | None = None
    #: read and hash everything, trusting no size/mtime/ctime/inode match or host-side hash
    rehash: bool = False


class Upload(BaseModel):
    """What scanning a disk and uploading its new chunks left in the store: everything its
    recovery point needs but the point itself. Plain data, so it crosses task boundaries."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["block", "directory"]
    #: the moment the data is from (the snapshot's time, or when reading began)
    time: datetime
    source_path: str
    map: MapRef
    parent: str | None
    totals: Totals
    #: damaged chunks this backup wrote again (hex ids): their damage records go with the point
    repaired: list[str] = []
    seconds: float = 0.0
    #: which way the disk went (changed-block tracking, or read and hash and why)
    notes: list[str] = []


def backup(repo: Repository, source: BlockSource | TreeSource, request: BackupRequest,
           progress: ProgressSink | None = None) -> RecoveryPoint:
    """Back up one disk and return its recovery point (already written to the repository)."""
    cancel.check()
    with repo.lock("backup", wait=request.lock_wait):
        return write_point(repo, scan_and_upload(repo, source, request, progress), request)


def scan_and_upload(repo: Repository, source: BlockSource | TreeSource, request: BackupRequest,
                    progress: ProgressSink | None = None) -> Upload:
    """Read the disk, compare it with the parent point, upload the chunks the store lacks and
    the map. Call with a backup lock held until `write_point`: prune must not delete the new
    chunks before a point names them."""
    sink = progress or progress_mod.current()
    started = time.monotonic()
    cancel.check()
    # Stamped here, after any wait for the lock: a live source's data is from now on; a
    # snapshot's from when it was taken.
    moment = request.snapshot_time or utcnow()
    parent = repo.latest_point(request.host, request.disk)
    index = chunk_index.load(repo)
    found = set(index.listing or ())
    previous = _previous_map(repo, parent, request.block_size)
    damaged = damaged_chunks(repo, previous, index, found)
    writer = _ChunkWriter(repo, index, sink, damaged, found=found)
    notes = _settle_tracking(source, request, parent, previous, damaged)
    scanned = _scan(source, request, previous, writer, sink)
    # The last moment to stop: a scan cut short by a stop holds only part of the disk.
    cancel.check()
    chunk_index.fold_if_many(repo, index, writer.write_index())
    map_id = repo.put_map(scanned.map_body)
    totals = writer.totals.model_copy(update={"size": scanned.size, "used": scanned.used,
                                              "skipped": len(getattr(source, "skipped", []))})
    return Upload(kind=scanned.kind, time=moment, source_path=source.path,
                  map=MapRef(id=map_id, blocks=scanned.blocks, files=scanned.files),
                  parent=parent.key if parent else None, totals=totals,
                  repaired=sorted(chunk_id.hex() for chunk_id in writer.repaired),
                  seconds=time.monotonic() - started, notes=notes)


def write_point(repo: Repository, upload: Upload, request: BackupRequest,
                kept_clone: KeptClone | None = None) -> RecoveryPoint:
    """Write the recovery point of an upload: the last write of a backup, never overwritten.
    Call under the same backup lock as `scan_and_upload`. `kept_clone`: the clone it was read
    from, kept on the host (tasks/backup/kept.py)."""
    started = time.monotonic()
    cancel.check()
    point = RecoveryPoint(
        host=request.host, disk=request.disk, time=upload.time, kind=upload.kind, source_path=upload.source_path,
        consistency=request.consistency, snapshot_method=request.snapshot_method,
        notes=[*request.notes, *upload.notes], kept_clone=kept_clone,
        block_size=request.block_size, map=upload.map, parent=upload.parent, totals=upload.totals,
        seconds=round(upload.seconds + time.monotonic() - started, 3),
        completed=utcnow(), tool=tool_version(), policy=request.policy,
    )
    repo.write_point(point)
    for chunk_id in upload.repaired:
        repo.clear_damage(chunk_id)
    totals = upload.totals
    log.info("backup.point", host=request.host, disk=request.disk, point=point.key, consistency=point.consistency,
             changed_blocks=totals.changed_blocks, uploaded_bytes=totals.uploaded_bytes, seconds=point.seconds)
    return point


def rewrite_damaged(repo: Repository, source: BlockSource | TreeSource, request: BackupRequest,
                    points: list[RecoveryPoint], damaged: set[bytes], progress: ProgressSink | None = None) -> set[bytes]:
    """Read the live source for blocks that hash to damaged chunk ids and rewrite those chunks;
    returns the ids rewritten. Writes no map and no point. `points` are this disk's points that
    name damaged chunks: every block or file they had at a damaged chunk is read again."""
    sink = progress or progress_mod.current()
    if not points:
        return set()
    # Positions mean the same only at one block size: the newest point's.
    block_size = points[-1].block_size
    maps = [m for m in (_previous_map(repo, p, block_size) for p in points) if m is not None]
    writer = _ChunkWriter(repo, set(), sink, damaged, only_damaged=True)
    # The newest map drives the scan; the others add the positions they had damaged chunks at.
    _scan(source, replace(request, block_size=block_size), maps[-1], writer, sink, also=maps[:-1])
    writer.write_index()
    for chunk_id in writer.repaired:
        repo.clear_damage(chunk_id.hex())
    return writer.repaired


def _settle_tracking(source: BlockSource | TreeSource, request: BackupRequest, parent: RecoveryPoint | None,
                     previous: PreviousMap, damaged: set[bytes]) -> list[str]:
    """Whether what the file system said changed (the source's `tracked`) holds for this scan,
    with the damaged blocks added that must be read anyway; the note saying which way it went."""
    tracked = getattr(source, "tracked", None)
    if tracked is None:
        return []
    blocks = previous if isinstance(previous, BlockMap) else None
    host_side = source.fingerprint != CHUNK_ID_FINGERPRINT
    why = ("the policy asks to rehash every block" if request.rehash
           else f"the newest point is no longer {tracked.parent}, whose clone was compared"
           if parent is None or parent.key != tracked.parent
           else f"point {tracked.parent} was made at another block size" if blocks is None
           else f"point {tracked.parent} has no {source.fingerprint} fingerprints to carry over"
           if host_side and (blocks.fingerprint != source.fingerprint or blocks.fingerprints is None) else None)
    if why:
        source.tracked = None  # type: ignore[union-attr]
        return [f"read and hash: {why}"]
    assert blocks is not None
    changed = tracked.changed | damaged_blocks(blocks, damaged)
    source.tracked = replace(tracked, changed=changed)  # type: ignore[union-attr]
    total = -(-tracked.size // blocks.block_size)
    return [f"changed-block tracking: {tracked.how}; {len(changed)} of {total} blocks read"]


def _previous_map(repo: Repository, point: RecoveryPoint | None, block_size: int) -> PreviousMap:
    """The parent's block map or its tree entries by path, if comparable with this backup."""
    if point is None or point.block_size != block_size:
        return None
    body = repo.get_map(point.map.id, point=point.key)
    if point.kind == "block":
        return BlockMap.from_json(body, point=point.key)
    return TreeMap.from_json(body, point=point.key).by_path()


def _scan(source: BlockSource | TreeSource, request: BackupRequest, previous: PreviousMap,
          writer: _ChunkWriter, sink: ProgressSink, also: Sequence[PreviousMap] = ()) -> "_Scanned":
    with ThreadPoolExecutor(max_workers=request.workers, thread_name_prefix=f"backup-{request.disk}") as pool_exec:
        buffers = BufferPool(request.workers * 2 + 1, request.block_size)
        if isinstance(source, TreeSource):
            entries = previous if isinstance(previous, dict) else {}
            forced = {path for m in [entries, *also] if isinstance(m, dict)
                      for path, e in m.items() if writer.damaged.intersection(e.chunks)}
            return _scan_tree(source, request, entries, forced, writer, pool_exec, buffers, sink)
        blocks = previous if isinstance(previous, BlockMap) else None
        forced = {i for m in [blocks, *also] if isinstance(m, BlockMap) for i in damaged_blocks(m, writer.damaged)}
        return _scan_blocks(source, request, blocks, forced, writer, pool_exec, buffers, sink)


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
    #: bytes in blocks that hold data (not holes)
    used: int


def _resolved(result: tuple[bytes, bytes]) -> Future[tuple[bytes, bytes]]:
    done: Future[tuple[bytes, bytes]] = Future()
    done.set_result(result)
    return done


def _submit(executor: ThreadPoolExecutor, writer: _ChunkWriter, block: SourceBlock, previous_id: bytes | None,
            failed: threading.Event) -> Future[tuple[bytes, bytes]]:
    future = executor.submit(writer.process, block, previous_id)

    def note_failure(done: Future[tuple[bytes, bytes]]) -> None:
        if not done.cancelled() and done.exception() is not None:
            failed.set()  # the reader stops feeding blocks at its next step

    future.add_done_callback(note_failure)
    return future


def _scan_blocks(source: BlockSource, request: BackupRequest, previous: BlockMap | None, forced: set[int],
                 writer: _ChunkWriter, executor: ThreadPoolExecutor, buffers: BufferPool,
                 sink: ProgressSink) -> _Scanned:
    sink.add_total("scanned", source.prepare(request.block_size))
    failed = threading.Event()
    futures: list[Future[tuple[bytes, bytes]]] = []
    size = 0
    for block in source.blocks(request.block_size, None if request.rehash else unmatchable(previous, forced), buffers):
        if failed.is_set() or cancel.requested():
            block.release()
            break  # a worker failed or a stop was asked for: stop reading
        prev_id = previous.chunks[block.index] if previous and block.index < len(previous.chunks) else None
        size += block.length  # what was read: a live image may have shrunk since prepare()
        if block.data is None:
            # Known unchanged: nothing to hash, so no round trip through the pool, whose cost
            # per block would make a tracked incremental grow with the disk, not the change.
            futures.append(_resolved(writer.process(block, prev_id)))
        else:
            futures.append(_submit(executor, writer, block, prev_id, failed))
    results = _collect(futures, failed)
    host_side = source.fingerprint != "chunk-id"
    block_map = BlockMap(size=size, block_size=request.block_size, chunks=[cid for cid, _ in results],
                         fingerprint=source.fingerprint,
                         fingerprints=[fp for _, fp in results] if host_side else None)
    return _Scanned("block", block_map.to_json(), size, len(results), None, block_map.used_bytes())


def _scan_tree(source: TreeSource, request: BackupRequest, previous: dict[str, TreeEntry], forced: set[str],
               writer: _ChunkWriter, executor: ThreadPoolExecutor, buffers: BufferPool,
               sink: ProgressSink) -> _Scanned:
    failed = threading.Event()
    entries: list[TreeEntry] = []
    pending: list[tuple[TreeEntry, list[Future[tuple[bytes, bytes]]], list[int]]] = []
    # Files with damaged chunks look new to the source, so it reads them again.
    for item in source.walk({} if request.rehash else {p: e for p, e in previous.items() if p not in forced}):
        if failed.is_set() or cancel.requested():
            break
        entry = item.entry
        entries.append(entry)
        if entry.type != "file" or item.read_blocks is None:
            continue
        old = previous.get(entry.path)
        if not request.rehash and unchanged(old, entry) and entry.path not in forced:
            entry.chunks = list(old.chunks)  # type: ignore[union-attr]  # not read at all
            continue
        sink.add_total("scanned", entry.size)
        futures, lengths = [], []
        for block in item.read_blocks(request.block_size, buffers):
            if failed.is_set() or cancel.requested():
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
    return _Scanned("directory", tree.to_json(), size, sum(len(e.chunks) for e in entries), len(entries), size)
