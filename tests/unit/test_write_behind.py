"""A restore's writes go to disk as they are made and leave the page cache past a window: a
multi-gigabyte restore holds a window's worth of memory, not the whole image, and its final
fsync finds little left to write.

Real files on a disk-backed file system (a directory beside this test: the page cache of a
tmpfs, which /tmp may be, cannot be dropped), page-cache residency read with mincore(2), and a
real pipe for a descriptor that cannot be written back."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.host_scripts import blockscan
from tasks.backup.repo.repository import Repository
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource

MIB = 1024 * 1024
PAGE = mmap.PAGESIZE


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent, prefix=".write-behind-") as found:
        yield Path(found)


def resident_mib(path: Path) -> list[bool]:
    """Per MiB of path: whether any of its pages is in the page cache (mincore on a mapping)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        pages = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
        try:
            assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
            per_mib = MIB // PAGE
            return [any(pages.raw[i:i + per_mib]) for i in range(0, len(pages.raw), per_mib)]
        finally:
            del address  # the buffer export must go before the mapping closes


def write_mib(fd: int, behind: blockscan.WriteBehind | None, count: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(count * MIB)
    for index in range(count):
        os.pwrite(fd, data[index * MIB:(index + 1) * MIB], index * MIB)
        if behind is not None:
            behind.written(index * MIB, MIB)
    return data


def test_written_ranges_leave_the_cache_past_the_window_and_the_last_window_stays(disk_dir: Path) -> None:
    path = disk_dir / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = write_mib(fd, blockscan.WriteBehind(fd, window=2 * MIB), 12)
    finally:
        os.close(fd)
    cached = resident_mib(path)
    assert not any(cached[:10]), cached  # written back and dropped as the restore went
    assert all(cached[10:]), cached  # the window: what a program reads first after a restore
    assert path.read_bytes() == data


def test_without_write_behind_the_whole_file_stays_cached(disk_dir: Path) -> None:
    """The contrast that makes the test above mean something: the same writes, left to the
    page cache, keep every page of the file in memory."""
    path = disk_dir / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_mib(fd, None, 12)
    finally:
        os.close(fd)
    assert all(resident_mib(path))


def test_ranges_reported_out_of_order_from_threads_all_leave_the_cache(disk_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = disk_dir / "image"
    data = random.Random(2).randbytes(16 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        behind = blockscan.WriteBehind(fd, window=MIB)
        order = list(range(16))
        random.Random(3).shuffle(order)

        def one(index: int) -> None:
            os.pwrite(fd, data[index * MIB:(index + 1) * MIB], index * MIB)
            behind.written(index * MIB, MIB)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(one, order))
    finally:
        os.close(fd)
    assert sum(resident_mib(path)) <= 2  # at most the window (and a range straddling it)
    assert path.read_bytes() == data


def test_a_descriptor_that_cannot_be_written_back_is_left_to_the_page_cache() -> None:
    reading, writing = os.pipe()
    try:
        behind = blockscan.WriteBehind(writing, window=0)
        os.write(writing, b"x" * 100)
        behind.written(0, 100)  # ESPIPE: nothing to write back, not an error
        assert behind.enabled is False
        assert os.read(reading, 100) == b"x" * 100
    finally:
        os.close(reading)
        os.close(writing)


def test_a_restored_image_leaves_only_the_window_cached_and_equals_the_point(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open(LocalBlobStore(disk_dir / "repo"), create=True)
    image = disk_dir / "disk.img"
    image.write_bytes(random.Random(4).randbytes(24 * MIB))
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="vm", block_size=MIB, workers=3))
    monkeypatch.setattr(blockscan, "WRITE_BEHIND_BYTES", 4 * MIB)

    restored = disk_dir / "restored.img"
    restore(repo, point, restored)
    cached = resident_mib(restored)
    assert sum(cached) <= 6, cached  # the window and the blocks in flight, not 24 MiB
    assert restored.read_bytes() == image.read_bytes()
