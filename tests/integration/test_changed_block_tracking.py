"""Changed-block tracking on a real loop-mounted XFS (tests/hosts/loopfs.py): the blocks a
backup reads because the kept clone's extent map differs must give exactly the block map and
the restored bytes that reading and hashing the whole image gives, whatever happened to the
image in between. Both ways run on every state of the image: the tracked backup into one
repository, a read-and-hash backup (no kept clones) into another; their maps are compared block
by block and the tracked point is restored from its repository and compared byte for byte. The
read-and-hash reference reads the image where it lies (the local transport) whichever transport
the tracked backup goes through: it is the truth to compare with, and the image is the same file.

The host side runs for real: the snapshot helper (reflink clones), the kept-clone helper (FIEMAP
through its ioctl) over the local transport and over a real sshd (the remote block source
fetches only the changed blocks).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from configs.models import DiskConfig, HostConfig, LocalStorage
from configs.policies import BackupPolicy
from tasks.backup.disk import back_up_disk, open_repository
from tasks.backup.repo.blockmap import BlockMap
from tasks.backup.repo.repository import RecoveryPoint
from tasks.backup.restore import restore
from tests.hosts.loopfs import xfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024
FS_BLOCK = 4096
SIZE = 6 * 1024 * 1024


def tracked_policy(**rules: object) -> BackupPolicy:
    return BackupPolicy(block_size=BLOCK, kept_clones={"points": 1, "days": 1, "space_limit": "64MiB", **rules})


READ_AND_HASH = BackupPolicy(block_size=BLOCK)


class Pair:
    """The same disk backed up both ways, each into its own repository."""

    def __init__(self, root: Path, host: HostConfig, policy: BackupPolicy) -> None:
        self.root, self.host, self.policy = root, host, policy
        self.reference = HostConfig(name=host.name, transport="local", disks=host.disks)
        self.tracked = LocalStorage(kind="local", path=str(root / "tracked"))
        self.plain = LocalStorage(kind="local", path=str(root / "plain"))

    def back_up(self) -> tuple[RecoveryPoint, RecoveryPoint]:
        disk = self.host.disks[0]
        tracked = back_up_disk(self.tracked, self.root, self.host, disk, self.policy)
        plain = back_up_disk(self.plain, self.root, self.reference, disk, READ_AND_HASH)
        assert tracked.status == plain.status == "ok", (tracked.error, plain.error)
        return (open_repository(self.tracked, self.root, self.policy).find_point(self.host.name, disk.name),
                open_repository(self.plain, self.root, READ_AND_HASH).find_point(self.host.name, disk.name))

    def check_equal(self, image: Path, expected_tracked: bool) -> RecoveryPoint:
        content = image.read_bytes()
        tracked, plain = self.back_up()
        repo = open_repository(self.tracked, self.root, self.policy)
        tracked_map = BlockMap.from_json(repo.get_map(tracked.map.id), point=tracked.key)
        plain_map = BlockMap.from_json(open_repository(self.plain, self.root, READ_AND_HASH).get_map(plain.map.id),
                                       point=plain.key)
        assert (tracked_map.size, tracked_map.chunks) == (plain_map.size, plain_map.chunks)
        went = [n for n in tracked.notes if n.startswith(("changed-block tracking", "read and hash"))]
        assert len(went) == 1 and went[0].startswith("changed-block tracking" if expected_tracked else "read and hash"), \
            tracked.notes
        if expected_tracked:
            assert tracked.totals.scanned < len(content), "tracking read the whole image"
        target = self.root / f"restored-{tracked.time.timestamp()}.img"
        restore(repo, tracked, target)
        assert target.read_bytes() == content
        target.unlink()
        return tracked


def write_at(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def mutations(image: Path, rng: random.Random) -> list[tuple[str, Callable[[], None]]]:
    def size() -> int:
        return image.stat().st_size

    def aligned(limit: int) -> int:
        return rng.randrange(0, max(1, limit // FS_BLOCK)) * FS_BLOCK

    return [
        ("random writes", lambda: [write_at(image, rng.randrange(0, size() - 100), rng.randbytes(rng.randint(1, 99)))
                                   for _ in range(7)]),
        ("a large write across blocks", lambda: write_at(image, rng.randrange(0, size() - 3 * BLOCK),
                                                         rng.randbytes(2 * BLOCK + 333))),
        ("truncation to an unaligned size", lambda: os.truncate(image, size() - BLOCK - 1234)),
        ("extension with a hole", lambda: os.truncate(image, size() + 3 * BLOCK + 77)),
        ("extension with data", lambda: image.open("ab").write(rng.randbytes(BLOCK + 5))),
        ("hole punch", lambda: run("fallocate", "--punch-hole", "-o", str(aligned(size() - 2 * BLOCK)),
                                   "-l", str(BLOCK + FS_BLOCK), str(image))),
        ("unaligned hole punch", lambda: run("fallocate", "--punch-hole", "-o", str(rng.randrange(0, size() - BLOCK)),
                                             "-l", "5000", str(image))),
        ("reflink of a range inside the image", lambda: run(
            "xfs_io", "-c", f"reflink {image} {aligned(size() // 2)} {aligned(size() // 2) + size() // 2 - 2 * BLOCK} "
            f"{2 * BLOCK}", str(image))),
        ("reflink from another file", lambda: _reflink_from_other(image, rng, aligned(size() - BLOCK))),
        ("zero range", lambda: run("fallocate", "--zero-range", "-o", str(aligned(size() - BLOCK)), "-l",
                                   str(BLOCK), str(image))),
        ("rewrite with the same bytes", lambda: write_at(image, BLOCK, image.read_bytes()[BLOCK:2 * BLOCK])),
    ]


def _reflink_from_other(image: Path, rng: random.Random, offset: int) -> None:
    other = image.with_name("other.img")
    other.write_bytes(rng.randbytes(BLOCK))
    run("xfs_io", "-c", f"reflink {other} 0 {offset} {BLOCK}", str(image))
    other.unlink()


@pytest.fixture(params=["local", "ssh"])
def host_of(request: pytest.FixtureRequest) -> Callable[[Path], HostConfig]:
    def make(image: Path) -> HostConfig:
        disks = [DiskConfig(name="vm", path=str(image), kind="block")]
        if request.param == "local":
            return HostConfig(name="cbt-1", transport="local", disks=disks)
        base: HostConfig = request.getfixturevalue("ssh_host_config")
        return base.model_copy(update={"disks": disks})
    return make


def test_tracked_backups_equal_read_and_hash_over_every_kind_of_change(
        xfs: Path, tmp_path: Path, host_of: Callable[[Path], HostConfig]) -> None:  # noqa: F811
    image = xfs / "vm.img"
    rng = random.Random(13)
    image.write_bytes(rng.randbytes(SIZE))
    run("fallocate", "--punch-hole", "-o", str(8 * BLOCK), "-l", str(4 * BLOCK), str(image))  # a hole from the start
    pair = Pair(tmp_path, host_of(image), tracked_policy())
    pair.check_equal(image, expected_tracked=False)  # the first backup has nothing to compare with
    # Every kind of change twice over locally, at other random places the second time; once over
    # SSH, whose backups take the same paths on the host with a round trip per helper call.
    passes = 2 if pair.host.transport == "local" else 1
    for name, change in mutations(image, rng) * passes:
        change()
        point = pair.check_equal(image, expected_tracked=True)
        assert point.kept_clone is not None, name
    # Several kinds at once, in a random order.
    for _ in range(3):
        for _, change in rng.sample(mutations(image, rng), 4):
            change()
        pair.check_equal(image, expected_tracked=True)
    assert sorted(p.name for p in xfs.iterdir()) == [".patchdrill-kept", "vm.img"], "a snapshot clone was left"


def test_unchanged_image_reads_nothing(xfs: Path, tmp_path: Path) -> None:  # noqa: F811
    image = xfs / "vm.img"
    image.write_bytes(random.Random(3).randbytes(SIZE))
    pair = Pair(tmp_path, host_of_local(image), tracked_policy())
    pair.check_equal(image, expected_tracked=False)
    point, _ = pair.back_up()
    assert point.totals.scanned == 0 and "0 of 96 blocks read" in " ".join(point.notes), point.notes


def host_of_local(image: Path) -> HostConfig:
    return HostConfig(name="cbt-1", transport="local", disks=[DiskConfig(name="vm", path=str(image), kind="block")])


def kept_clone_of(point: RecoveryPoint) -> Path:
    assert point.kept_clone is not None
    return Path(point.kept_clone.path)


@pytest.mark.parametrize("break_chain, why", [
    (lambda clone, pair: clone.unlink(), "is missing"),
    (lambda clone, pair: write_at(clone, 0, b"tampered"), "was changed or replaced"),
    (lambda clone, pair: (clone.unlink(), shutil.copyfile(clone.with_suffix(".bak"), clone)), "was changed or replaced"),
    (lambda clone, pair: setattr(pair, "policy", tracked_policy().model_copy(update={"block_size": 2 * BLOCK})),
     "another block size"),
    (lambda clone, pair: setattr(pair, "policy", tracked_policy().model_copy(update={"rehash": True})),
     "rehash"),
])
def test_a_broken_chain_falls_back_to_read_and_hash_and_says_why(
        xfs: Path, tmp_path: Path, break_chain: Callable[[Path, Pair], object], why: str) -> None:  # noqa: F811
    image = xfs / "vm.img"
    image.write_bytes(random.Random(4).randbytes(SIZE))
    pair = Pair(tmp_path, host_of_local(image), tracked_policy())
    first = pair.check_equal(image, expected_tracked=False)
    clone = kept_clone_of(first)
    shutil.copyfile(clone, clone.with_suffix(".bak"))
    break_chain(clone, pair)
    write_at(image, 3 * BLOCK, b"changed")
    if pair.policy.block_size != BLOCK:
        # Maps at another block size are not comparable with the plain repository's.
        pair.plain = LocalStorage(kind="local", path=str(tmp_path / "plain-2"))
        pair.back_up()
        return _assert_fallback(pair, why)
    pair.check_equal(image, expected_tracked=False)
    _assert_fallback(pair, why)
    clone.with_suffix(".bak").unlink(missing_ok=True)
    # The chain is whole again from the point just written.
    pair.policy = tracked_policy()
    write_at(image, 5 * BLOCK, b"again")
    pair.check_equal(image, expected_tracked=True)


def _assert_fallback(pair: Pair, why: str) -> None:
    point = open_repository(pair.tracked, pair.root, pair.policy).find_point("cbt-1", "vm")
    notes = " ".join(point.notes)
    assert "read and hash" in notes and why in notes, point.notes


def test_a_host_without_room_for_kept_clones_gets_a_clear_error(xfs: Path, tmp_path: Path) -> None:  # noqa: F811
    """The loop file system holds 320 MiB: kept clones allowed to grow to 10 GiB cannot fit."""
    image = xfs / "vm.img"
    image.write_bytes(random.Random(5).randbytes(SIZE))
    host = host_of_local(image)
    policy = tracked_policy(space_limit="10GiB")
    report = back_up_disk(LocalStorage(kind="local", path=str(tmp_path / "store")), tmp_path, host, host.disks[0], policy)
    assert report.status == "ok" and report.warning is not None
    for part in ("host cbt-1 disk vm", "no clone kept", f"xfs file system at {xfs}", "kept_clones.space_limit 10.00 GiB"):
        assert part in report.warning, report.warning
    point = open_repository(LocalStorage(kind="local", path=str(tmp_path / "store")), tmp_path, policy).find_point("cbt-1", "vm")
    assert point.kept_clone is None and any("no clone kept" in n for n in point.notes)
    assert not (xfs / ".patchdrill-kept").exists() or not any((xfs / ".patchdrill-kept").rglob("*.img"))


def test_the_space_limit_drops_the_oldest_clones_first(xfs: Path, tmp_path: Path) -> None:  # noqa: F811
    """Three points kept; each rewrite leaves 1 MiB that only the older clones hold. A 1.5 MiB
    limit keeps the two newest (the newest shares everything with the image)."""
    image = xfs / "vm.img"
    rng = random.Random(6)
    image.write_bytes(rng.randbytes(SIZE))
    host = host_of_local(image)
    policy = tracked_policy(points=3, space_limit=str(3 * 1024 * 1024 // 2))
    storage = LocalStorage(kind="local", path=str(tmp_path / "store"))
    kept = []
    for round_ in range(3):
        write_at(image, round_ * 1024 * 1024, rng.randbytes(1024 * 1024))
        report = back_up_disk(storage, tmp_path, host, host.disks[0], policy)
        kept.append(report.point)
    on_host = sorted(p.name for p in (xfs / ".patchdrill-kept" / "cbt-1" / "vm").iterdir())
    stamps = [key.rsplit("/", 1)[1].replace(".json", ".img") for key in kept if key]
    assert on_host == stamps[1:], (on_host, stamps)
