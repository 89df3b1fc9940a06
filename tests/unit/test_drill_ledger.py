"""The drill ledger in a real local store: append-only order, races, hostile and secret entries."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from configs.secrets import remember
from connectors.stores.base import BlobStore
from connectors.stores.local import LocalBlobStore
from tasks.drill.ledger import (
    ClosedEntry,
    CopyRootEntry,
    InvalidEntry,
    Ledger,
    LedgerError,
    NamespaceEntry,
    ProcessEntry,
    path_problem,
    resources,
)

ROOT = "/srv/drill/web"


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


def test_entries_come_back_in_the_order_recorded_one_blob_each(store: LocalBlobStore) -> None:
    ledger = Ledger(store, "run-1")
    ledger.record("copy-root", host="dr-1", member="web", copy_root=ROOT)
    ledger.record("namespace", host="dr-1", member="web", name="pd-web-0011223344")
    ledger.record("path", host="dr-1", member="web", copy_root=ROOT, path=f"{ROOT}/data.img")
    keys = sorted(info.key for info in store.list("drills/run-1/ledger/"))
    assert keys == ["drills/run-1/ledger/000000-copy-root.json", "drills/run-1/ledger/000001-namespace.json",
                    "drills/run-1/ledger/000002-path.json"]
    # A second writer (a controller that came back) continues the sequence.
    Ledger(store, "run-1").record("namespace", host="dr-1", member="db", name="pd-db-0011223344")
    kinds = [entry.kind for entry in Ledger(store, "run-1").read()]
    assert kinds == ["copy-root", "namespace", "path", "namespace"]
    assert not Ledger(store, "run-1").is_closed()


def race_writers(store: BlobStore, run_id: str, writers: int, each: int) -> None:
    """`writers` Ledger objects on one run, started together, each recording `each` entries;
    afterwards every entry must be there once, numbered 0…n-1."""
    ledgers = [Ledger(store, run_id) for _ in range(writers)]
    barrier = threading.Barrier(writers)

    def write(index: int) -> None:
        barrier.wait()
        for n in range(each):
            ledgers[index].record("namespace", host="dr-1", member=f"m{index}-{n}", name=f"pd-m{index}-{n}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = Ledger(store, run_id).read()
    assert sorted(e.member for e in entries if isinstance(e, NamespaceEntry)) == sorted(
        f"m{i}-{n}" for i in range(writers) for n in range(each))
    assert [e.seq for e in entries] == list(range(writers * each))


def test_racing_writers_never_overwrite_each_other(store: LocalBlobStore) -> None:
    race_writers(store, "race", writers=8, each=5)


class FirstPutWaits(LocalBlobStore):
    """The real local store, except that its first put waits (at most a second) until a second put
    has begun: two threads of one run recording at the same moment, made certain rather than
    left to the scheduler. The wait only orders the threads; nothing is timed."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.second_began = threading.Event()
        self._puts = 0
        self._count = threading.Lock()

    def put(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> None:
        with self._count:
            self._puts += 1
            first = self._puts == 1
        if first:
            self.second_began.wait(1.0)
        else:
            self.second_began.set()
        super().put(key, data, overwrite=overwrite)


def test_threads_sharing_one_ledger_record_different_kinds_under_different_numbers(tmp_path: Path) -> None:
    """A drill records the copy's path and makes its namespace on two threads with one Ledger:
    entries of different kinds have different keys, so only the ledger itself can keep them from
    sharing a number (and one of them vanishing when the ledger is read by number)."""
    store = FirstPutWaits(tmp_path / "store")
    ledger = Ledger(store, "run-threads")
    path = threading.Thread(target=ledger.record, args=("path",),
                            kwargs={"host": "dr-1", "member": "web", "copy_root": ROOT, "path": f"{ROOT}/www"})
    path.start()
    ledger.record("namespace", host="dr-1", member="web", name="pd-web-0011223344")
    path.join()
    entries = Ledger(store, "run-threads").read()
    assert sorted(e.kind for e in entries) == ["namespace", "path"]
    assert sorted(e.seq for e in entries) == [0, 1]
    assert sorted(r.kind for r in resources(entries)) == ["namespace", "path"]


def test_a_process_refinement_merges_into_its_entry_and_keeps_its_place(store: LocalBlobStore) -> None:
    ledger = Ledger(store, "run-2")
    ledger.record("copy-root", host="dr-1", copy_root=ROOT)
    first = ledger.record("process", host="dr-1", copy_root=ROOT, pidfile=f"{ROOT}/.patchdrill/web.pid", port=8080)
    ledger.record("namespace", host="dr-1", name="pd-x")
    ledger.record("process", host="dr-1", copy_root=ROOT, pidfile=f"{ROOT}/.patchdrill/web.pid", port=8080,
                  refines=first.seq, pid=4242, start_time=99, boot_id="ec70b51d-bd39-4e38-bd07-f08a042b158b")
    # A "refinement" of someone else's entry is not merged: it stands as its own entry.
    ledger.record("process", host="dr-1", copy_root=ROOT, pidfile=f"{ROOT}/.patchdrill/other.pid",
                  refines=first.seq, pid=1234, start_time=5, boot_id="ec70b51d-bd39-4e38-bd07-f08a042b158b")
    merged = list(resources(ledger.read()))
    assert [entry.seq for entry in merged] == [0, 1, 2, 4]
    process = merged[1]
    assert isinstance(process, ProcessEntry) and (process.pid, process.start_time, process.port) == (4242, 99, 8080)
    assert isinstance(merged[3], ProcessEntry) and merged[3].pid == 1234


@pytest.mark.parametrize(("kind", "fields", "message"), [
    ("namespace", {"name": "x; rm -rf /"}, "not a namespace name"),
    ("namespace", {"name": "../../etc"}, "not a namespace name"),
    ("copy-root", {"copy_root": "/"}, "too close to the file system root"),
    ("copy-root", {"copy_root": "/etc"}, "too close"),
    ("copy-root", {"copy_root": "/usr/local"}, "system directory"),
    ("copy-root", {"copy_root": "srv/relative"}, "not an absolute path"),
    ("copy-root", {"copy_root": "/srv/drill/../../etc"}, "'..'"),
    ("path", {"copy_root": ROOT, "path": "/etc/passwd"}, "not under its copy root"),
    ("path", {"copy_root": ROOT, "path": f"{ROOT}/../../../etc"}, "'..'"),
    ("process", {"copy_root": ROOT, "pidfile": "/etc/pid"}, "not a file under its copy root"),
    ("unit", {"unit": "sshd.service; reboot"}, "not a systemd service unit"),
    ("service", {"service": "svc\nRemove-Item C:\\ -Recurse"}, "holds control characters"),
    ("copy-root", {"copy_root": "C:\\Windows", "os_family": "windows"}, "too close"),
    ("copy-root", {"copy_root": "C:\\Windows\\System32", "os_family": "windows"}, "system directory"),
    ("bogus", {}, "does not match any of the expected tags"),
])
def test_hostile_entries_are_refused_before_anything_is_written(store: LocalBlobStore, kind: str,
                                                                fields: dict[str, str], message: str) -> None:
    ledger = Ledger(store, "run-3")
    with pytest.raises(ValueError, match="refused") as caught:
        ledger.record(kind, host="dr-1", **fields)
    assert message in str(caught.value)
    assert list(store.list("drills/")) == []


def test_a_command_holding_a_secret_is_never_recorded(store: LocalBlobStore) -> None:
    remember("hunter2-secret-value")
    with pytest.raises(ValueError, match="holds a secret value") as caught:
        Ledger(store, "run-4").record("command", host="dr-1", stop="app stop --password hunter2-secret-value")
    assert "hunter2" not in str(caught.value)
    assert list(store.list("drills/")) == []


def test_edited_blobs_are_read_back_as_invalid_entries_not_acted_on(store: LocalBlobStore) -> None:
    ledger = Ledger(store, "run-5")
    ledger.record("copy-root", host="dr-1", copy_root=ROOT)
    store.put("drills/run-5/ledger/000001-path.json", json.dumps({
        "kind": "path", "seq": 1, "host": "dr-1", "recorded_at": "2026-12-01T00:00:00Z", "copy_root": "/",
        "path": "/"}).encode())
    store.put("drills/run-5/ledger/000002-namespace.json", b"{not json")
    store.put("drills/run-5/ledger/000007-namespace.json", json.dumps({
        "kind": "namespace", "seq": 3, "host": "dr-1", "recorded_at": "2026-12-01T00:00:00Z", "name": "pd-a"}).encode())
    store.put("drills/run-5/ledger/notes.txt", b"hello")
    entries = ledger.read()
    assert isinstance(entries[1], CopyRootEntry)
    invalid = {entry.key: entry.problem for entry in entries if isinstance(entry, InvalidEntry)}
    assert "too close to the file system root" in invalid["drills/run-5/ledger/000001-path.json"]
    assert "not JSON" in invalid["drills/run-5/ledger/000002-namespace.json"]
    assert "names seq 3, its key says 7" in invalid["drills/run-5/ledger/000007-namespace.json"]
    assert invalid["drills/run-5/ledger/notes.txt"] == "not a ledger entry name"
    assert [entry.kind for entry in resources(entries)] == ["copy-root"]


def test_close_is_the_last_entry(store: LocalBlobStore) -> None:
    ledger = Ledger(store, "run-6")
    ledger.record("namespace", host="dr-1", name="pd-a")
    closed = ledger.close(1)
    assert isinstance(closed, ClosedEntry) and closed.seq == 1
    assert ledger.is_closed()
    ledger.record("namespace", host="dr-1", name="pd-b")
    assert not ledger.is_closed()


@pytest.mark.parametrize("run_id", ["", "../x", "a/b", "x" * 81, "-lead"])
def test_bad_run_ids_are_refused(store: LocalBlobStore, run_id: str) -> None:
    with pytest.raises(LedgerError, match="invalid drill run id"):
        Ledger(store, run_id)


def test_path_rules() -> None:
    assert path_problem("/srv/drill/web", "linux") is None
    assert path_problem("/var/lib/drill", "linux") is None
    assert path_problem("/srv//drill", "linux") == "is not in normal form"
    assert path_problem("D:\\drills\\web", "windows") is None
