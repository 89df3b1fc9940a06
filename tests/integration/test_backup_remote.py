"""Backups of a disk on a real sshd host (the scan runs on the host) and into Azurite."""

from __future__ import annotations

import os
import random
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from configs.models import HostConfig
from connectors import connect, settings_for
from connectors.local import LocalConnector
from connectors.stores import AzureBlobStore, LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import SourceError, TargetExists
from tasks.backup.remote_restore import restore_to_host
from tasks.backup.sources.remote import RemoteBlockSource, RemoteTreeSource
from tasks.backup.repair import repair
from tasks.backup.repo.repository import Repository, chunk_key
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tasks.backup.repo.verify import verify

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def _image(path: Path, blocks: int) -> Path:
    path.write_bytes(random.Random(11).randbytes(blocks * BLOCK + 1000))
    return path


def _rewrite(path: Path, indexes: list[int]) -> None:
    rng = random.Random(12)
    with open(path, "r+b") as handle:
        for index in indexes:
            handle.seek(index * BLOCK)
            handle.write(rng.randbytes(BLOCK))


def test_ssh_host_scans_itself_and_sends_only_changed_blocks(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    image = _image(tmp_path / "vm.img", 48)
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    request = BackupRequest(host=ssh_host_config.name, disk="vm", block_size=BLOCK, workers=2)
    with connect(ssh_host_config) as connector:
        full = backup(repo, RemoteBlockSource(connector, str(image)), request)
        assert full.totals.changed_blocks == 49 and full.totals.scanned == image.stat().st_size

        _rewrite(image, [1, 2, 40])
        incremental = backup(repo, RemoteBlockSource(connector, str(image)), request)
    # Only the three changed blocks reached the controller: it hashed nothing else.
    assert incremental.totals.scanned == 3 * BLOCK
    assert incremental.totals.uploaded_chunks == 3
    restore(repo, incremental, tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == image.read_bytes()


def test_scanner_through_any_connector_and_same_ids_as_a_local_read(tmp_path: Path) -> None:
    """LocalConnector runs blockscan.py in a real python3 subprocess; it has no SFTP, so changed
    blocks come back through the scanner's read mode."""
    image = _image(tmp_path / "disk.img", 10)
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    local = LocalConnector(settings_for(HostConfig(name="lab", transport="local")))
    backup(repo, LocalBlockSource(image), BackupRequest(host="lab", disk="a", block_size=BLOCK, workers=2))
    remote = backup(repo, RemoteBlockSource(local, str(image)), BackupRequest(host="lab", disk="b", block_size=BLOCK, workers=2))
    assert remote.totals.uploaded_chunks == 0  # the same content read two ways is the same chunks
    with pytest.raises(SourceError, match="lab: block scan of '/no/such/disk' failed: .*No such file"):
        backup(repo, RemoteBlockSource(local, "/no/such/disk"), BackupRequest(host="lab", disk="c", block_size=BLOCK))


def test_engine_round_trip_on_azurite(azure_store: AzureBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_AZ_REPO_KEY", "azure repository passphrase")
    image = _image(tmp_path / "disk.img", 16)
    repo = Repository.open(azure_store, key_reference="env:PD_AZ_REPO_KEY", create=True)
    request = BackupRequest(host="win-1", disk="c", block_size=BLOCK, workers=2)
    backup(repo, LocalBlockSource(image), request)
    _rewrite(image, [3])
    point = backup(repo, LocalBlockSource(image), request)
    assert point.totals.uploaded_chunks == 1
    assert verify(repo).ok
    restore(repo, point, tmp_path / "back.img")
    assert (tmp_path / "back.img").read_bytes() == image.read_bytes()


def test_directory_on_an_ssh_host_round_trip(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    src = tmp_path / "srv"
    (src / "www").mkdir(parents=True)
    (src / "www" / "index.html").write_text("<h1>hello</h1>\n")
    (src / "www" / "big.bin").write_bytes(random.Random(4).randbytes(2 * BLOCK + 10))
    (src / "current").symlink_to("www")
    os.chmod(src / "www" / "index.html", 0o604)
    os.mkfifo(src / "pipe")
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    request = BackupRequest(host=ssh_host_config.name, disk="srv", block_size=BLOCK, workers=2)
    with connect(ssh_host_config) as connector:
        first = backup(repo, RemoteTreeSource(connector, str(src)), request)
        assert first.totals.skipped == 0  # the FIFO is kept, as a FIFO
        (src / "www" / "index.html").write_text("<h1>changed</h1>\n")
        second = backup(repo, RemoteTreeSource(connector, str(src)), request)
    assert second.totals.scanned == len("<h1>changed</h1>\n")  # big.bin did not cross the wire again
    out = tmp_path / "out"
    restore(repo, second, out)
    assert (out / "www" / "index.html").read_text() == "<h1>changed</h1>\n"
    assert (out / "www" / "big.bin").read_bytes() == (src / "www" / "big.bin").read_bytes()
    assert os.readlink(out / "current") == "www"
    assert (out / "www" / "index.html").stat().st_mode & 0o777 == 0o604
    assert stat.S_ISFIFO(os.lstat(out / "pipe").st_mode)


def test_restore_onto_an_ssh_host_sends_only_differing_blocks(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    image = _image(tmp_path / "vm.img", 24)
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="src", disk="vm", block_size=BLOCK, workers=2))
    target = tmp_path / "dr" / "vm.img"
    target.parent.mkdir()
    with connect(ssh_host_config) as connector:
        fresh = restore_to_host(repo, point, connector, str(target))
        assert target.read_bytes() == image.read_bytes() and fresh.blocks_written == 25
        with pytest.raises(TargetExists, match="vm.img"):
            restore_to_host(repo, point, connector, str(target))
        _rewrite(target, [4, 9])  # the DR copy drifted
        again = restore_to_host(repo, point, connector, str(target), force=True)
    assert again.blocks_written == 2
    assert target.read_bytes() == image.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["vm.img"]  # no patch or temp file left


def test_directory_restore_onto_an_ssh_host(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    src = tmp_path / "etc"
    (src / "app").mkdir(parents=True)
    (src / "app" / "app.conf").write_text("port = 1\n")
    (src / "app" / "current").symlink_to("app.conf")
    os.chmod(src / "app" / "app.conf", 0o640)
    os.utime(src / "app" / "app.conf", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.chown(src / "app" / "app.conf", 4321, 8765)
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    point = backup(repo, LocalTreeSource(src), BackupRequest(host="src", disk="etc", block_size=BLOCK, workers=2))
    target = tmp_path / "restored-etc"
    with connect(ssh_host_config) as connector:
        restore_to_host(repo, point, connector, str(target))
    restored = target / "app" / "app.conf"
    assert restored.read_text() == "port = 1\n"
    st = restored.stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns, st.st_uid, st.st_gid) == (0o640, 1_600_000_000_000_000_000, 4321, 8765)
    assert os.readlink(target / "app" / "current") == "app.conf"
    assert sorted(p.name for p in tmp_path.iterdir() if "patchdrill" in p.name) == []


class CountingConnector(LocalConnector):
    """The real local connector (python3 subprocesses), counting the scripts it runs."""

    def __init__(self, host: HostConfig) -> None:
        super().__init__(settings_for(host))
        self.calls: list[str] = []

    def run_script(self, script, args=None, *, timeout=None, check=False):  # type: ignore[no-untyped-def]
        self.calls.append((args or [""])[0])
        return super().run_script(script, args, timeout=timeout, check=check)


def test_many_small_files_cross_in_few_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "large.bin").write_bytes(random.Random(9).randbytes(3 * BLOCK))
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    connector = CountingConnector(HostConfig(name="lab", transport="local"))
    request = BackupRequest(host="lab", disk="many", block_size=BLOCK, workers=2)
    source = RemoteTreeSource(connector, str(src), batch_bytes=2 * BLOCK)
    first = backup(repo, source, request)
    assert connector.calls == ["tree", "files", "read"]  # the listing, 40 small files at once, the large one
    (src / "f07.txt").write_text("changed\n")
    connector.calls.clear()
    second = backup(repo, RemoteTreeSource(connector, str(src), batch_bytes=2 * BLOCK), request)
    assert connector.calls == ["tree", "files"] and second.totals.scanned == len("changed\n")
    restore(repo, second, tmp_path / "out")
    for path in src.iterdir():
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()
    assert first.map.files == 41


def test_ssh_host_sends_a_damaged_block_again_and_repair_reads_it(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    """The host compares block fingerprints itself, so an unchanged block never crosses the wire,
    unless its chunk is damaged: then the next backup and repair must ask for it again."""
    image = _image(tmp_path / "vm.img", 8)
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    request = BackupRequest(host=ssh_host_config.name, disk="vm", block_size=BLOCK, workers=2)
    data = image.read_bytes()
    first_bad, second_bad = (repo.codec.chunk_id(data[i * BLOCK:(i + 1) * BLOCK]) for i in (3, 5))
    with connect(ssh_host_config) as connector:
        backup(repo, RemoteBlockSource(connector, str(image)), request)
        for victim in (first_bad, second_bad):
            path = store.root / chunk_key(victim)
            path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        assert len(verify(repo).corrupt) == 2

        @contextmanager
        def live(host: str, disk: str) -> Iterator[RemoteBlockSource]:
            yield RemoteBlockSource(connector, str(image))

        repaired = repair(repo, live)
        assert repaired.repaired == sorted([first_bad.hex(), second_bad.hex()]) and repaired.ok
        assert verify(repo).ok

        path = store.root / chunk_key(first_bad)
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        verify(repo)
        again = backup(repo, RemoteBlockSource(connector, str(image)), request)
    assert again.totals.scanned == BLOCK and again.totals.repaired_chunks == 1  # that one block only
    assert verify(repo).ok


def test_ssh_directory_file_with_a_damaged_chunk_crosses_the_wire_again(ssh_host_config: HostConfig,
                                                                         tmp_path: Path) -> None:
    src = tmp_path / "srv"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(8).randbytes(3 * BLOCK))
    (src / "small.txt").write_text("unchanged\n")
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    request = BackupRequest(host=ssh_host_config.name, disk="srv", block_size=BLOCK, workers=2)
    victim = repo.codec.chunk_id((src / "big.bin").read_bytes()[BLOCK:2 * BLOCK])
    with connect(ssh_host_config) as connector:
        backup(repo, RemoteTreeSource(connector, str(src)), request)
        path = store.root / chunk_key(victim)
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        assert list(verify(repo).corrupt) == [victim.hex()]
        again = backup(repo, RemoteTreeSource(connector, str(src)), request)
    # Size and mtime are unchanged: only the file holding the damaged chunk was sent again.
    assert again.totals.scanned == 3 * BLOCK and again.totals.repaired_chunks == 1
    assert verify(repo).ok
