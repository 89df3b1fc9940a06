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


_KILLED_IN_INDEX_WRITE = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from connectors.stores import LocalBlobStore
    from tasks.backup.engine import BackupRequest, backup
    from tasks.backup.repo.repository import Repository
    from tasks.backup.sources.local import LocalBlockSource

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

    repo = Repository.open(StallingStore(Path(sys.argv[1])))
    backup(repo, LocalBlockSource(sys.argv[2]), BackupRequest(host="web-1", disk="data", block_size=65536, workers=2))
""")


def test_a_backup_killed_while_writing_its_index_leaves_a_readable_repository(tmp_path: Path) -> None:
    """The pause inside the index write is the one instrumented step (a store subclass in the
    child); the kill is a real SIGKILL of the real backup process."""
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = make_image(tmp_path / "disk.img", 8)
    backup(repo, LocalBlockSource(image), request())
    indexed = chunk_index.load(repo).ids
    rewrite_blocks(image, [1, 5])
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_INDEX_WRITE, str(store.root), str(image)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the backup logs to stdout too
            if line == "writing index\n":
                break
        else:
            raise AssertionError(f"the backup ended before writing its index: {proc.stderr and proc.stderr.read()}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".patchdrill-tmp-") for p in (store.root / "index").iterdir())  # the half file

    index = chunk_index.load(repo)
    assert index.ids == indexed and index.unreadable == {}  # the half file is not an index file
    assert len(repo.chunk_ids()) == len(indexed) + 2  # uploaded, not yet indexed
    point = backup(repo, LocalBlockSource(image), request())
    assert point.totals.uploaded_bytes == 0 and point.totals.changed_blocks == 2  # already there
    assert chunk_index.load(repo).ids == repo.chunk_ids() and verify(repo).ok
