"""Backup, restore and verify on a real local store with small images (64 KiB blocks)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from connectors.stores import BlobStore, LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import ChunkCorrupt, KeyRequired, TargetExists, WrongKey
from tasks.backup.repo.repository import Repository, chunk_key
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tasks.backup.repo.verify import verify

BLOCK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def request(host: str = "web-1", disk: str = "data") -> BackupRequest:
    return BackupRequest(host=host, disk=disk, block_size=BLOCK, workers=3)


def make_image(path: Path, blocks: int, seed: int = 1) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * BLOCK))
    return path


def rewrite_blocks(path: Path, indexes: list[int], seed: int = 2) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as handle:
        for index in indexes:
            handle.seek(index * BLOCK)
            handle.write(rng.randbytes(BLOCK))


def chunk_count(store: BlobStore) -> int:
    return sum(1 for _ in store.list("chunks/"))


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "repo")


@pytest.fixture
def repo(store: LocalBlobStore) -> Repository:
    return Repository.open(store, create=True)


def test_incremental_uploads_exactly_the_changed_blocks(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 64)
    full = backup(repo, LocalBlockSource(image), request())
    assert (full.totals.changed_blocks, full.totals.uploaded_chunks, full.parent) == (64, 64, None)

    rewrite_blocks(image, [0, 17, 63])
    incremental = backup(repo, LocalBlockSource(image), request())
    assert incremental.totals.changed_blocks == 3
    assert incremental.totals.uploaded_chunks == 3
    assert incremental.totals.uploaded_bytes == 3 * BLOCK
    assert incremental.parent == full.key
    assert chunk_count(repo.store) == 67

    untouched = backup(repo, LocalBlockSource(image), request())
    assert untouched.totals.changed_blocks == 0 and untouched.totals.uploaded_chunks == 0


def test_restore_is_byte_identical_and_refuses_existing_target(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 40)
    with open(image, "ab") as handle:
        handle.write(b"tail that is not a whole block")
    point = backup(repo, LocalBlockSource(image), request())
    target = tmp_path / "restored.img"
    result = restore(repo, point, target)
    assert target.read_bytes() == image.read_bytes()
    assert result.blocks == 41
    with pytest.raises(TargetExists, match="restored.img"):
        restore(repo, point, target)


def test_restore_onto_older_copy_writes_only_differing_blocks(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 32)
    old = backup(repo, LocalBlockSource(image), request())
    target = tmp_path / "failback.img"
    restore(repo, old, target)
    rewrite_blocks(image, [3, 4, 30])
    new = backup(repo, LocalBlockSource(image), request())
    result = restore(repo, new, target, force=True)
    assert result.blocks_written == 3
    assert target.read_bytes() == image.read_bytes()


def test_identical_blocks_on_two_hosts_are_stored_once(repo: Repository, tmp_path: Path) -> None:
    first = make_image(tmp_path / "a.img", 16, seed=7)
    second = tmp_path / "b.img"
    second.write_bytes(first.read_bytes())
    rewrite_blocks(second, [5])
    backup(repo, LocalBlockSource(first), request(host="web-1", disk="os"))
    other = backup(repo, LocalBlockSource(second), request(host="web-2", disk="os"))
    assert other.totals.changed_blocks == 16  # no parent of its own: every block is new to this disk
    assert other.totals.uploaded_chunks == 1  # ...but only one is new to the repository
    assert chunk_count(repo.store) == 17


def test_directory_round_trip_keeps_metadata_and_reuses_unchanged_files(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc" / "app").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "etc" / "app" / "big.bin").write_bytes(random.Random(3).randbytes(3 * BLOCK + 100))
    (src / "etc" / "app" / "conf.ini").write_text("[main]\nport = 8080\n")
    (src / "etc" / "zero").write_bytes(b"")
    (src / "etc" / "link").symlink_to("app/conf.ini")
    (src / "dangling").symlink_to("/nowhere/at/all")
    os.chmod(src / "etc" / "app" / "conf.ini", 0o640)
    os.chmod(src / "empty", 0o711)
    os.utime(src / "etc" / "app" / "big.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(src / "etc", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    if os.geteuid() == 0:
        os.chown(src / "etc" / "app" / "conf.ini", 1234, 5678)
    first = backup(repo, LocalTreeSource(src), request(disk="etc"))
    assert first.kind == "directory" and first.map.files == 8

    (src / "etc" / "app" / "conf.ini").write_text("[main]\nport = 9090\n")
    os.utime(src / "etc", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    second = backup(repo, LocalTreeSource(src), request(disk="etc"))
    assert second.totals.scanned == len("[main]\nport = 9090\n")  # big.bin was not read again
    assert second.totals.uploaded_chunks == 1

    target = tmp_path / "out"
    restore(repo, second, target)
    for path in sorted(src.rglob("*")):
        twin = target / path.relative_to(src)
        a, b = os.lstat(path), os.lstat(twin)
        assert (a.st_mode, a.st_size) == (b.st_mode, b.st_size), path
        assert a.st_mtime_ns == b.st_mtime_ns, path
        if os.geteuid() == 0:
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), path
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(twin)
        elif path.is_file():
            assert path.read_bytes() == twin.read_bytes()


def test_restore_selected_files(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "keep.txt").write_text("keep")
    (src / "a" / "other.txt").write_text("other")
    (src / "top.log").write_text("log")
    point = backup(repo, LocalTreeSource(src), request(disk="files"))
    target = tmp_path / "picked"
    restore(repo, point, target, include=["a/b/keep.txt", "*.log"])
    restored = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    assert restored == ["a", "a/b", "a/b/keep.txt", "top.log"]
    assert (target / "a" / "b" / "keep.txt").read_text() == "keep"


class FailingStore(LocalBlobStore):
    """A real local store with one injected fault: chunk puts fail after `allowed` of them."""

    def __init__(self, root: Path, allowed: int) -> None:
        super().__init__(root)
        self.allowed = allowed
        self.chunk_puts = 0

    def put(self, key: str, data, *, overwrite: bool = True) -> None:  # type: ignore[no-untyped-def]
        if key.startswith("chunks/"):
            self.chunk_puts += 1
            if self.chunk_puts > self.allowed:
                raise OSError("injected: storage went away")
        super().put(key, data, overwrite=overwrite)


def test_failed_backup_leaves_no_point_and_rerun_uploads_only_what_is_missing(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 48)
    failing = FailingStore(tmp_path / "repo", allowed=20)
    with pytest.raises(OSError, match="injected"):
        backup(Repository.open(failing, create=True), LocalBlockSource(image), request())
    store = LocalBlobStore(tmp_path / "repo")
    assert list(store.list("points/")) == []
    assert list(store.list("locks/")) == []
    stored_before = chunk_count(store)
    assert 20 <= stored_before < 48

    point = backup(Repository.open(store), LocalBlockSource(image), request())
    assert point.totals.uploaded_chunks == 48 - stored_before
    assert chunk_count(store) == 48
    restore(Repository.open(store), point, tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == image.read_bytes()


_STALLING_BACKUP = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from connectors.stores import LocalBlobStore
    from tasks.backup.engine import BackupRequest, backup
    from tasks.backup.repo.repository import Repository
    from tasks.backup.sources.local import LocalBlockSource

    class StallingStore(LocalBlobStore):
        # After `allowed` chunks every put blocks forever, so the parent can kill us mid-upload.
        puts = 0
        def put(self, key, data, *, overwrite=True):
            if key.startswith("chunks/"):
                StallingStore.puts += 1
                if StallingStore.puts > int(sys.argv[3]):
                    threading.Event().wait()
            super().put(key, data, overwrite=overwrite)

    repo = Repository.open(StallingStore(Path(sys.argv[1])), create=True)
    backup(repo, LocalBlockSource(sys.argv[2]), BackupRequest(host="web-1", disk="data", block_size=65536, workers=2))
""")


def test_killed_backup_process_rerun_finishes(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 48)
    store = LocalBlobStore(tmp_path / "repo")
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_BACKUP, str(store.root), str(image), "12"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while chunk_count(store) < 12:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(store.list("points/")) == []
    assert chunk_count(store) == 12
    point = backup(Repository.open(store), LocalBlockSource(image), request())
    assert point.totals.uploaded_chunks == 36
    assert [p.key for p in Repository.open(store).points()] == [point.key]


def test_corrupt_chunk_is_found_by_verify_and_stops_restore(repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 16)
    point = backup(repo, LocalBlockSource(image), request())
    assert verify(repo).ok
    victim = repo.codec.chunk_id(image.read_bytes()[5 * BLOCK:6 * BLOCK])
    path = store.root / chunk_key(victim)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))

    report = verify(repo)
    assert not report.ok and list(report.corrupt) == [victim.hex()]
    assert report.corrupt[victim.hex()] == [point.key]
    sampled = verify(repo, sample_percent=50, seed=4)
    assert sampled.chunks_checked == 8

    target = tmp_path / "restored.img"
    with pytest.raises(ChunkCorrupt, match=f"{victim.hex()}.*{point.key}"):
        restore(repo, point, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "restore" in p.name] == []


def test_missing_chunk_is_reported(repo: Repository, store: LocalBlobStore, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 8)
    point = backup(repo, LocalBlockSource(image), request())
    gone = repo.codec.chunk_id(image.read_bytes()[:BLOCK])
    store.delete(chunk_key(gone))
    report = verify(repo)
    assert report.missing == {gone.hex(): [point.key]}


def test_encrypted_round_trip_and_wrong_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_TEST_REPO_KEY", "correct horse battery staple")
    monkeypatch.setenv("PD_TEST_WRONG_KEY", "not the passphrase")
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, key_reference="env:PD_TEST_REPO_KEY", create=True)
    image = tmp_path / "disk.img"
    image.write_bytes(b"secret payroll data " * 20000)
    point = backup(repo, LocalBlockSource(image), request())
    for info in store.list("chunks/"):
        assert b"payroll" not in store.get(info.key)
    assert b"correct horse" not in store.get("config.json")

    reopened = Repository.open(store, key_reference="env:PD_TEST_REPO_KEY")
    restore(reopened, point, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()

    with pytest.raises(WrongKey, match="env:PD_TEST_WRONG_KEY") as caught:
        Repository.open(store, key_reference="env:PD_TEST_WRONG_KEY")
    assert "not the passphrase" not in str(caught.value)
    with pytest.raises(KeyRequired, match="encrypted"):
        Repository.open(store)
