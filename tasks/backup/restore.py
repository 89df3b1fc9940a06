"""Restoring a recovery point: a whole image, a whole directory, or selected files.

A new target is built under a temporary sibling name and renamed into place only when complete.
An existing target is refused unless forced; forced, the restore is delta-aware (each target
block is hashed and only differing blocks are written), which is what failback relies on.
Every chunk is verified against its id before a byte of it is written.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from tasks.backup import cancel, progress as progress_mod
from tasks.backup.blockmap import BlockMap, TreeEntry, TreeMap
from tasks.backup.engine import default_workers
from tasks.backup.errors import PointNotFound, TargetExists
from tasks.backup.progress import ProgressSink
from tasks.backup.repository import RecoveryPoint, Repository

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


class _Blocks:
    """Fetches verified chunks (with a small cache for recurring ones) and writes them at offsets."""

    def __init__(self, repo: Repository, point: RecoveryPoint, recurring: set[bytes], sink: ProgressSink) -> None:
        self.repo = repo
        self.point = point
        self.recurring = recurring
        self.sink = sink
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

    def write(self, fd: int, chunk_id: bytes, offset: int, length: int, *, delta: bool, skip_zero: bytes | None) -> None:
        cancel.check()  # every block is queued up front: a stop drops the rest unwritten
        if delta:
            current = os.pread(fd, length, offset)
            if len(current) == length and self.repo.codec.chunk_id(current) == chunk_id:
                self.sink.advance("restored", length)
                return
        if chunk_id != skip_zero:  # a fresh, pre-sized file already reads as zeros there
            data = self.chunk(chunk_id)
            os.pwrite(fd, data, offset)
            with self._lock:
                self.written_blocks += 1
                self.written_bytes += len(data)
        self.sink.advance("restored", length)


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.patchdrill-restore-{uuid.uuid4().hex[:12]}")


def _check_target(target: Path, force: bool, point: RecoveryPoint) -> bool:
    """Whether target exists (and may be overwritten); refuses an existing one without force."""
    if not os.path.lexists(target):
        return False
    if target.is_dir() and point.kind == "directory" and not any(target.iterdir()):
        return False  # an empty directory holds nothing to lose
    if not force:
        raise TargetExists(f"restore target {str(target)!r} exists; use --force (force=True) to overwrite it "
                           f"(only blocks that differ from point {point.key} are written)")
    return True


def restore(repo: Repository, point: RecoveryPoint, target: str | Path, *, force: bool = False,
            include: list[str] | None = None, workers: int | None = None,
            progress: ProgressSink | None = None, sync: bool = True) -> RestoreResult:
    """Restore point to target (a file/device path, or a directory for directory points).

    sync=True (the default) flushes an image to stable storage before it is renamed into place
    or reported restored: after a disaster, "restored" should survive the next power cut.
    """
    sink = progress or progress_mod.current()
    started = time.monotonic()
    target = Path(target).absolute()
    body = repo.get_map(point.map.id, point=point.key)
    # A restore into a fresh location (a DR target, an empty volume) creates the path to it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="restore") as pool:
        if point.kind == "block":
            if include:
                raise PointNotFound(f"point {point.key} is a block-level image: it has no files to select")
            block_map = BlockMap.from_json(body, point=point.key)
            recurring = {c for c, n in Counter(block_map.chunks).items() if n > 1}
            blocks = _Blocks(repo, point, recurring, sink)
            _restore_image(block_map, target, force, point, blocks, pool, sink, sync)
            total, files = len(block_map.chunks), None
        else:
            tree = TreeMap.from_json(body, point=point.key)
            entries = _select(tree.entries, include, point)
            recurring = {c for c, n in Counter(c for e in entries for c in e.chunks).items() if n > 1}
            blocks = _Blocks(repo, point, recurring, sink)
            _restore_tree(entries, tree.block_size, target, force, point, blocks, pool, sink)
            total, files = sum(len(e.chunks) for e in entries), len(entries)
    result = RestoreResult(point=point.key, target=str(target), blocks=total, blocks_written=blocks.written_blocks,
                           bytes_written=blocks.written_bytes, files=files, seconds=round(time.monotonic() - started, 3))
    log.info("restore.done", point=point.key, target=str(target), blocks=total,
             blocks_written=blocks.written_blocks, seconds=result.seconds)
    return result


def _restore_image(block_map: BlockMap, target: Path, force: bool, point: RecoveryPoint, blocks: _Blocks,
                   pool: ThreadPoolExecutor, sink: ProgressSink, sync: bool) -> None:
    exists = _check_target(target, force, point)
    sink.add_total("restored", block_map.size)
    if exists:
        is_device = stat.S_ISBLK(os.stat(target).st_mode)
        fd = os.open(target, os.O_RDWR)
        try:
            _write_blocks(fd, block_map.chunks, block_map.block_size, block_map.size, blocks, pool, delta=True, zero=None)
            if not is_device:
                os.ftruncate(fd, block_map.size)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return
    temp = _temp_sibling(target)
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, block_map.size)
            zero = blocks.repo.codec.chunk_id(bytes(block_map.block_size))
            _write_blocks(fd, block_map.chunks, block_map.block_size, block_map.size, blocks, pool, delta=False, zero=zero)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_blocks(fd: int, chunks: list[bytes], block_size: int, size: int, blocks: _Blocks,
                  pool: ThreadPoolExecutor, *, delta: bool, zero: bytes | None) -> None:
    futures = [pool.submit(blocks.write, fd, cid, i * block_size, min(block_size, size - i * block_size),
                           delta=delta, skip_zero=zero) for i, cid in enumerate(chunks)]
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _select(entries: list[TreeEntry], include: list[str] | None, point: RecoveryPoint) -> list[TreeEntry]:
    """Entries matching include (exact paths, directories with their contents, or glob patterns),
    plus the directories above them so they have somewhere to go."""
    if not include:
        return entries
    patterns = [p.strip("/") for p in include]

    def wanted(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") or fnmatch.fnmatchcase(path, p) for p in patterns)

    chosen = {e.path for e in entries if wanted(e.path)}
    if not chosen:
        raise PointNotFound(f"point {point.key} has no file matching {', '.join(include)}")
    parents = {"/".join(p.split("/")[:i]) for p in chosen for i in range(1, p.count("/") + 1)}
    return [e for e in entries if e.path in chosen or (e.path in parents and e.type == "dir")]


def _restore_tree(entries: list[TreeEntry], block_size: int, target: Path, force: bool, point: RecoveryPoint,
                  blocks: _Blocks, pool: ThreadPoolExecutor, sink: ProgressSink) -> None:
    exists = _check_target(target, force, point)
    sink.add_total("restored", sum(e.size for e in entries))
    if exists:
        _write_tree(entries, block_size, target, blocks, pool, delta=True)
        return
    temp = _temp_sibling(target)
    try:
        temp.mkdir(mode=0o700)
        _write_tree(entries, block_size, temp, blocks, pool, delta=False)
        if target.is_dir():
            target.rmdir()  # empty, checked above
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _write_tree(entries: list[TreeEntry], block_size: int, root: Path, blocks: _Blocks,
                pool: ThreadPoolExecutor, *, delta: bool) -> None:
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    for entry in entries:
        cancel.check()
        path = root.joinpath(*entry.path.split("/"))
        if entry.type == "dir":
            if os.path.lexists(path) and not path.is_dir():
                path.unlink()
            path.mkdir(mode=0o700, exist_ok=True)
        elif entry.type == "symlink":
            if os.path.lexists(path):
                _remove(path)
            os.symlink(entry.target or "", path)
        else:
            _write_file(entry, block_size, path, blocks, pool, delta=delta)
        if entry.type != "dir":
            _apply_metadata(path, entry, as_root)
    # Directories last and deepest first: writing into one changes its mtime.
    for entry in reversed(entries):
        if entry.type == "dir":
            _apply_metadata(root.joinpath(*entry.path.split("/")), entry, as_root)


def _write_file(entry: TreeEntry, block_size: int, path: Path, blocks: _Blocks, pool: ThreadPoolExecutor,
                *, delta: bool) -> None:
    if os.path.lexists(path) and not (path.is_file() and not path.is_symlink()):
        _remove(path)
    in_place = delta and path.is_file()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not in_place:
            os.ftruncate(fd, 0)
        _write_blocks(fd, entry.chunks, block_size, entry.size, blocks, pool, delta=in_place, zero=None)
        os.ftruncate(fd, entry.size)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _apply_metadata(path: Path, entry: TreeEntry, as_root: bool) -> None:
    if as_root:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if entry.type != "symlink":
        os.chmod(path, entry.mode)
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
