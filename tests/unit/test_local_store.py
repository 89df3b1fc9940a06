"""LocalBlobStore behaviour specific to a directory: atomic puts, race-safe no-overwrite, key rules.

The contract shared with the Azure store (round trips, listing, deletes) is tested over both
stores in tests/integration/test_blob_stores.py.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Callable

import pytest

from connectors.stores import (
    BlobExists,
    BlobNotFound,
    InvalidKey,
    LocalBlobStore,
    StoreError,
    UploadUrlUnsupported,
)


class FailingReader(io.RawIOBase):
    """A source that hands out `good` bytes, runs `during` once, then fails like a dropped link."""

    def __init__(self, good: int, during: Callable[[], None] | None = None) -> None:
        self.remaining = good
        self.during = during

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.remaining <= 0:
            if self.during is not None:
                self.during()
                self.during = None
            raise ConnectionResetError("source went away")
        n = min(len(buffer), self.remaining)
        buffer[:n] = b"x" * n
        self.remaining -= n
        return n


def files_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "repo")


def test_failed_put_leaves_no_blob_and_no_temp_file(store: LocalBlobStore) -> None:
    with pytest.raises(ConnectionResetError):
        store.put("chunks/ab/abc", io.BufferedReader(FailingReader(3 * 1024 * 1024)))
    assert not store.exists("chunks/ab/abc")
    assert list(store.list()) == []
    assert files_on_disk(store.root) == []


def test_failed_overwrite_keeps_the_old_content(store: LocalBlobStore) -> None:
    store.put("config.json", b'{"version": 1}')
    with pytest.raises(ConnectionResetError):
        store.put("config.json", io.BufferedReader(FailingReader(10_000)))
    assert store.get("config.json") == b'{"version": 1}'
    assert files_on_disk(store.root) == ["config.json"]


def test_list_never_shows_an_in_flight_temp_file(store: LocalBlobStore) -> None:
    store.put("points/web1/os/1.json", b"{}")
    seen: dict[str, list[str]] = {}

    def look() -> None:
        seen["disk"] = files_on_disk(store.root)
        seen["listed"] = sorted(info.key for info in store.list())

    with pytest.raises(ConnectionResetError):
        store.put("points/web1/os/2.json", io.BufferedReader(FailingReader(100, during=look)))
    assert len(seen["disk"]) == 2, "the temp file should have been on disk while the put ran"
    assert seen["listed"] == ["points/web1/os/1.json"]


def test_racing_no_overwrite_puts_have_exactly_one_winner(store: LocalBlobStore) -> None:
    for round_no in range(30):
        key = f"race/{round_no}"
        barrier = threading.Barrier(2)
        outcomes: dict[str, str] = {}

        def writer(label: str) -> None:
            payload = label.encode() * 200_000
            barrier.wait()
            try:
                store.put(key, payload, overwrite=False)
                outcomes[label] = "won"
            except BlobExists:
                outcomes[label] = "lost"

        threads = [threading.Thread(target=writer, args=(label,)) for label in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [label for label, outcome in outcomes.items() if outcome == "won"]
        assert len(winners) == 1, outcomes
        assert store.get(key) == winners[0].encode() * 200_000
    assert not [name for name in files_on_disk(store.root) if "tmp" in name]


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a/.patchdrill-tmp-x"],
)
def test_invalid_keys_are_rejected_naming_the_key(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(InvalidKey) as caught:
        store.put(key, b"data")
    assert repr(key) in str(caught.value)
    assert store.name in str(caught.value)
    assert files_on_disk(store.root) == []


def test_a_traversing_prefix_is_rejected(store: LocalBlobStore) -> None:
    with pytest.raises(InvalidKey, match=r"'\.\./x'"):
        list(store.list("../x"))


def test_delete_prunes_empty_directories_but_not_the_root(store: LocalBlobStore) -> None:
    store.put("points/web1/os/1.json", b"{}")
    store.put("points/web2/os/1.json", b"{}")
    store.delete("points/web1/os/1.json")
    assert not (store.root / "points" / "web1").exists()
    assert (store.root / "points" / "web2" / "os").is_dir()
    store.delete("points/web2/os/1.json")
    assert store.root.is_dir() and list(store.root.iterdir()) == []


def test_a_prefix_is_not_a_blob(store: LocalBlobStore) -> None:
    store.put("points/web1/1.json", b"{}")
    assert not store.exists("points/web1")
    with pytest.raises(BlobNotFound, match="points/web1"):
        store.get("points/web1")
    with pytest.raises(BlobNotFound, match="points/web1"):
        store.delete("points/web1")


def test_a_blob_cannot_become_a_directory(store: LocalBlobStore) -> None:
    store.put("a", b"blob")
    with pytest.raises(StoreError, match="'a/b'"):
        store.put("a/b", b"nested")
    assert store.get("a") == b"blob"


def test_blobs_are_private_to_the_owner(store: LocalBlobStore) -> None:
    store.put("config.json", b"{}")
    assert os.stat(store.root / "config.json").st_mode & 0o077 == 0


def test_upload_url_is_refused_with_a_reason(store: LocalBlobStore) -> None:
    assert store.supports_upload_url is False
    with pytest.raises(UploadUrlUnsupported, match="connector"):
        store.upload_url("chunks/ab/abc")


def test_an_unusable_root_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError, match=str(blocker)):
        LocalBlobStore(blocker / "repo")
