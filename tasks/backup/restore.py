"""Restoring a recovery point: a whole image, a whole directory, or selected files.

A new target is built under a temporary sibling name and renamed into place only when complete.
An existing target is refused unless forced (an empty directory needs no force); forced, the
restore is delta-aware (each target block is hashed and only differing blocks are written),
which is what failback relies on. Every chunk is verified against its id before a byte of it
is written.

Directories are written by the host-side tree writer (host_scripts/blockscan.py), the same
code a restore onto another host runs: every name is reached through directory descriptors
with O_NOFOLLOW, so a symbolic link in the target is replaced, never followed. An existing
directory, a mount point included, is restored in place on its own file system, and a whole
point's restore removes what the point lacks: the result equals the point.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import structlog

from tasks.backup.host_scripts import blockscan
from tasks.backup import cancel, progress as progress_mod
from tasks.backup.repo.blockmap import HOLE, BlockMap, TreeEntry, TreeMap
from tasks.backup.scheduling import default_workers
from tasks.backup.errors import PointNotFound, RestoreFailed, TargetExists
from tasks.backup.progress import ProgressSink
from tasks.backup.repo.repository import RecoveryPoint, Repository

log = structlog.stdlib.get_logger("patchdrill.backup")

#: chunks that recur within a point (zero blocks, repeated files) are kept after first use
_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RestoreResult:
    point: str
    target: str
    blocks: int
    blocks_written: int
    bytes_written: int
    files: int | None
    seconds: float
    #: entries of an existing target that the point lacks, removed so the result equals the point
    removed: int = 0
    #: "path: why" for what was not restored as recorded (e.g. a device node without root,
    #: an xattr the target's file system refuses, a socket the backup could not keep)
    skipped: list[str] = field(default_factory=list)
    #: where the data came from: "repository", or "instant copy" (the point's clone kept on its host)
    source: str = "repository"
    #: why an instant copy could not serve, when the point had one
    notes: list[str] = field(default_factory=list)


class _Blocks:
    """Fetches verified chunks (with a small cache for recurring ones) and writes them at offsets."""

    def __init__(self, repo: Repository, point: RecoveryPoint, recurring: set[bytes], sink: ProgressSink,
                 block_size: int) -> None:
        self.repo = repo
        self.point = point
        self.recurring = recurring
        self.sink = sink
        self.zero = repo.codec.chunk_id(bytes(block_size))
        self._cache: dict[bytes, bytes] = {}
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.written_blocks = 0
        self.written_bytes = 0

    def chunk(self, chunk_id: bytes) -> bytes:
        cached = self._cache.get(chunk_id)
        if cached is not None:
            return cached
        data = self.repo.get_chunk(chunk_id, point=self.point.key)
        if chunk_id in self.recurring:
            with self._lock:
                if self._cached_bytes + len(data) <= _CACHE_BYTES:
                    self._cache[chunk_id] = data
                    self._cached_bytes += len(data)
        return data

    def write(self, fd: int, chunk_id: bytes, offset: int, length: int, *, fresh: bool, punch: bool) -> bool:
        """Write one block; whether anything was written. fresh: the file is new and reads as
        zeros (only non-zero pages are written); otherwise the block is hashed first and written
        only if it differs, with zero pages punched as holes where punch (regular files)."""
        cancel.check()  # every block is queued up front: a stop drops the rest unwritten
        if chunk_id == HOLE:
            wrote = self._hole(fd, offset, length, fresh=fresh, punch=punch)
            self.sink.advance("restored", length)
            return wrote
        if not fresh:
            current = os.pread(fd, length, offset)
            if len(current) == length and self.repo.codec.chunk_id(current) == chunk_id:
                self.sink.advance("restored", length)
                return False
        wrote = not (fresh and chunk_id == self.zero)
        if wrote:
            data = self.chunk(chunk_id)
            blockscan.write_sparse(fd, data, offset, fresh, punch)
            with self._lock:
                self.written_blocks += 1
                self.written_bytes += len(data)
        self.sink.advance("restored", length)
        return wrote

    def _hole(self, fd: int, offset: int, length: int, *, fresh: bool, punch: bool) -> bool:
        """A block the point holds as a hole: left alone in a fresh file, made zeros (punched
        where punch) in an existing one unless it reads as zeros already."""
        if not fresh:
            current = os.pread(fd, length, offset)
            if len(current) < length or not blockscan.is_zero(current):
                blockscan.write_zeros(fd, offset, length, False, punch)
                with self._lock:
                    self.written_blocks += 1
                return True
        return False


def decide(found: Mapping[str, Any], point: RecoveryPoint, force: bool, where: str) -> bool:
    """Whether an existing target is restored onto in place, from blockscan.probe's description
    of it; refuses what must not be touched. Shared by local and host restores."""
    if found.get("readonly"):
        raise RestoreFailed(f"cannot restore into {where!r}: Read-only file system")
    if found.get("writable") is False and not (found["exists"] and found.get("kind") in ("file", "blockdev")):
        raise RestoreFailed(f"cannot restore into {where!r}: Permission denied (its directory is not writable)")
    if not found["exists"]:
        return False
    kind = found["kind"]
    if kind == "symlink":
        if point.kind == "block" and found.get("resolved") == "blockdev":
            kind = "blockdev"  # /dev/disk/by-id/… names are links to the device itself
        else:
            raise RestoreFailed(f"restore target {where!r} is a symbolic link (to {found['link']!r}): a restore never "
                                "follows one; give the path it leads to")
    if point.kind == "directory" and kind != "dir":
        raise RestoreFailed(f"restore target {where!r} is not a directory; point {point.key} is a directory tree")
    if point.kind == "block" and kind not in ("file", "blockdev"):
        raise RestoreFailed(f"restore target {where!r} is not an image file or block device; point {point.key} "
                            "is a block-level image")
    if kind == "dir" and found.get("empty"):
        return True  # an empty directory (a freshly mounted volume) holds nothing to lose
    if not force:
        raise TargetExists(f"restore target {where!r} exists; use --force (force=True) to overwrite it "
                           f"(only blocks that differ from point {point.key} are written, and what the point "
                           "lacks is removed)")
    return True


def os_problem(where: str, exc: OSError) -> str:
    """One line naming the target (and the entry in it) instead of a temporary path."""
    at = getattr(exc, "restore_path", "")
    inside = f" (at {at!r})" if at else ""
    return f"cannot restore into {where!r}{inside}: {exc.strerror or exc}"


def restore(repo: Repository, point: RecoveryPoint, target: str | Path, *, force: bool = False,
            include: list[str] | None = None, workers: int | None = None,
            progress: ProgressSink | None = None, sync: bool = True) -> RestoreResult:
    """Restore point to target (a file/device path, or a directory for directory points).

    sync=True (the default) flushes an image, and the directory holding it, to stable storage
    before it is reported restored: after a disaster, "restored" should survive the next power
    cut. Directory restores always fsync every file and directory they write.
    """
    sink = progress or progress_mod.current()
    started = time.monotonic()
    target = Path(target).absolute()
    body = repo.get_map(point.map.id, point=point.key)
    if point.kind == "block" and include:
        raise PointNotFound(f"point {point.key} is a block-level image: it has no files to select")
    removed, skipped = 0, []
    try:
        # A restore into a fresh location (a DR target, an empty volume) creates the path to it.
        target.parent.mkdir(parents=True, exist_ok=True)
        found = blockscan.probe(str(target))
        if found["removed"]:
            log.warning("restore.leftovers_removed", target=str(target), removed=found["removed"])
        in_place = decide(found, point, force, str(target))
        with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="restore") as pool:
            if point.kind == "block":
                block_map = BlockMap.from_json(body, point=point.key)
                recurring = {c for c, n in Counter(block_map.chunks).items() if n > 1}
                blocks = _Blocks(repo, point, recurring, sink, block_map.block_size)
                _restore_image(block_map, target, in_place, blocks, pool, sink, sync)
                total, files = len(block_map.chunks), None
            else:
                tree = TreeMap.from_json(body, point=point.key)
                entries = select_entries(tree.entries, include, point)
                recurring = {c for c, n in Counter(c for e in entries for c in e.chunks).items() if n > 1}
                blocks = _Blocks(repo, point, recurring, sink, tree.block_size)
                sink.add_total("restored", sum(e.size for e in entries))
                removed, skipped = _restore_tree(tree, entries, target, whole=not include, blocks=blocks, pool=pool)
                total, files = sum(len(e.chunks) for e in entries), len(entries)
    except OSError as exc:
        raise RestoreFailed(os_problem(str(target), exc)) from None
    result = RestoreResult(point=point.key, target=str(target), blocks=total, blocks_written=blocks.written_blocks,
                           bytes_written=blocks.written_bytes, files=files, seconds=round(time.monotonic() - started, 3),
                           removed=removed, skipped=skipped)
    log.info("restore.done", point=point.key, target=str(target), blocks=total,
             blocks_written=blocks.written_blocks, removed=removed, skipped=len(skipped), seconds=result.seconds)
    for line in skipped:
        log.warning("restore.skipped", target=str(target), entry=line)
    return result


def _restore_image(block_map: BlockMap, target: Path, in_place: bool, blocks: _Blocks,
                   pool: ThreadPoolExecutor, sink: ProgressSink, sync: bool) -> None:
    sink.add_total("restored", block_map.size)
    if in_place:
        # decide() let a link through only when it leads to a block device.
        fd = os.open(os.path.realpath(target), os.O_RDWR | os.O_CLOEXEC)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            _write_blocks(fd, block_map.chunks, block_map.block_size, block_map.size, blocks, pool,
                          fresh=False, punch=regular)
            if regular:
                os.ftruncate(fd, block_map.size)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return
    temp = blockscan.temp_name(target)
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, block_map.size)
            _write_blocks(fd, block_map.chunks, block_map.block_size, block_map.size, blocks, pool,
                          fresh=True, punch=True)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
        if sync:
            blockscan.fsync_dir(str(target.parent))
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise


def _write_blocks(fd: int, chunks: list[bytes], block_size: int, size: int, blocks: _Blocks,
                  pool: ThreadPoolExecutor, *, fresh: bool, punch: bool) -> None:
    behind = blockscan.WriteBehind(fd)

    def write(chunk_id: bytes, offset: int, length: int) -> None:
        # Only what was written: a block found equal is read, not dirtied, and stays cached.
        if blocks.write(fd, chunk_id, offset, length, fresh=fresh, punch=punch):
            behind.written(offset, length)

    futures = [pool.submit(write, cid, i * block_size, min(block_size, size - i * block_size))
               for i, cid in enumerate(chunks)]
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def select_entries(entries: list[TreeEntry], include: list[str] | None, point: RecoveryPoint) -> list[TreeEntry]:
    """Entries matching include (exact paths, directories with their contents, or glob patterns),
    plus the directories above them so they have somewhere to go, and the first link of any
    selected hard link."""
    if not include:
        return entries
    patterns = [p.strip("/") for p in include]

    def wanted(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") or fnmatch.fnmatchcase(path, p) for p in patterns)

    chosen = {e.path for e in entries if wanted(e.path)}
    if not chosen:
        raise PointNotFound(f"point {point.key} has no file matching {', '.join(include)}")
    chosen |= {e.target for e in entries if e.path in chosen and e.type == "hardlink" and e.target}
    parents = {"/".join(p.split("/")[:i]) for p in chosen for i in range(1, p.count("/") + 1)}
    return [e for e in entries if e.path in chosen or (e.path in parents and e.type == "dir")]


def tree_plan(tree: TreeMap, entries: list[TreeEntry], *, whole: bool) -> dict[str, Any]:
    """What the tree writer is handed: the entries, the root's metadata and whether to remove
    what the point lacks (both only when the whole point is restored, not selected files)."""
    def body(entry: TreeEntry) -> dict[str, Any]:
        found = entry.to_json()
        found.pop("chunks", None)  # the writer is handed content, not chunk ids
        if tree.version >= 2 and entry.type in ("file", "dir"):
            # Version 2 maps record every xattr, so none listed means none (stray ones go);
            # version 1 maps recorded none at all, so the target's are left alone.
            found.setdefault("xattrs", {})
        return found

    return {"root": body(tree.root) if whole and tree.root else None,
            "entries": [body(e) for e in entries], "prune": whole}


def _restore_tree(tree: TreeMap, entries: list[TreeEntry], target: Path, *, whole: bool, blocks: _Blocks,
                  pool: ThreadPoolExecutor) -> tuple[int, list[str]]:
    by_path = {e.path: e for e in entries}

    def write_file(fd: int, body: dict[str, Any], in_place: bool) -> None:
        cancel.check()  # between files: a stop leaves the rest of the tree as it was
        entry = by_path[body["path"]]
        _write_blocks(fd, entry.chunks, tree.block_size, entry.size, blocks, pool, fresh=not in_place, punch=True)

    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    removed, skipped = blockscan.place_tree(str(target), tree_plan(tree, entries, whole=whole), write_file, as_root)
    return removed, tree.skipped + [f"{path}: {why}" for path, why in skipped]
