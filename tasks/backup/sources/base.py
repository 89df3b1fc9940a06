"""The contract of a disk source: what the backup engine reads blocks and directory entries from.

A block source yields a disk's blocks in order. A local one (local.py) reads every block (into
reused buffers) and lets the engine hash it; a remote one (remote.py) has the host hash its
blocks and sends only the changed ones, so unchanged blocks arrive without data. Every block
source says which blocks read as zeros (holes, which it does not read, and all-zero data): they
arrive as holes, without data, and are stored as none. A tree source walks a directory and
yields entries whose file contents are read in blocks.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

from tasks.backup.repo.blockmap import BlockMap, TreeEntry


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
    """One block of a disk. `data` is None when the source already knows it is unchanged, or
    that it reads as zeros (`hole`)."""

    index: int
    length: int
    data: memoryview | None
    fingerprint: bytes | None
    release: Callable[[], None]
    hole: bool = False


def nothing_to_release() -> None:
    """The release of a block that came without data."""


def hole_block(index: int, length: int, fingerprint: bytes | None = None) -> SourceBlock:
    """A block that reads as zeros; `fingerprint` is a host-side hash of its zeros, kept in the
    map so the next scan's comparison holds."""
    return SourceBlock(index, length, None, fingerprint, nothing_to_release, hole=True)


class ZeroFingerprints:
    """The host-side hash of an all-zero block of each length: a block reported with it reads
    as zeros, so it is recorded as a hole and its data is neither fetched nor stored."""

    def __init__(self, hash_block: Callable[[bytes], bytes]) -> None:
        self._hash = hash_block
        self._known: dict[int, bytes] = {}

    def __call__(self, length: int) -> bytes:
        found = self._known.get(length)
        if found is None:
            found = self._known[length] = self._hash(bytes(length))
        return found


@dataclass(frozen=True)
class TrackedChanges:
    """What the host's file system says about a disk since a parent point (changed-block
    tracking, tasks/backup/kept.py): the blocks that may differ; every other block holds what
    the parent point recorded, and is neither read nor hashed."""

    #: the key of the point whose kept clone the new snapshot was compared with
    parent: str
    size: int
    changed: frozenset[int]
    #: how the comparison was made, for the point's notes
    how: str


def tracked_blocks(tracked: TrackedChanges, previous: BlockMap | None, block_size: int,
                   read: Callable[[int, int], SourceBlock]) -> Iterator[SourceBlock]:
    """Every block of a tracked disk: `read(index, length)` for the changed ones and any the
    parent cannot vouch for; the parent's fingerprint, without data, for the rest."""
    for index in range(-(-tracked.size // block_size)):
        length = min(block_size, tracked.size - index * block_size)
        known = (previous is not None and index < len(previous.chunks) and previous.block_length(index) == length)
        if index in tracked.changed or not known:
            yield read(index, length)
        else:
            assert previous is not None
            yield SourceBlock(index, length, None, previous.fingerprint_of(index), nothing_to_release)


@runtime_checkable
class BlockSource(Protocol):
    path: str
    #: "chunk-id" when the engine hashes the data it is given; otherwise the host-side hash name
    fingerprint: str
    # A source that can skip unchanged blocks has a `tracked: TrackedChanges | None` attribute,
    # set before a scan when the file system told what changed; the engine clears it when it
    # cannot be used (another parent, a rehash) and adds the blocks it must read anyway. Not a
    # protocol member: sources without it (Windows staging) stay block sources.

    def prepare(self, block_size: int) -> int:
        """Get ready to yield blocks (a remote source scans here); returns the disk's size."""

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]:
        """Every block in order. With `tracked` set, only its changed blocks come with data; the
        rest carry the fingerprint `previous` has at their index."""


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
