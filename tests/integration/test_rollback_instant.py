"""A patch rollback's restore of an image disk from its pre-patch point, on a real loop-mounted
XFS (tests/hosts/loopfs.py) through the local transport: where the backup policy keeps reflink
clones, the disk is cloned back from the point's clone on the host (nothing read from the
store); where that clone is gone, it is restored from the repository, and the record says why.
The rest of the rollback (approval, window, workload, probes) is covered end to end in
tests/e2e/test_patch_safety.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from configs.models import DiskConfig, HostConfig, LocalStorage
from configs.policies import BackupPolicy
from connectors import connect
from tasks.backup.disk import back_up_disk, open_repository
from tasks.patching.safety.records import RestoredDisk, RollbackRecord
from tasks.patching.safety.rollback import restore_pre_patch
from tests.hosts.loopfs import xfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def test_a_rollback_clones_the_pre_patch_point_back_and_falls_back_to_the_repository(
        xfs: Path, tmp_path: Path) -> None:  # noqa: F811
    image = xfs / "vm.img"
    pre_patch = os.urandom(40 * BLOCK)
    image.write_bytes(pre_patch)
    host = HostConfig(name="lab", transport="local", os_family="linux",
                      disks=[DiskConfig(name="vm", path=str(image), kind="block")])
    policy = BackupPolicy(block_size=BLOCK,
                          kept_clones={"points": 1, "days": 1, "space_limit": "64MiB"})
    storage = LocalStorage(kind="local", path=str(tmp_path / "store"))
    taken = back_up_disk(storage, tmp_path, host, host.disks[0], policy)
    assert taken.status == "ok", taken.error
    repo = open_repository(storage, tmp_path, policy)
    point = repo.find_point("lab", "vm")
    assert point.kept_clone is not None, point.notes

    def patched() -> None:  # what a bad patch leaves: changed blocks and a longer file
        with image.open("r+b") as handle:
            handle.seek(3 * BLOCK)
            handle.write(b"patched" * 5000)
        with image.open("ab") as handle:
            handle.write(b"grown by the patch")

    patched()
    with connect(host, base_dir=tmp_path) as conn:
        cloned = restore_pre_patch(repo, point, host, conn, str(image), tmp_path)
    assert cloned.source == "instant copy" and image.read_bytes() == pre_patch

    patched()
    Path(point.kept_clone.path).unlink()
    with connect(host, base_dir=tmp_path) as conn:
        fetched = restore_pre_patch(repo, point, host, conn, str(image), tmp_path)
    assert fetched.source == "repository" and fetched.notes and image.read_bytes() == pre_patch
    assert 0 < fetched.bytes_written < len(pre_patch), "only the blocks the patch changed travel"

    record = RollbackRecord(status="restored", seconds=1.0, probes_after="passed", disks=[
        RestoredDisk(disk="vm", point=point.key, bytes_written=cloned.bytes_written, seconds=cloned.seconds,
                     source=cloned.source)])
    assert "vm from its instant copy" in record.describe()
