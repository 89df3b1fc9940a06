"""The backup policy model, which faults are retried, and the snapshot always being removed."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from configs.models import DiskConfig, HostConfig, LocalStorage
from configs.policies import BackupPolicy
from connectors.base import AuthenticationFailed, HostTimeout, HostUnreachable
from connectors.stores import StoreError, StoreUnavailable
from tasks.backup.errors import BackupError, ChunkCorrupt, SourceError
from tasks.backup.policy import policy_from_config
from tasks.backup.snapshot import take as snapshots
from tasks.backup import disk as disk_module
from tasks.backup.disk import back_up_disk
from tasks.backup.snapshot.view import Snapshot
from tasks.retry import is_transient


def test_policy_defaults_and_named_errors() -> None:
    assert policy_from_config({}, None) == BackupPolicy()
    assert BackupPolicy().block_size == 4 * 1024 * 1024
    assert policy_from_config({"nightly": {"keep_last": 7}}, None).keep.last == 7
    with pytest.raises(BackupError, match=r"fleet.yaml: backup_policies.nightly.block_size: .*power of two"):
        policy_from_config({"nightly": {"block_size": 5000}}, "nightly", source="fleet.yaml")
    with pytest.raises(BackupError, match=r"backup_policies.nightly.encryption_key: .*reference, not a literal"):
        policy_from_config({"nightly": {"encryption_key": "hunter2"}}, "nightly", source="fleet.yaml")
    with pytest.raises(BackupError, match=r"no backup policy 'weekly' \(known: a, b\)"):
        policy_from_config({"a": {}, "b": {}}, "weekly")
    with pytest.raises(BackupError, match="several backup policies"):
        policy_from_config({"a": {}, "b": {}}, None)


def test_only_transient_faults_are_retried() -> None:
    assert is_transient(HostUnreachable("h", "no route"))
    assert is_transient(HostTimeout("h", "slow"))
    assert is_transient(StoreUnavailable("azure: 503"))
    assert not is_transient(AuthenticationFailed("h", "refused"))
    assert not is_transient(StoreError("disk full"))
    assert not is_transient(ChunkCorrupt("ab", "points/x", "bad"))
    assert not is_transient(SourceError("no such disk"))


def test_snapshot_is_removed_even_when_the_backup_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real snapshot step, watched: each snapshot taken is removed afterwards, from its record
    (what the task boundary carries) and over a connection of its own."""
    events: list[str] = []
    levels: list[str] = []
    real_take, real_attach = snapshots.take_snapshot, disk_module.attach

    def taken(*args: Any, **kwargs: Any) -> Snapshot:
        snap = real_take(*args, **kwargs)
        events.append("taken")
        levels.append(snap.consistency)
        return snap

    def attached(*args: Any, **kwargs: Any) -> Snapshot:
        snap = real_attach(*args, **kwargs)
        original = snap.remove

        def remove() -> None:
            original()
            events.append("removed" if snap.removed else "left behind")
        snap.remove = remove  # type: ignore[method-assign]
        return snap

    monkeypatch.setattr(snapshots, "take_snapshot", taken)
    monkeypatch.setattr(disk_module, "attach", attached)
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(8 * 4096))
    journal = tmp_path / "journal"
    # No snapshot method: the post-script is held until removal, so removal has a step to run.
    scripts = {"snapshot_method": "none", "pre_script": f"echo pre >> {journal}", "post_script": f"echo post >> {journal}"}
    host = HostConfig(name="lab", transport="local", disks=[DiskConfig(name="os", path=str(image))])
    storage = LocalStorage(path=str(tmp_path / "store"))
    report = back_up_disk(storage, tmp_path, host, host.disks[0], BackupPolicy(block_size=4096, **scripts))
    assert report.consistency == levels[0] == "application-consistent"
    assert events == ["taken", "removed"]
    assert journal.read_text().split() == ["pre", "post"]

    broken = DiskConfig(name="gone", path=str(tmp_path / "missing.img"))
    with pytest.raises(Exception, match="missing.img"):
        back_up_disk(storage, tmp_path, host, broken, BackupPolicy(block_size=4096, **scripts))
    assert events == ["taken", "removed", "taken", "removed"]
    assert journal.read_text().split() == ["pre", "post", "pre", "post"]