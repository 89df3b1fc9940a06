"""Sparse and mostly-empty images cost what they hold: holes are not read, zero blocks are not
stored, restores leave holes as holes and make an existing target equal the point. Real local
stores and real sparse files on the test machine's file system."""

from __future__ import annotations

import io
import json
import os
import random
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from cli.app import app
from configs.models import HostConfig
from connectors import settings_for
from connectors.local import LocalConnector
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import RepositoryError
from tasks.backup.host_scripts import blockscan
from tasks.backup.repo.blockmap import HOLE, BlockMap
from tasks.backup.repo.repository import MapRef, RecoveryPoint, Repository, Totals, utcnow
from tasks.backup.repo.retention import KeepRules, forget_and_prune
from tasks.backup.repo.verify import verify
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource
from tasks.backup.sources.remote import RemoteBlockSource
from tests.trees import allocated
from tests.unit.test_backup_engine import repo, store  # noqa: F401 - fixtures

BLOCK = 64 * 1024
MIB = 1024 * 1024
#: blocks of an image that hold data; the rest are holes, except ZERO_BLOCK (written zeros)
DATA_BLOCKS = (0, 7, 8, 100, 255)
ZERO_BLOCK = 50
IMAGE_BLOCKS = 256


def request(disk: str = "vm") -> BackupRequest:
    return BackupRequest(host="web-1", disk=disk, block_size=BLOCK, workers=3)


def sparse_image(path: Path, *, tail: int = 0) -> Path:
    """16 MiB apparent, 5 blocks of data, one block of written (allocated) zeros, holes elsewhere,
    and `tail` more bytes of hole past the last whole block."""
    with open(path, "wb") as handle:
        handle.truncate(IMAGE_BLOCKS * BLOCK + tail)
        for index in DATA_BLOCKS:
            handle.seek(index * BLOCK)
            handle.write(random.Random(index).randbytes(BLOCK))
        handle.seek(ZERO_BLOCK * BLOCK)
        handle.write(bytes(BLOCK))
        os.fsync(handle.fileno())
    return path


def stored_bytes(store: LocalBlobStore) -> int:
    return sum(p.stat().st_size for p in (store.root / "chunks").rglob("*") if p.is_file())


def block_map(repo: Repository, point: RecoveryPoint) -> BlockMap:
    return BlockMap.from_json(repo.get_map(point.map.id), point=point.key)


def read_bytes_of_this_process() -> int:
    """What this process has read through read(2)-like calls so far (/proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_sparse_image_stores_only_its_data_and_restores_with_its_holes(repo: Repository, store: LocalBlobStore,
                                                                         tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "vm.img", tail=1000)
    point = backup(repo, LocalBlockSource(image), request())

    assert point.totals.size == image.stat().st_size
    assert point.totals.used == len(DATA_BLOCKS) * BLOCK
    assert point.totals.uploaded_chunks == len(DATA_BLOCKS)  # no chunk for the zero block or the holes
    assert len(list((store.root / "chunks").rglob("*/*"))) == len(DATA_BLOCKS)
    assert stored_bytes(store) <= len(DATA_BLOCKS) * BLOCK + 4096  # random data: zstd stores it raw
    # Only data extents were read and hashed: the written zero block is read, then dropped.
    assert point.totals.scanned == len(DATA_BLOCKS) * BLOCK
    chunks = block_map(repo, point).chunks
    assert [i for i, c in enumerate(chunks) if c != HOLE] == list(DATA_BLOCKS)

    fresh = tmp_path / "fresh.img"
    result = restore(repo, point, fresh)
    assert fresh.read_bytes() == image.read_bytes()
    assert allocated(fresh) <= allocated(image)  # the written zero block becomes a hole too
    assert allocated(fresh) >= len(DATA_BLOCKS) * BLOCK
    assert result.blocks_written == len(DATA_BLOCKS)

    report = verify(repo)
    assert report.ok and report.chunks_total == len(DATA_BLOCKS) and report.chunks_checked == len(DATA_BLOCKS)


def test_holes_are_not_read(repo: Repository, tmp_path: Path) -> None:
    """A 4 GiB image with 1 MiB of data: the process reads little more than its data (the kernel
    would hand out 4 GiB of zeros to a reader that read the holes), measured by what it read."""
    image = tmp_path / "big.img"
    with open(image, "wb") as handle:
        handle.truncate(4096 * MIB)
        handle.seek(2048 * MIB)
        handle.write(random.Random(1).randbytes(MIB))
    before = read_bytes_of_this_process()
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="big", block_size=4 * MIB))
    read = read_bytes_of_this_process() - before
    assert point.totals.used == 4 * MIB and point.totals.uploaded_chunks == 1
    # Not even the rest of the 4 MiB block holding the 1 MiB: only data extents are read.
    assert read < 2 * MIB, f"read {read} bytes of a 4 GiB image holding 1 MiB"

    # The host-side scan (the same code a host runs over SSH) skips the holes too.
    before = read_bytes_of_this_process()
    printed = io.StringIO()
    with redirect_stdout(printed):
        blockscan.scan(str(image), 4 * MIB)
    assert read_bytes_of_this_process() - before < 2 * MIB
    scanned = json.loads(printed.getvalue())
    assert len(scanned["fingerprints"]) == 64 * 1024  # one digest per 4 MiB block


@pytest.mark.parametrize("seed", range(4))
def test_data_in_pieces_across_block_edges_reads_back_exactly(repo: Repository, tmp_path: Path, seed: int) -> None:
    """Extents that start and end inside blocks, straddle block edges and end the file (a short
    last block with data): the blocks read through SEEK_DATA/SEEK_HOLE are the file's bytes."""
    rng = random.Random(seed)
    image = tmp_path / "pieces.img"
    size = 40 * BLOCK + rng.randrange(1, BLOCK)
    with open(image, "wb") as handle:
        handle.truncate(size)
        for _ in range(12):
            at = rng.randrange(0, size - 1)
            handle.seek(at)
            handle.write(rng.randbytes(min(rng.randrange(1, 2 * BLOCK), size - at)))
        handle.seek(size - 10)
        handle.write(b"last bytes")
    point = backup(repo, LocalBlockSource(image), request(f"pieces-{seed}"))
    data = image.read_bytes()
    holding = [i for i in range(0, size, BLOCK) if any(data[i:i + BLOCK])]
    assert point.totals.used == sum(min(BLOCK, size - i) for i in holding)
    out = tmp_path / "out.img"
    restore(repo, point, out)
    assert out.read_bytes() == data
    # The host's scan (blockscan.py in a python3 subprocess) finds the same holes and blocks.
    connector = LocalConnector(settings_for(HostConfig(name="lab", transport="local")))
    remote = backup(repo, RemoteBlockSource(connector, str(image)), request(f"host-{seed}"))
    assert block_map(repo, remote).chunks == block_map(repo, point).chunks and remote.totals.uploaded_chunks == 0


@pytest.mark.parametrize("extra", [0, 3 * BLOCK + 123], ids=["same size", "longer"])
def test_forced_restore_over_a_live_full_file_equals_the_point(repo: Repository, tmp_path: Path, extra: int) -> None:
    image = sparse_image(tmp_path / "vm.img")
    point = backup(repo, LocalBlockSource(image), request())
    live = tmp_path / "live.img"
    live.write_bytes(random.Random(7).randbytes(IMAGE_BLOCKS * BLOCK + extra))  # fully allocated, all differs
    restore(repo, point, live, force=True)
    assert live.read_bytes() == image.read_bytes()
    assert allocated(live) <= allocated(image) + BLOCK  # the point's holes are punched

    # A restore over a copy that already equals the point writes nothing.
    again = restore(repo, point, live, force=True)
    assert again.blocks_written == 0 and live.read_bytes() == image.read_bytes()


def test_incrementals_follow_data_moving_into_and_out_of_holes(repo: Repository, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "vm.img")
    first = backup(repo, LocalBlockSource(image), request())
    with open(image, "r+b") as handle:
        handle.seek(30 * BLOCK)
        handle.write(random.Random(30).randbytes(BLOCK))  # a hole gets data
        handle.seek(7 * BLOCK)
        handle.write(bytes(BLOCK))  # data becomes zeros
    with open(image, "r+b") as handle:
        blockscan.punch_hole(handle.fileno(), 100 * BLOCK, BLOCK)  # data becomes a hole
    second = backup(repo, LocalBlockSource(image), request())
    assert second.totals.changed_blocks == 3 and second.totals.uploaded_chunks == 1
    assert second.totals.used == (len(DATA_BLOCKS) - 1) * BLOCK
    out = tmp_path / "second.img"
    restore(repo, second, out)
    assert out.read_bytes() == image.read_bytes()
    # Restoring the first point over the second's copy brings its data back.
    restore(repo, first, out, force=True)
    assert out.read_bytes() == sparse_image(tmp_path / "original.img").read_bytes()


def _old_format_point(repo: Repository, image: Path, moment_disk: str) -> RecoveryPoint:
    """A point as patchdrill wrote it before holes were recorded (block map version 1, no
    `used`): every block a chunk, the zero block's too, stored once."""
    data = image.read_bytes()
    chunks = []
    for offset in range(0, len(data), BLOCK):
        block = data[offset:offset + BLOCK]
        chunk_id = repo.codec.chunk_id(block)
        repo.put_chunk(chunk_id, block)
        chunks.append(chunk_id)
    map_id = repo.put_map({"kind": "block", "size": len(data), "block_size": BLOCK,
                           "chunks": b"".join(chunks).hex(), "fingerprint": "chunk-id"})
    point = RecoveryPoint(host="web-1", disk=moment_disk, time=utcnow(), kind="block", source_path=str(image),
                          consistency="crash-consistent", block_size=BLOCK,
                          map=MapRef(id=map_id, blocks=len(chunks)), totals=Totals(size=len(data)))
    repo.write_point(point)
    return point


def test_old_format_points_still_restore_verify_and_parent_new_ones(repo: Repository, tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "vm.img")
    old = _old_format_point(repo, image, "vm")
    assert "version" not in repo.get_map(old.map.id) and repo.read_point(old.key).totals.used is None
    zero_chunk = repo.codec.chunk_id(bytes(BLOCK))
    assert repo.has_chunk(zero_chunk)

    out = tmp_path / "old.img"
    restore(repo, old, out)
    assert out.read_bytes() == image.read_bytes() and allocated(out) <= allocated(image)
    live = tmp_path / "live.img"
    live.write_bytes(random.Random(8).randbytes(IMAGE_BLOCKS * BLOCK))
    restore(repo, old, live, force=True)
    assert live.read_bytes() == image.read_bytes()
    assert verify(repo).ok

    new = backup(repo, LocalBlockSource(image), request())
    assert new.parent == old.key and (new.totals.changed_blocks, new.totals.uploaded_chunks) == (0, 0) and new.totals.used == len(DATA_BLOCKS) * BLOCK
    assert block_map(repo, new).chunks.count(HOLE) == IMAGE_BLOCKS - len(DATA_BLOCKS)
    # Forgetting the old point frees the zero block's chunk; the new point still restores.
    forget_and_prune(repo, KeepRules(last=1))
    assert not repo.has_chunk(zero_chunk)
    restore(repo, new, tmp_path / "new.img")
    assert (tmp_path / "new.img").read_bytes() == image.read_bytes()
    assert verify(repo).ok


def test_a_block_map_of_a_newer_version_is_refused() -> None:
    body = BlockMap(size=BLOCK, block_size=BLOCK, chunks=[HOLE]).to_json() | {"version": 3}
    with pytest.raises(RepositoryError, match="block map version 3 is newer than this patchdrill reads"):
        BlockMap.from_json(body, point="points/web-1/vm/x.json")


def test_points_command_shows_used_bytes_beside_size(repo: Repository, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    image = sparse_image(tmp_path / "vm.img")
    backup(repo, LocalBlockSource(image), request())
    _old_format_point(repo, image, "old")
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "repo"},
        "hosts": [{"name": "web-1", "transport": "local", "disks": [{"name": "vm", "path": "vm.img"}]}],
    }))
    capsys.readouterr()
    assert (app(["points", "-c", str(cfg), "--json"], standalone_mode=False) or 0) == 0
    listed = {p["disk"]: p["totals"] for p in json.loads(capsys.readouterr().out)}
    assert listed["vm"]["size"] == IMAGE_BLOCKS * BLOCK and listed["vm"]["used"] == len(DATA_BLOCKS) * BLOCK
    assert listed["old"]["used"] is None
    assert (app(["points", "-c", str(cfg)], standalone_mode=False) or 0) == 0
    table = capsys.readouterr().out
    assert "used" in table
    # host, disk, date, time, "kind,", level, size, used, …: the table fits in 80 columns.
    rows = {line.split()[1]: line.split()[6:8] for line in table.splitlines() if line.split()[:1] == ["web-1"]}
    assert rows == {"vm": ["16.0", "0.3"], "old": ["16.0", "—"]}, table
