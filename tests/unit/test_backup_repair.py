"""Damaged chunks heal: verify records them, the next backup rewrites them, repair reads them back
from the live disk. Real local store, real files; the damage is a flipped byte in a stored blob."""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import ChunkCorrupt, SourceError
from tasks.backup.repair import repair
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.repository import Repository, chunk_key
from tasks.backup.restore import restore
from tasks.backup.repo.retention import prune
from tasks.backup.sources.base import BlockSource, TreeSource
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tasks.backup.repo.verify import verify
from tests.unit.test_backup_engine import repo, store  # noqa: F401 - fixtures

BLOCK = 64 * 1024


def request(disk: str = "data") -> BackupRequest:
    return BackupRequest(host="web-1", disk=disk, block_size=BLOCK, workers=3)


def flip_byte(store: LocalBlobStore, chunk_id: bytes) -> None:
    path = store.root / chunk_key(chunk_id)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_flipped_chunk_is_rewritten_by_the_next_backup(repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(16 * BLOCK))
    first = backup(repo, LocalBlockSource(image), request())
    victim = repo.codec.chunk_id(image.read_bytes()[5 * BLOCK:6 * BLOCK])
    flip_byte(store, victim)

    found = verify(repo)
    assert found.corrupt == {victim.hex(): [first.key]}
    assert set(repo.damaged_chunks()) == {victim}  # recorded in the repository, for backups and repair

    # The disk is unchanged: a name-only "already stored" would reference the bad blob again.
    second = backup(repo, LocalBlockSource(image), request())
    assert second.totals.repaired_chunks == 1 and second.totals.uploaded_chunks == 1
    assert second.totals.changed_blocks == 0
    assert verify(repo).ok
    assert repo.damaged_chunks() == {}
    restore(repo, first, tmp_path / "first.img")  # the older point is whole again too
    assert (tmp_path / "first.img").read_bytes() == image.read_bytes()


def test_unchanged_file_with_a_bad_chunk_is_read_again(repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "app.conf").write_bytes(random.Random(2).randbytes(3 * BLOCK))
    (tree / "other.bin").write_bytes(random.Random(3).randbytes(BLOCK))
    backup(repo, LocalTreeSource(tree), request("tree"))
    victim = repo.codec.chunk_id((tree / "etc" / "app.conf").read_bytes()[BLOCK:2 * BLOCK])
    flip_byte(store, victim)
    assert not verify(repo).ok

    second = backup(repo, LocalTreeSource(tree), request("tree"))
    # Size and mtime say "unchanged", so only the damaged file is read, and only its bad chunk rewritten.
    assert second.totals.scanned == 3 * BLOCK and second.totals.repaired_chunks == 1
    assert verify(repo).ok


def test_a_chunk_deleted_behind_the_index_is_found_by_verify_or_repair_and_written_again(
        repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    """Backups trust the index for unchanged blocks (docs/repository.md, *Index*): a chunk deleted
    outside patchdrill is found by verify, or by repair's index check, and then written again."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(4).randbytes(8 * BLOCK))
    first = backup(repo, LocalBlockSource(image), request())
    gone = repo.codec.chunk_id(image.read_bytes()[:BLOCK])

    store.delete(chunk_key(gone))
    assert verify(repo).missing == {gone.hex(): [first.key]}
    second = backup(repo, LocalBlockSource(image), request())
    assert second.totals.repaired_chunks == 1
    assert verify(repo).ok

    store.delete(chunk_key(gone))
    found = repair(repo, lambda host, disk: _open(image))
    assert (found.index.stale, found.index.rebuilt, found.repaired) == (1, True, [gone.hex()])
    assert gone in chunk_index.load(repo).ids and verify(repo).ok

    # The live disk cannot give it back: repair records it, and the next backup rewrites it.
    store.delete(chunk_key(gone))

    @contextmanager
    def unreadable(host: str, disk: str) -> Iterator[BlockSource | TreeSource]:
        raise SourceError(f"cannot back up {host}/{disk}: host unreachable")
        yield  # pragma: no cover

    found = repair(repo, unreadable)
    assert found.index.stale == 1 and not found.ok and gone not in chunk_index.load(repo).ids
    third = backup(repo, LocalBlockSource(image), request())
    assert third.totals.repaired_chunks == 1 and third.totals.changed_blocks == 0
    assert verify(repo).ok and repair(repo, unreadable).index.rebuilt is False


def test_repair_rewrites_from_the_live_disk_and_names_what_stays_damaged(repo: Repository, store: LocalBlobStore,
                                                                        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(5).randbytes(8 * BLOCK))
    data = image.read_bytes()
    first = backup(repo, LocalBlockSource(image), request())
    healable = repo.codec.chunk_id(data[2 * BLOCK:3 * BLOCK])
    lost = repo.codec.chunk_id(data[6 * BLOCK:7 * BLOCK])
    flip_byte(store, healable)
    flip_byte(store, lost)
    # Block 6 changes on the live disk after the backup: its old content exists nowhere now.
    with open(image, "r+b") as handle:
        handle.seek(6 * BLOCK)
        handle.write(random.Random(6).randbytes(BLOCK))

    assert repair(repo, lambda host, disk: _open(image)).recorded == 0  # nothing recorded before verify
    assert len(verify(repo).corrupt) == 2
    opened: list[tuple[str, str]] = []

    @contextmanager
    def live(host: str, disk: str) -> Iterator[BlockSource | TreeSource]:
        opened.append((host, disk))
        yield LocalBlockSource(image)

    report = repair(repo, live)
    assert opened == [("web-1", "data")]
    assert report.repaired == [healable.hex()]
    assert report.remaining == {lost.hex(): [first.key]} and report.damaged_points == [first.key]
    assert set(repo.damaged_chunks()) == {lost}
    assert repo.get_chunk(healable) == data[2 * BLOCK:3 * BLOCK]
    with pytest.raises(ChunkCorrupt, match=lost.hex()):
        repo.get_chunk(lost)
    assert len(list(repo.store.list("points/"))) == 1  # repair writes no point
    # Once no point names the lost chunk, prune deletes it and its record.
    repo.store.delete(first.key)
    prune(repo)
    assert repo.damaged_chunks() == {}


def test_repair_reports_a_disk_it_cannot_read(repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(7).randbytes(2 * BLOCK))
    point = backup(repo, LocalBlockSource(image), request())
    flip_byte(store, repo.codec.chunk_id(image.read_bytes()[:BLOCK]))
    verify(repo)

    @contextmanager
    def gone(host: str, disk: str) -> Iterator[BlockSource | TreeSource]:
        raise SourceError(f"cannot back up {host}/{disk}: host decommissioned")
        yield  # pragma: no cover

    report = repair(repo, gone)
    assert report.unreadable_disks == {"web-1/data": "cannot back up web-1/data: host decommissioned"}
    assert report.damaged_points == [point.key] and not report.ok


@contextmanager
def _open(image: Path) -> Iterator[BlockSource]:
    yield LocalBlockSource(image)
