"""Sparse images on hosts: the host's scan skips holes and names zero blocks by their hash, so
neither crosses the wire nor reaches the store; restores onto a host leave holes as holes and
make an existing image equal the point. A real sshd host (SFTP reads) and the local connector
(blockscan's read mode in a python3 subprocess); a sparse image on a loop-mounted XFS, and a
loop block device as source and as target (where holes cannot be punched: zeros are written)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors import connect, settings_for
from connectors.local import LocalConnector
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.remote_restore import restore_to_host
from tasks.backup.repo.blockmap import HOLE, BlockMap
from tasks.backup.repo.repository import Repository
from tasks.backup.repo.verify import verify
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource
from tasks.backup.sources.remote import RemoteBlockSource
from tests.hosts.loopfs import xfs  # noqa: F401 - fixture
from tests.trees import allocated
from tests.unit.test_backup_sparse import (
    BLOCK, DATA_BLOCKS, IMAGE_BLOCKS, _old_format_point, sparse_image, stored_bytes,
)

pytestmark = pytest.mark.integration


def _request(host: str) -> BackupRequest:
    return BackupRequest(host=host, disk="vm", block_size=BLOCK, workers=2)


def test_ssh_host_sends_neither_holes_nor_zero_blocks(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "vm.img", tail=777)
    store = LocalBlobStore(tmp_path / "repo")
    repo = Repository.open(store, create=True)
    with connect(ssh_host_config) as connector:
        full = backup(repo, RemoteBlockSource(connector, str(image)), _request(ssh_host_config.name))
        # Only the data blocks crossed the wire (the controller hashes what arrives).
        assert full.totals.scanned == len(DATA_BLOCKS) * BLOCK
        assert full.totals.uploaded_chunks == len(DATA_BLOCKS) and full.totals.used == len(DATA_BLOCKS) * BLOCK
        assert stored_bytes(store) <= len(DATA_BLOCKS) * BLOCK + 4096
        chunks = BlockMap.from_json(repo.get_map(full.map.id), point=full.key).chunks
        assert [i for i, c in enumerate(chunks) if c != HOLE] == list(DATA_BLOCKS)

        with open(image, "r+b") as handle:  # one hole gets data, one data block becomes zeros
            handle.seek(20 * BLOCK)
            handle.write(random.Random(20).randbytes(BLOCK))
            handle.seek(DATA_BLOCKS[1] * BLOCK)
            handle.write(bytes(BLOCK))
        incremental = backup(repo, RemoteBlockSource(connector, str(image)), _request(ssh_host_config.name))
    assert incremental.totals.scanned == BLOCK and incremental.totals.changed_blocks == 2
    assert incremental.totals.used == len(DATA_BLOCKS) * BLOCK
    fresh = tmp_path / "fresh.img"
    restore(repo, incremental, fresh)
    assert fresh.read_bytes() == image.read_bytes() and allocated(fresh) <= allocated(image)
    assert verify(repo).ok


def test_any_connector_reads_only_data_blocks_and_matches_a_local_read(tmp_path: Path) -> None:
    """LocalConnector has no SFTP: changed blocks come back through blockscan's read mode."""
    image = sparse_image(tmp_path / "vm.img")
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    local = backup(repo, LocalBlockSource(image), BackupRequest(host="lab", disk="a", block_size=BLOCK, workers=2))
    connector = LocalConnector(settings_for(HostConfig(name="lab", transport="local")))
    remote = backup(repo, RemoteBlockSource(connector, str(image)),
                    BackupRequest(host="lab", disk="b", block_size=BLOCK, workers=2))
    assert remote.totals.scanned == len(DATA_BLOCKS) * BLOCK and remote.totals.uploaded_chunks == 0
    local_map = BlockMap.from_json(repo.get_map(local.map.id), point=local.key)
    remote_map = BlockMap.from_json(repo.get_map(remote.map.id), point=remote.key)
    assert local_map.chunks == remote_map.chunks  # the same holes and chunks, read two ways


def test_restores_onto_an_ssh_host_keep_holes_and_equal_the_point(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "vm.img", tail=1000)
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    point = backup(repo, LocalBlockSource(image), _request("src"))
    old = _old_format_point(repo, image, "old")
    dr = tmp_path / "dr"
    dr.mkdir()
    with connect(ssh_host_config) as connector:
        fresh = restore_to_host(repo, point, connector, str(dr / "fresh.img"))
        assert (dr / "fresh.img").read_bytes() == image.read_bytes()
        assert allocated(dr / "fresh.img") <= allocated(image) and fresh.bytes_written == len(DATA_BLOCKS) * BLOCK

        for name, extra in (("same.img", 0), ("longer.img", 5 * BLOCK + 3)):
            live = dr / name  # a live, fully allocated image: every block differs from the point
            live.write_bytes(random.Random(len(name)).randbytes(IMAGE_BLOCKS * BLOCK + 1000 + extra))
            done = restore_to_host(repo, point, connector, str(live), force=True)
            assert live.read_bytes() == image.read_bytes(), name
            assert allocated(live) <= allocated(image) + BLOCK, name  # the point's holes punched, not written
            assert done.bytes_written == len(DATA_BLOCKS) * BLOCK  # holes cost no data on the wire
            again = restore_to_host(repo, point, connector, str(live), force=True)
            assert again.blocks_written == 0

        restore_to_host(repo, old, connector, str(dr / "old.img"))
        assert (dr / "old.img").read_bytes() == image.read_bytes() and allocated(dr / "old.img") <= allocated(image)
        live = dr / "same.img"
        live.write_bytes(random.Random(3).randbytes(IMAGE_BLOCKS * BLOCK + 1000))
        restore_to_host(repo, old, connector, str(live), force=True)
        assert live.read_bytes() == image.read_bytes()
    assert sorted(p.name for p in dr.iterdir()) == ["fresh.img", "longer.img", "old.img", "same.img"]


@contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A real loop block device over backing (needs root), detached at the end."""
    attached = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if attached.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attached.stderr.strip()}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)


def test_a_sparse_image_on_xfs_and_a_block_device_as_source_and_target(tmp_path: Path, xfs: Path) -> None:
    image = sparse_image(xfs / "vm.img")
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    point = backup(repo, LocalBlockSource(image), _request("xfs"))
    assert point.totals.scanned == len(DATA_BLOCKS) * BLOCK and point.totals.used == len(DATA_BLOCKS) * BLOCK
    restore(repo, point, xfs / "fresh.img")
    assert (xfs / "fresh.img").read_bytes() == image.read_bytes()
    assert allocated(xfs / "fresh.img") <= allocated(image)

    backing = tmp_path / "device.img"
    backing.write_bytes(random.Random(5).randbytes(IMAGE_BLOCKS * BLOCK))  # a used disk: every block differs
    with loop_device(backing) as device:
        done = restore(repo, point, device, force=True)  # no punching on a device: its holes get zeros
        assert device.read_bytes() == image.read_bytes()
        assert done.blocks_written == IMAGE_BLOCKS
        # The device as a source: every block is data to SEEK_DATA, the zero blocks are found by reading.
        from_device = backup(repo, LocalBlockSource(device), _request("dev"))
    assert from_device.totals.used == len(DATA_BLOCKS) * BLOCK and from_device.totals.uploaded_chunks == 0
    assert from_device.totals.scanned == len(DATA_BLOCKS) * BLOCK
