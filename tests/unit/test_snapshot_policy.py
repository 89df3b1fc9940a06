"""SnapshotPolicy validation and the configuration errors take_snapshot raises before touching a host."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from configs.models import DiskConfig, HostConfig
from configs.policies import BackupPolicy, SnapshotPolicy
from connectors import settings_for
from connectors.local import LocalConnector
from tasks.backup.snapshot.view import CRASH, SnapshotError
from tasks.backup.snapshot.take import take_snapshot

LINUX = HostConfig(name="web1", transport="local")
DISK = DiskConfig(name="data", path="/srv/data")


def test_a_backup_policy_becomes_a_snapshot_policy() -> None:
    backup = BackupPolicy(snapshot_method="fsfreeze", pre_script="/usr/local/bin/flush-db", post_script="true")
    assert SnapshotPolicy.of(backup) == SnapshotPolicy(method="fsfreeze", pre_script="/usr/local/bin/flush-db",
                                                       post_script="true")
    same = SnapshotPolicy(method="none")
    assert SnapshotPolicy.of(same) is same
    with pytest.raises(TypeError, match="expected a SnapshotPolicy or a backup policy, not dict"):
        SnapshotPolicy.of({"method": "lvm"})


@pytest.mark.parametrize("size", ["10%ORIGIN", "2G", "512m", "20%FREE", "1.5T"])
def test_lvm_sizes_lvcreate_accepts(size: str) -> None:
    assert SnapshotPolicy(lvm_snapshot_size=size).lvm_snapshot_size == size


@pytest.mark.parametrize("field, value", [("lvm_snapshot_size", "10%; rm -rf /"), ("lvm_snapshot_size", "lots"),
                                          ("script_timeout", 0), ("method", "zfs"), ("freeze_limit", -1)])
def test_bad_policy_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as failure:
        SnapshotPolicy(**{field: value})
    assert failure.value.errors()[0]["loc"] == (field,)


def test_unknown_policy_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="pre_scirpt"):
        SnapshotPolicy(pre_scirpt="sync")  # type: ignore[call-arg]


def test_vss_on_a_linux_host_is_a_configuration_error() -> None:
    with pytest.raises(SnapshotError, match=r"host web1 disk data: field method: 'vss' does not exist on linux hosts"):
        take_snapshot(LocalConnector(settings_for(LINUX)), LINUX, DISK, SnapshotPolicy(method="vss"))


def test_lvm_on_a_windows_host_is_a_configuration_error() -> None:
    windows = HostConfig(name="win1", transport="local", os_family="windows")
    with pytest.raises(SnapshotError, match="field method: 'lvm' does not exist on windows hosts"):
        take_snapshot(LocalConnector(settings_for(windows)), windows, DISK, SnapshotPolicy(method="lvm"))


def test_a_relative_path_cannot_be_frozen() -> None:
    relative = DiskConfig(name="lab", path="lab/data")
    with pytest.raises(SnapshotError, match="field path: 'lab/data' must be an absolute path for method 'fsfreeze'"):
        take_snapshot(LocalConnector(settings_for(LINUX)), LINUX, relative, SnapshotPolicy(method="fsfreeze"))


def test_auto_reads_a_relative_path_live_and_says_why() -> None:
    snap = take_snapshot(LocalConnector(settings_for(LINUX)), LINUX, DiskConfig(name="lab", path="lab/data"), SnapshotPolicy())
    assert (snap.method, snap.consistency, snap.read_path) == ("none", CRASH, "lab/data")
    assert "relative" in snap.notes[0]
