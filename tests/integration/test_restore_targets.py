"""Restores onto real targets: an empty mounted volume (a loop-mounted XFS, tests/hosts/loopfs.py)
and a host over a real OpenSSH sshd, with hostile links and drift in the way."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors import connect
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import RestoreFailed, TargetExists
from tasks.backup.remote_restore import restore_to_host
from tasks.backup.repo.repository import Repository
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tests.trees import ACL, MIB, Escape, allocated, assert_same_tree, rich_tree

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def request(disk: str = "data") -> BackupRequest:
    return BackupRequest(host="primary", disk=disk, block_size=BLOCK, workers=2)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)


def test_directory_point_into_an_empty_mounted_volume(repo: Repository, tmp_path: Path, xfs: Path) -> None:
    src = rich_tree(tmp_path / "src")
    point = backup(repo, LocalTreeSource(src), request())
    for leftover in list(xfs.iterdir()):  # a fresh XFS may carry nothing; make sure it is empty
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    restore(repo, point, xfs)  # an empty directory needs no --force
    assert xfs.is_mount()
    assert_same_tree(src, xfs)
    # Written on the volume itself, not on the file system underneath the mount point.
    assert os.stat(xfs / "data" / "table.db").st_dev == os.stat(xfs).st_dev != os.stat(tmp_path).st_dev
    assert allocated(xfs / "data" / "sparse.img") <= 2 * MIB
    assert sorted(p.name for p in tmp_path.iterdir() if "patchdrill" in p.name) == []

    (xfs / "extra.txt").write_text("drift")
    with pytest.raises(TargetExists):
        restore(repo, point, xfs)
    result = restore(repo, point, xfs, force=True)
    assert result.removed == 1 and xfs.is_mount()
    assert_same_tree(src, xfs)


def test_image_restore_onto_a_mounted_volume(repo: Repository, tmp_path: Path, xfs: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(8 * BLOCK) + bytes(8 * BLOCK))
    point = backup(repo, LocalBlockSource(image), request(disk="os"))
    target = xfs / "vm" / "disk.img"
    restore(repo, point, target)
    assert target.read_bytes() == image.read_bytes()
    assert allocated(target) <= 9 * BLOCK
    assert [p.name for p in target.parent.iterdir()] == ["disk.img"]


def test_forced_restore_onto_an_ssh_host_never_follows_its_links(ssh_host_config: HostConfig, repo: Repository,
                                                                  tmp_path: Path) -> None:
    escape = Escape(tmp_path)
    point = backup(repo, LocalTreeSource(escape.src), request())
    link_target = tmp_path / "dr-link"
    link_target.symlink_to(escape.outside)
    with connect(ssh_host_config) as connector:
        restore_to_host(repo, point, connector, str(escape.plant()), force=True)
        with pytest.raises(RestoreFailed, match=r"dr-link' is a symbolic link"):
            restore_to_host(repo, point, connector, str(link_target), force=True)
    assert escape.state() == escape.before, "the restore wrote outside its target"
    assert_same_tree(escape.src, escape.target)


def test_failback_onto_an_ssh_host_equals_the_point_with_its_metadata(ssh_host_config: HostConfig, repo: Repository,
                                                                      tmp_path: Path) -> None:
    src = rich_tree(tmp_path / "primary")
    point = backup(repo, LocalTreeSource(src), request())
    target = tmp_path / "dr"
    with connect(ssh_host_config) as connector:
        fresh = restore_to_host(repo, point, connector, str(target))
        assert fresh.removed == 0
        assert_same_tree(src, target)
        (target / "extra" / "deeper").mkdir(parents=True)
        (target / "extra" / "deeper" / "x").write_text("x")
        (target / "etc" / "app" / "app.conf").write_text("drifted\n")
        os.removexattr(target / "data" / "table.db", "system.posix_acl_access")
        again = restore_to_host(repo, point, connector, str(target), force=True)
    assert again.removed == 3
    # Only the drifted file crossed the wire again, and table.db: a file with a second name is
    # replaced whole, never written in place (its other name could be outside the tree).
    assert (again.blocks_written, again.bytes_written) == (1 + 2, len("port = 8080\n") + 100_000)
    assert_same_tree(src, target)
    assert os.getxattr(target / "data" / "table.db", "system.posix_acl_access") == ACL
    assert stat.S_ISFIFO(os.lstat(target / "data" / "pipe").st_mode)
    assert allocated(target / "data" / "sparse.img") <= 2 * MIB
    assert sorted(p.name for p in tmp_path.iterdir() if "patchdrill" in p.name) == []


def test_a_host_directory_is_backed_up_with_its_metadata(ssh_host_config: HostConfig, repo: Repository,
                                                          tmp_path: Path) -> None:
    from tasks.backup.sources.remote import RemoteTreeSource

    src = rich_tree(tmp_path / "srv")
    conf = src / "etc" / "app" / "app.conf"
    with connect(ssh_host_config) as connector:
        backup(repo, RemoteTreeSource(connector, str(src)), request())
        times = conf.stat().st_mtime_ns
        conf.write_text("port = 9999\n")  # same size, and the old mtime put back
        os.utime(conf, ns=(times, times))
        os.utime(conf.parent, ns=(1_400_000_000_000_000_000,) * 2)
        point = backup(repo, RemoteTreeSource(connector, str(src)), request())
    assert point.totals.scanned == len("port = 9999\n")  # the host's ctime gave the edit away
    out = tmp_path / "out"
    result = restore(repo, point, out)
    assert_same_tree(src, out)
    assert result.skipped == []


def test_a_host_restore_cleans_up_after_a_killed_one_and_names_a_read_only_target(
        ssh_host_config: HostConfig, repo: Repository, tmp_path: Path) -> None:
    """The leftovers are made by hand, named as a killed restore names them (a kill of the host's
    python mid-write is what tests/unit/test_restore_safety.py does for the local writer)."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(2).randbytes(4 * BLOCK))
    point = backup(repo, LocalBlockSource(image), request(disk="os"))
    dr = tmp_path / "dr"
    dr.mkdir()
    (dr / ".vm.img.patchdrill-restore-0123456789ab").write_bytes(bytes(4 * BLOCK))  # a killed new-target write
    (dr / ".vm.img.patchdrill-restore-ba9876543210.patch").write_bytes(b"x")        # a killed patch upload
    (dr / ".vm.img.patchdrill-restore-ba9876543210").mkdir()                        # a killed tree restore
    (dr / "other.img").write_bytes(b"not ours")
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(media)], check=True)
    try:
        with connect(ssh_host_config) as connector:
            restore_to_host(repo, point, connector, str(dr / "vm.img"))
            with pytest.raises(RestoreFailed) as caught:
                restore_to_host(repo, point, connector, str(media / "vm.img"))
    finally:
        subprocess.run(["umount", str(media)], check=True)
    assert sorted(p.name for p in dr.iterdir()) == ["other.img", "vm.img"]
    assert (dr / "vm.img").read_bytes() == image.read_bytes()
    message = str(caught.value)
    assert message == f"cannot restore into '{ssh_host_config.name}:{media / 'vm.img'}': Read-only file system"


def test_failback_leaves_a_volume_mounted_inside_the_target_alone(repo: Repository, tmp_path: Path, xfs: Path) -> None:
    """A mount the point knows nothing of is not emptied: it is listed as skipped instead."""
    src = tmp_path / "src"
    (src / "app").mkdir(parents=True)
    (src / "app" / "a.txt").write_text("a\n")
    point = backup(repo, LocalTreeSource(src), request())
    target = tmp_path / "dr"
    restore(repo, point, target)
    (xfs / "volume-data.txt").write_text("belongs to the volume")
    (target / "extra" / "mnt").mkdir(parents=True)
    (target / "extra" / "stray.txt").write_text("stray")
    subprocess.run(["mount", "--bind", str(xfs), str(target / "extra" / "mnt")], check=True)
    try:
        result = restore(repo, point, target, force=True)
        assert (target / "extra" / "mnt" / "volume-data.txt").read_text() == "belongs to the volume"
    finally:
        subprocess.run(["umount", str(target / "extra" / "mnt")], check=True)
    assert result.removed == 1  # extra/stray.txt; extra and extra/mnt stay for the mount
    assert result.skipped == ["extra/mnt: a mounted file system the point lacks: left in place"]
    assert (target / "app" / "a.txt").read_text() == "a\n"
