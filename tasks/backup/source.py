"""Where a backup reads from: the DiskSource protocols and their local implementations.

A block source yields a disk's blocks in order. A local one reads every block (into reused
buffers) and lets the engine hash it; a remote one (tasks/backup/remote_source.py) has the host
hash its blocks and sends only the changed ones, so unchanged blocks arrive without data.
A tree source walks a directory and yields entries whose file contents are read in blocks.
"""

from __future__ import annotations

import os
import queue
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import structlog

from tasks.backup.host_scripts import blockscan
from tasks.backup.blockmap import BlockMap, TreeEntry
from tasks.backup.errors import SourceError

log = structlog.stdlib.get_logger("patchdrill.backup")


class BufferPool:
    """A fixed set of block buffers: reused so a 4 MiB read costs no fresh allocation and page
    faults, and bounded so the reader cannot run ahead of the workers by more than `count`."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def acquire(self) -> bytearray:
        return self._free.get()

    def release(self, buffer: bytearray) -> None:
        self._free.put(buffer)


@dataclass
class SourceBlock:
    """One block of a disk. `data` is None when the source already knows it is unchanged."""

    index: int
    length: int
    data: memoryview | None
    fingerprint: bytes | None
    release: Callable[[], None]


def nothing_to_release() -> None:
    """The release of a block that came without data."""


@runtime_checkable
class BlockSource(Protocol):
    path: str
    #: "chunk-id" when the engine hashes the data it is given; otherwise the host-side hash name
    fingerprint: str

    def prepare(self, block_size: int) -> int:
        """Get ready to yield blocks (a remote source scans here); returns the disk's size."""

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]: ...


@dataclass
class SourceFile:
    """A directory entry; for a file whose content must be read, `read_blocks` yields it."""

    entry: TreeEntry
    read_blocks: Callable[[int, BufferPool], Iterator[SourceBlock]] | None = None


def unchanged(old: TreeEntry | None, new: TreeEntry) -> bool:
    """A file is not read again when its size, mtime, ctime and inode all match the parent
    point's (restic's default). ctime catches an edit whose mtime was set back; the inode, a
    file replaced by another. A parent that recorded no ctime (an older point) proves nothing."""
    return (old is not None and old.type == "file" and new.type == "file"
            and old.size == new.size and old.mtime_ns == new.mtime_ns
            and old.ctime_ns is not None and old.ctime_ns == new.ctime_ns and old.inode == new.inode)


def entry_from_scan(body: Mapping[str, Any]) -> TreeEntry:
    """A TreeEntry from one line of the scanner's tree listing (host_scripts/blockscan.py)."""
    return TreeEntry.from_json({**body, "chunks": []})


@runtime_checkable
class TreeSource(Protocol):
    path: str

    def walk(self, previous: Mapping[str, TreeEntry]) -> Iterator[SourceFile]:
        """Entries in path order, parents first. `previous` (the parent point's entries by path)
        lets a source plan which file contents the engine will ask for."""


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


class LocalBlockSource:
    """An image file or block device on this machine, read directly."""

    fingerprint = "chunk-id"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._size: int | None = None
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
        return _read_blocks(self.path, block_size, pool, self._size)


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
