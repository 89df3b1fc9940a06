"""The index of stored chunks (docs/repository.md, *Index*): backups read it instead of listing
chunks/, a deleted or torn index costs time, never data, and prune and repair keep it true.
Real local store and files; the kill -9 is a real signal to a real backup process."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from connectors.stores import BlobInfo, LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.repair import repair
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.repository import Repository
from tasks.backup.repo.retention import prune
from tasks.backup.repo.verify import referenced_chunks, verify
from tasks.backup.sources.local import LocalBlockSource
from tests.unit.test_backup_engine import ROOT, make_image, rewrite_blocks

BLOCK = 64 * 1024


class CountingStore(LocalBlobStore):
    """A real local store that remembers the prefixes it was asked to list."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listed: list[str] = []

    def list(self, prefix: str = "", *, uncommitted: bool = False) -> Iterator[BlobInfo]:
        self.listed.append(prefix)
        return super().list(prefix, uncommitted=uncommitted)


def request(disk: str = "data") -> BackupRequest:
    return BackupRequest(host="web-1", disk=disk, block_size=BLOCK, workers=2)


def _index_files(store: LocalBlobStore) -> list[str]:
    return sorted(info.key for info in store.list("index/"))


def test_a_backup_reads_the_index_and_never_lists_the_chunks(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 12)
    backup(repo, LocalBlockSource(image), request())
    assert chunk_index.load(repo).ids == repo.chunk_ids()
    store.listed.clear()

    rewrite_blocks(image, [3])
    point = backup(repo, LocalBlockSource(image), request())
    assert point.totals.uploaded_chunks == 1
    assert "chunks/" not in store.listed and "index/" in store.listed
    assert chunk_index.load(repo).ids == repo.chunk_ids()  # the new chunk is indexed by the backup's own file
    assert len(_index_files(store)) == 2


def test_a_backup_after_the_index_is_deleted_lists_once_and_rebuilds_it(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 12)
    backup(repo, LocalBlockSource(image), request())
    for key in _index_files(store):
        store.delete(key)
    store.listed.clear()

    rewrite_blocks(image, [0])
    point = backup(repo, LocalBlockSource(image), request())
    assert point.totals.uploaded_chunks == 1 and point.totals.repaired_chunks == 0
    assert "chunks/" in store.listed  # no index at all: this backup listed the store
    assert chunk_index.load(repo).ids == repo.chunk_ids() == set(point_ids(repo))
    store.listed.clear()
    rewrite_blocks(image, [1])
    backup(repo, LocalBlockSource(image), request())
    assert "chunks/" not in store.listed  # and wrote the listing into its index file
    assert verify(repo).ok


def point_ids(repo: Repository) -> set[bytes]:
    return set(referenced_chunks(repo, repo.points()))


def test_a_partly_lost_or_torn_index_costs_time_never_data(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    first = make_image(tmp_path / "a.img", 8, seed=1)
    second = make_image(tmp_path / "b.img", 8, seed=2)
    backup(repo, LocalBlockSource(first), request("a"))
    backup(repo, LocalBlockSource(second), request("b"))
    first_file, second_file = sorted(_index_files(store), key=lambda k: (store.root / k).stat().st_mtime_ns)
    store.delete(first_file)
    path = store.root / second_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn, as by a store without atomic puts
    index = chunk_index.load(repo)
    assert index.ids == set() and list(index.unreadable) == [second_file]

    # Disk a's chunks are unknown to the index: its parent's are looked up one by one, found, indexed.
    rewrite_blocks(first, [2], seed=9)
    point = backup(repo, LocalBlockSource(first), request("a"))
    assert point.totals.uploaded_chunks == 1 and point.totals.repaired_chunks == 0
    assert verify(repo).ok

    found = repair(repo, lambda host, disk: iter(()))  # type: ignore[arg-type,return-value]
    assert found.index.rebuilt and found.index.unreadable == 1 and found.index.stale == 0
    assert _index_files(store) != [] and second_file not in _index_files(store)
    assert chunk_index.load(repo).ids == repo.chunk_ids()


def test_prune_leaves_one_index_naming_exactly_the_kept_chunks(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 8)
    first = backup(repo, LocalBlockSource(image), request())
    rewrite_blocks(image, [0, 1, 2])
    backup(repo, LocalBlockSource(image), request())
    store.delete(first.key)
    assert len(_index_files(store)) == 2

    report = prune(repo)
    assert report.chunks_deleted == 3
    assert len(_index_files(store)) == 1
    assert chunk_index.load(repo).ids == repo.chunk_ids() == point_ids(repo)
    prune(repo)  # nothing to delete: the same content, the same single file
    assert len(_index_files(store)) == 1


def _backup_process(store_class: str, setup: str = "") -> str:
    """The script of a backup process (store root and image as its arguments) on a store of
    store_class, a LocalBlobStore subclass named StallingStore that pauses where it prints."""
    return textwrap.dedent("""
        import os, sys, threading
        from pathlib import Path
        from connectors.stores import LocalBlobStore
        from tasks.backup.engine import BackupRequest, backup
        from tasks.backup.repo import index
        from tasks.backup.repo.repository import Repository
        from tasks.backup.sources.local import LocalBlockSource
    """) + textwrap.dedent(store_class) + textwrap.dedent(setup) + textwrap.dedent("""
        repo = Repository.open(StallingStore(Path(sys.argv[1])))
        backup(repo, LocalBlockSource(sys.argv[2]),
               BackupRequest(host="web-1", disk="data", block_size=65536, workers=2))
    """)


_KILLED_IN_INDEX_WRITE = _backup_process("""
    class StallingStore(LocalBlobStore):
        # An index file's temp file gets half its bytes, then the process waits to be killed.
        def _write_temp(self, key, directory, data):
            if not key.startswith("index/"):
                return super()._write_temp(key, directory, data)
            fd, tmp = self._make_temp(key, directory)
            os.write(fd, bytes(data)[: len(data) // 2])
            os.fsync(fd)
            print("writing index", flush=True)
            threading.Event().wait()
""")


def _kill_backup_at(script: str, store: LocalBlobStore, image: Path, marker: str) -> None:
    """Run a backup process (script) on store and image, SIGKILL it once it prints marker."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(store.root), str(image)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the backup logs to stdout too
            if line == marker + "\n":
                break
        else:
            raise AssertionError(f"the backup ended before {marker!r}: {proc.stderr and proc.stderr.read()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_backup_killed_while_writing_its_index_leaves_a_readable_repository(tmp_path: Path) -> None:
    """The pause inside the index write is the one instrumented step (a store subclass in the
    child); the kill is a real SIGKILL of the real backup process."""
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 8)
    backup(repo, LocalBlockSource(image), request())
    indexed = chunk_index.load(repo).ids
    rewrite_blocks(image, [1, 5])
    _kill_backup_at(_KILLED_IN_INDEX_WRITE, store, image, "writing index")
    assert any(p.name.startswith(".patchdrill-tmp-") for p in (store.root / "index").iterdir())  # the half file

    index = chunk_index.load(repo)
    assert index.ids == indexed and index.unreadable == {}  # the half file is not an index file
    assert len(repo.chunk_ids()) == len(indexed) + 2  # uploaded, not yet indexed
    point = backup(repo, LocalBlockSource(image), request())
    assert point.totals.uploaded_bytes == 0 and point.totals.changed_blocks == 2  # already there
    assert chunk_index.load(repo).ids == repo.chunk_ids() and verify(repo).ok


def _backups_each_adding_a_chunk(repo: Repository, image: Path, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        rewrite_blocks(image, [n % 8], seed=100 + n)
        backup(repo, LocalBlockSource(image), request())


def _three_index_files_at_a_fold_threshold_of_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                     ) -> tuple[LocalBlobStore, Repository, Path]:
    """A repository after three backups (three index files), with FOLD_AT set to 3: the next
    backup that stores a chunk folds."""
    monkeypatch.setattr(chunk_index, "FOLD_AT", 3)
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 8)
    backup(repo, LocalBlockSource(image), request())
    _backups_each_adding_a_chunk(repo, image, 2)
    return store, repo, image


def test_a_backup_past_the_threshold_folds_the_index_files_into_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store, repo, image = _three_index_files_at_a_fold_threshold_of_three(tmp_path, monkeypatch)
    assert len(_index_files(store)) == 3  # one per backup, none past the threshold yet
    _backups_each_adding_a_chunk(repo, image, 1, start=2)  # read 3, wrote its 4th: folded
    assert len(_index_files(store)) == 1
    assert chunk_index.load(repo).ids == repo.chunk_ids() == point_ids(repo)
    _backups_each_adding_a_chunk(repo, image, 1, start=3)
    assert len(_index_files(store)) == 2 and chunk_index.load(repo).ids == repo.chunk_ids()

    found = repair(repo, lambda host, disk: iter(()))  # type: ignore[arg-type,return-value]
    assert not found.index.rebuilt and found.index.folded == 2  # right, but in two files: folded
    assert len(_index_files(store)) == 1 and chunk_index.load(repo).ids == repo.chunk_ids()


_KILLED_IN_FOLD = _backup_process("""
    class StallingStore(LocalBlobStore):
        # The fold's new file is written; at its first delete the process waits to be killed.
        def delete(self, key):
            if key.startswith("index/"):
                print("folded file written", flush=True)
                threading.Event().wait()
            return super().delete(key)
""", setup="index.FOLD_AT = 3\n")


def test_a_backup_killed_between_writing_the_folded_index_and_deleting_the_old_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause at the first delete is the one instrumented step (a store subclass in the child);
    the kill is a real SIGKILL of the real backup process."""
    store, repo, image = _three_index_files_at_a_fold_threshold_of_three(tmp_path, monkeypatch)
    before = _index_files(store)
    rewrite_blocks(image, [6], seed=77)
    _kill_backup_at(_KILLED_IN_FOLD, store, image, "folded file written")
    after = _index_files(store)
    # The old files and the folded one (plus the killed run's own): every id is named at least once.
    assert set(before) < set(after) and len(after) == len(before) + 2
    assert chunk_index.load(repo).ids == repo.chunk_ids()

    point = backup(repo, LocalBlockSource(image), request())  # reads them all, then folds again
    assert point.totals.uploaded_bytes == 0 and point.totals.changed_blocks == 1
    assert len(_index_files(store)) == 1
    assert chunk_index.load(repo).ids == repo.chunk_ids() and verify(repo).ok


class FoldingWhileListedStore(LocalBlobStore):
    """A real local store on which, right after a reader lists index/, another backup folds the
    files it listed (the interleaving a backup reading beside a folding one can meet)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fold_next_listing = False

    def list(self, prefix: str = "", *, uncommitted: bool = False) -> Iterator[BlobInfo]:
        listed = list(super().list(prefix, uncommitted=uncommitted))
        if prefix == "index/" and self.fold_next_listing:
            self.fold_next_listing = False
            other = Repository.open(LocalBlobStore(self.root))
            chunk_index.replace(other, chunk_index.load(other).ids, [info.key for info in listed])
        return iter(listed)


def test_a_reader_listing_before_a_fold_loses_nothing(tmp_path: Path) -> None:
    store = FoldingWhileListedStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 8)
    backup(repo, LocalBlockSource(image), request())
    _backups_each_adding_a_chunk(repo, image, 3)
    listed = _index_files(store)
    store.fold_next_listing = True
    index = chunk_index.load(repo)
    assert not set(listed) & set(_index_files(store))  # every file it listed was gone when read
    assert index.ids == repo.chunk_ids() and index.unreadable == {}


def test_a_missing_index_is_a_warning_only_once_a_point_needs_it(tmp_path: Path) -> None:
    """A new repository's first backups write chunks before any index file (each writes its own
    when it ends): a disk backed up beside them sees chunks and no index, which is not a fault."""
    from structlog.testing import capture_logs

    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    backup(repo, LocalBlockSource(make_image(tmp_path / "disk.img", 4)), request())
    points = repo.point_keys()
    for key in [*points, *_index_files(store)]:
        store.delete(key)  # as while that first backup ran: its chunks stored, no point, no index yet
    with capture_logs() as fresh:
        assert chunk_index.load(repo).listed
    backup(repo, LocalBlockSource(make_image(tmp_path / "disk.img", 4)), request())
    for key in _index_files(store):
        store.delete(key)
    with capture_logs() as lost:
        assert chunk_index.load(repo).listed
    assert [(e["event"], e["log_level"]) for e in fresh] == [("index.missing", "info")]
    assert [(e["event"], e["log_level"]) for e in lost] == [("index.missing", "warning")]
