"""Disks on this machine: an image file or block device read directly (holes skipped, as
SEEK_DATA finds them), and a directory listed by the same code a host runs
(host_scripts/blockscan.py)."""

from __future__ import annotations

import os
import stat
from functools import partial
from pathlib import Path
from typing import Iterator, Mapping

import structlog

from tasks.backup.errors import SourceError
from tasks.backup.host_scripts import blockscan
from tasks.backup.repo.blockmap import BlockMap, TreeEntry
from tasks.backup.sources.base import (
    BufferPool, SourceBlock, SourceFile, TrackedChanges, entry_from_scan, hole_block, tracked_blocks,
)

log = structlog.stdlib.get_logger("patchdrill.backup")


def _read_blocks(handle_path: str, block_size: int, pool: BufferPool, size: int | None = None) -> Iterator[SourceBlock]:
    try:
        handle = open(handle_path, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"cannot read {handle_path!r}: {exc.strerror}") from None
    with handle:
        index = 0
        while True:
            buffer = pool.acquire()
            view = memoryview(buffer)[:block_size]
            filled = 0
            try:
                while filled < block_size:
                    got = handle.readinto(view[filled:])
                    if not got:
                        break
                    filled += got
            except OSError as exc:
                pool.release(buffer)
                raise SourceError(f"read error in {handle_path!r} at offset {index * block_size}: {exc.strerror}") from None
            if filled == 0:
                pool.release(buffer)
                return
            yield SourceBlock(index, filled, view[:filled], None, partial(pool.release, buffer))
            index += 1
            if size is not None and index * block_size >= size:
                return


def _read_file(path: str, size: int, block_size: int, pool: BufferPool) -> Iterator[SourceBlock]:
    return _read_blocks(path, block_size, pool, size)


def _read_image(path: str, block_size: int, pool: BufferPool, size: int) -> Iterator[SourceBlock]:
    """The blocks of an image: those inside a hole are not read, and they and all-zero blocks
    come as holes (blocks of a file that shrank since `size` was taken are not invented)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        for offset, length, in_hole in blockscan.block_layout(fd, size, block_size):
            index = offset // block_size
            if in_hole:
                yield hole_block(index, length)
                continue
            buffer = pool.acquire()
            view = memoryview(buffer)[:length]
            try:
                filled = blockscan.read_data(fd, view, offset)
            except OSError as exc:
                pool.release(buffer)
                raise SourceError(f"read error in {path!r} at offset {offset}: {exc.strerror}") from None
            if filled == 0 or blockscan.is_zero(view[:filled]):
                pool.release(buffer)
                if filled == 0:
                    return
                yield hole_block(index, filled)
            else:
                yield SourceBlock(index, filled, view[:filled], None, partial(pool.release, buffer))
            if filled < length:
                return
    finally:
        os.close(fd)


class LocalBlockSource:
    """An image file or block device on this machine, read directly (only the changed blocks
    when `tracked` says which)."""

    fingerprint = "chunk-id"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._size: int | None = None
        self.tracked: TrackedChanges | None = None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SourceError(f"cannot back up {self.path!r}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise SourceError(f"{self.path!r} is neither an image file nor a block device")

    def prepare(self, block_size: int) -> int:
        with open(self.path, "rb") as handle:
            self._size = handle.seek(0, os.SEEK_END)
        return self._size

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]:
        if self.tracked is None:
            size = self._size if self._size is not None else self.prepare(block_size)
            return _read_image(self.path, block_size, pool, size)
        return self._tracked_blocks(self.tracked, block_size, previous, pool)

    def _tracked_blocks(self, tracked: TrackedChanges, block_size: int, previous: BlockMap | None,
                        pool: BufferPool) -> Iterator[SourceBlock]:
        if tracked.size != self._size:
            raise SourceError(f"{self.path!r} is {self._size} bytes, but its tracked changes describe {tracked.size}")
        with open(self.path, "rb", buffering=0) as handle:
            def read(index: int, length: int) -> SourceBlock:
                buffer = pool.acquire()
                view = memoryview(buffer)[:length]
                try:
                    got = blockscan.read_data(handle.fileno(), view, index * block_size)
                except OSError as exc:
                    pool.release(buffer)
                    raise SourceError(f"read error in {self.path!r} at offset {index * block_size}: {exc.strerror}") from None
                if got != length:
                    pool.release(buffer)
                    raise SourceError(f"{self.path!r} changed size while being read (block {index})")
                if blockscan.is_zero(view):
                    pool.release(buffer)
                    return hole_block(index, length)
                return SourceBlock(index, length, view, None, partial(pool.release, buffer))

            yield from tracked_blocks(tracked, previous, block_size, read)


class LocalTreeSource:
    """A directory on this machine, listed by the same code a host runs (blockscan.entries):
    the root first, then entries in sorted path order, parents first."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise SourceError(f"cannot back up {self.path!r}: not a directory")
        self.skipped: list[str] = []
        self.root: TreeEntry | None = None

    def walk(self, previous: Mapping[str, TreeEntry]) -> Iterator[SourceFile]:
        skipped: list[list[str]] = []
        try:
            for body in blockscan.entries(self.path, skipped):
                entry = entry_from_scan(body)
                if entry.path == "":
                    self.root = entry
                elif body["type"] != "other":
                    full = os.path.join(self.path, entry.path)
                    reader = partial(_read_file, full, entry.size) if entry.type == "file" else None
                    yield SourceFile(entry, reader)
        except OSError as exc:
            raise SourceError(f"cannot list {exc.filename or self.path!r}: {exc.strerror}") from None
        finally:
            self.skipped.extend(f"{path}: {why}" for path, why in skipped)
            for path, why in skipped:
                log.warning("backup.skipped", source=self.path, entry=path, why=why)


def is_directory_disk(path: str, kind: str) -> bool:
    if kind == "auto":
        return os.path.isdir(path)
    return kind == "directory"
