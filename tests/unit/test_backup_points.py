"""Recovery points: sealed and authenticated in an encrypted repository, stamped when their data
was taken, and what made them recorded. Real local store and files."""

from __future__ import annotations

import json
import random
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from connectors.stores import BlobStore, LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import PointTampered, WeakKey
from tasks.backup.repo.repository import Repository, tool_version, utcnow
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tasks.backup.repo.verify import verify

BLOCK = 64 * 1024
KEY = "env:PD_TEST_POINT_KEY"


@pytest.fixture
def encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setenv("PD_TEST_POINT_KEY", "a long enough passphrase")
    return Repository.open(LocalBlobStore(tmp_path / "repo"), key_reference=KEY, create=True)


def _tree(root: Path) -> Path:
    (root / "payroll-archive" / "quarterly-ledgers").mkdir(parents=True)
    (root / "payroll-archive" / "quarterly-ledgers" / "salaries-2026.csv").write_bytes(random.Random(1).randbytes(3000))
    return root


def test_no_path_is_readable_in_an_encrypted_store(encrypted: Repository, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "srv-confidential-share")
    request = BackupRequest(host="fs-1", disk="share", block_size=BLOCK, workers=2,
                            notes=(f"{tree}/payroll-archive was not frozen: fsfreeze is off",))
    point = backup(encrypted, LocalTreeSource(tree), request)
    names = [b"srv-confidential-share", b"payroll-archive", b"quarterly-ledgers", b"salaries-2026"]
    store = encrypted.store
    assert isinstance(store, LocalBlobStore)
    for path in store.root.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [n for n in names if n in blob], path
    # With the key, the point's sealed fields come back as they were.
    reread = encrypted.read_point(point.key)
    assert reread.source_path == str(tree) and reread.notes == list(request.notes)
    # Without it, the point still lists (host, disk, time, sizes), its paths stay sealed.
    listed = Repository.open(store, metadata_only=True).read_point(point.key)
    assert (listed.host, listed.disk, listed.totals) == (point.host, point.disk, point.totals)
    assert listed.source_path is None and listed.notes == []


def _edit(store: BlobStore, key: str, change: dict[str, object]) -> None:
    body = json.loads(store.get(key))
    store.put(key, json.dumps(body | change).encode())


@pytest.mark.parametrize("change", [
    {"totals": {"size": 1}},                 # a size
    {"consistency": "application-consistent"},  # a claim about the data
    {"parent": "points/h/d/20200101T000000.000000Z.json"},  # another lineage
    {"sealed": None},                        # stripped of its seal
])
def test_a_tampered_point_is_refused(encrypted: Repository, tmp_path: Path, change: dict[str, object]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(2).randbytes(4 * BLOCK))
    point = backup(encrypted, LocalBlockSource(image), BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1))
    if change == {"sealed": None}:
        body = json.loads(encrypted.store.get(point.key))
        del body["sealed"]
        encrypted.store.put(point.key, json.dumps(body).encode())
    else:
        _edit(encrypted.store, point.key, change)
    with pytest.raises(PointTampered, match=f"recovery point '{point.key}'.*refused"):
        encrypted.read_point(point.key)
    report = verify(encrypted)
    assert list(report.broken_points) == [point.key] and not report.ok


def test_a_point_moved_to_another_name_is_refused(encrypted: Repository, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(2 * BLOCK))
    point = backup(encrypted, LocalBlockSource(image), BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1))
    moved = point.key.replace("/h/d/", "/h/other/")
    encrypted.store.put(moved, encrypted.store.get(point.key))
    with pytest.raises(PointTampered, match="fails authentication"):
        encrypted.read_point(moved)


def test_version_1_repositories_stay_readable(encrypted: Repository, tmp_path: Path) -> None:
    """A repository written before points were sealed: config version 1, plaintext version 1 points."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(4).randbytes(3 * BLOCK))
    point = backup(encrypted, LocalBlockSource(image), BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1))
    store = encrypted.store
    config = json.loads(store.get("config.json"))
    store.put("config.json", json.dumps(config | {"version": 1}).encode())
    old = point.model_dump(mode="json", exclude={"completed", "tool", "policy"}) | {"version": 1}
    old["totals"].pop("repaired_chunks")
    store.put(point.key, json.dumps(old).encode())

    reopened = Repository.open(store, key_reference=KEY)
    read = reopened.read_point(point.key)
    assert (read.version, read.source_path, read.completed) == (1, str(image), None)
    restore(reopened, read, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("passphrase", ["", "short", "aaaaaaaaaaaaaaaaaaaa"])
def test_weak_passphrases_create_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passphrase: str) -> None:
    monkeypatch.setenv("PD_TEST_WEAK", passphrase)
    store = LocalBlobStore(tmp_path / "repo")
    with pytest.raises(WeakKey, match="env:PD_TEST_WEAK .*: a new encrypted repository needs at least 12 characters, at least 5 of them different") as caught:
        Repository.open(store, key_reference="env:PD_TEST_WEAK", create=True)
    assert not passphrase or passphrase not in str(caught.value)  # the rule, never the value
    assert list(store.list("")) == []


class _WatchedStore(LocalBlobStore):
    """Tells the test when a backup has written its lock (and so is waiting on the prune's)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.backup_tried = threading.Event()

    def put(self, key: str, data: object, *, overwrite: bool = True) -> None:  # type: ignore[override]
        if key.startswith("locks/") and isinstance(data, bytes) and b'"backup"' in data:
            self.backup_tried.set()
        super().put(key, data, overwrite=overwrite)  # type: ignore[arg-type]


@pytest.mark.parametrize("snapshot", [False, True])
def test_point_time_is_when_the_data_was_taken_not_before_the_lock_wait(tmp_path: Path, snapshot: bool) -> None:
    store = _WatchedStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(5).randbytes(2 * BLOCK))
    snapshot_time = utcnow() if snapshot else None
    request = BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1, lock_wait=timedelta(minutes=10),
                            snapshot_time=snapshot_time, policy="nightly")
    result: list[object] = []
    with repo.lock("prune"):
        runner = threading.Thread(target=lambda: result.append(backup(repo, LocalBlockSource(image), request)))
        runner.start()
        assert store.backup_tried.wait(60)
        released = utcnow()
    runner.join()
    [point] = result
    assert point.completed is not None and point.completed > released  # type: ignore[attr-defined]
    if snapshot:
        assert point.time == snapshot_time  # type: ignore[attr-defined]
    else:
        # A live source is read once the lock is held: its data is from after the wait.
        assert point.time > released  # type: ignore[attr-defined]
    assert (point.tool, point.policy) == (tool_version(), "nightly")  # type: ignore[attr-defined]
    assert repo.read_point(point.key) == point  # type: ignore[attr-defined]
