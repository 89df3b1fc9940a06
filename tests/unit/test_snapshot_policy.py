"""SnapshotPolicy validation and the configuration errors take_snapshot raises before touching a host."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from configs.loader import ConfigError, load_config
from configs.models import DiskConfig, HostConfig
from configs.policies import BackupPolicy, SnapshotPolicy
from connectors import settings_for
from connectors.local import LocalConnector
from tasks.backup.disk import back_up_disk, open_repository
from tasks.backup.policy import policy_from_config
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


def test_the_snapshot_block_of_a_yaml_policy_reaches_the_snapshot_taken(tmp_path: Path) -> None:
    """script_timeout, set in the file's snapshot: block, is the limit the pre-script runs under."""
    image = tmp_path / "vm.img"
    image.write_bytes(bytes(8192))
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "vm", "path": "vm.img", "kind": "block"}]}],
        "backup_policies": {"nightly": {"block_size": 4096, "snapshot": {
            "method": "none", "pre_script": "sleep 60", "script_timeout": 0.5, "fallback": True}}},
    }))
    loaded = load_config(cfg)
    policy = policy_from_config(loaded.config.backup_policies, "nightly")
    [host] = loaded.config.hosts
    report = back_up_disk(loaded.config.storage, loaded.base_dir, host, host.disks[0], policy)
    point = open_repository(loaded.config.storage, loaded.base_dir, policy).find_point("lab-1", "vm")
    assert report.consistency == CRASH
    assert any("pre-script timed out after 0.5s" in note for note in point.notes), point.notes


def test_a_shorthand_and_the_snapshot_block_that_disagree_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("storage: {kind: local, path: store}\nbackup_policies:\n  nightly:\n"
                   "    snapshot_method: fsfreeze\n    snapshot: {method: lvm}\n")
    with pytest.raises(ConfigError) as failure:
        load_config(cfg)
    message = str(failure.value)
    assert "fleet.yaml" in message and "backup_policies.nightly" in message
    assert "snapshot_method 'fsfreeze' conflicts with snapshot.method 'lvm'" in message
    # The shorthand alone, or agreeing with the block, is what existing configs say: accepted.
    assert BackupPolicy(snapshot_method="lvm", snapshot=SnapshotPolicy(method="lvm")).snapshot_settings.method == "lvm"
    assert BackupPolicy(pre_script="flush").snapshot_settings.pre_script == "flush"
