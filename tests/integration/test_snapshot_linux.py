"""Linux snapshots for real, over a real OpenSSH sshd (tests/hosts/sshd.py) as root.

Real: the pre- and post-scripts, their timeout, tasks/backup/host_scripts/linux_snapshot.sh, fsfreeze
on a loop-mounted XFS image, and reflink clones on it. LVM cannot run here (the kernel has no
device-mapper), so it is covered in tests/unit/test_snapshot_lvm.py with stand-in LVM tools.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from configs.models import DiskConfig, HostConfig
from configs.policies import SnapshotPolicy
from configs.secrets import remember
from connectors import settings_for
from connectors.ssh import SshConnector
from tasks.backup.snapshot.view import APPLICATION, CRASH, FILE_SYSTEM, SnapshotError
from tasks.backup.snapshot.take import take_snapshot

pytestmark = pytest.mark.integration


@pytest.fixture
def ssh(ssh_host_config: HostConfig) -> Iterator[SshConnector]:
    with SshConnector(settings_for(ssh_host_config)) as connector:
        yield connector


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """A file the user scripts append their phase to, so order and count can be checked."""
    return tmp_path / "journal"


def scripts(journal: Path, *, pre: str = "", post: str = "") -> dict[str, str]:
    return {
        "pre_script": f'echo "pre $PATCHDRILL_DISK" >> {journal}; {pre}'.rstrip("; "),
        "post_script": f'echo "post $PATCHDRILL_DISK" >> {journal}; {post}'.rstrip("; "),
    }


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def data_disk(tmp_path: Path) -> DiskConfig:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "table.db").write_bytes(b"rows")
    return DiskConfig(name="data", path=str(folder), kind="directory")


def test_scripts_only_hold_the_application_quiet_until_removal(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path, journal: Path) -> None:
    disk = data_disk(tmp_path)
    policy = SnapshotPolicy(method="auto", **scripts(journal))
    with take_snapshot(ssh, ssh_host_config, disk, policy) as snap:
        assert (snap.method, snap.consistency, snap.read_path) == ("none", APPLICATION, disk.path)
        assert lines(journal) == ["pre data"], "the post-script ran before the read was over"
    assert lines(journal) == ["pre data", "post data"]
    snap.remove()
    assert lines(journal) == ["pre data", "post data"], "a second remove() ran the post-script again"


def test_failed_pre_script_falls_back_with_a_note_and_still_runs_the_post_script(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path, journal: Path) -> None:
    policy = SnapshotPolicy(method="none", **scripts(journal, pre="echo 'cannot lock tables' >&2; exit 3"))
    with take_snapshot(ssh, ssh_host_config, data_disk(tmp_path), policy) as snap:
        assert snap.consistency == CRASH
        assert lines(journal) == ["pre data", "post data"], "the application must not stay half-quiesced"
    assert any("pre-script exited 3" in n and "cannot lock tables" in n for n in snap.notes), snap.notes


def test_script_output_never_leaks_a_secret(ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path) -> None:
    secret = remember(f"db-password-{os.getpid()}")
    policy = SnapshotPolicy(method="none", pre_script=f"echo 'login failed for {secret}' >&2; exit 1", fallback=False)
    with capture_logs() as events, pytest.raises(SnapshotError) as failure:
        take_snapshot(ssh, ssh_host_config, data_disk(tmp_path), policy)
    assert "login failed for ***" in str(failure.value)
    assert secret not in str(failure.value) and secret not in repr(events)


def test_failed_pre_script_without_fallback_fails_after_the_post_script(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path, journal: Path) -> None:
    policy = SnapshotPolicy(method="none", fallback=False, **scripts(journal, pre="exit 5"))
    with pytest.raises(SnapshotError) as failure:
        take_snapshot(ssh, ssh_host_config, data_disk(tmp_path), policy)
    assert failure.value.host == ssh_host_config.name and failure.value.disk == "data"
    assert "pre-script exited 5" in str(failure.value)
    assert lines(journal) == ["pre data", "post data"]


def test_a_pre_script_past_its_timeout_is_stopped_and_recorded(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path, journal: Path) -> None:
    marker = tmp_path / "pre-finished"
    policy = SnapshotPolicy(method="none", script_timeout=1, **scripts(journal, pre=f"sleep 600; touch {marker}"))
    with take_snapshot(ssh, ssh_host_config, data_disk(tmp_path), policy) as snap:
        assert snap.consistency == CRASH
    assert any("pre-script timed out after 1s" in n for n in snap.notes), snap.notes
    assert lines(journal) == ["pre data", "post data"]
    assert not marker.exists(), "the timed-out pre-script kept running"


def test_the_post_script_runs_when_the_snapshot_step_fails(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path, journal: Path) -> None:
    """A folder on the root file system is on no LV: the configured lvm method fails."""
    disk = data_disk(tmp_path)
    with take_snapshot(ssh, ssh_host_config, disk, SnapshotPolicy(method="lvm", **scripts(journal))) as snap:
        assert (snap.method, snap.consistency, snap.read_path) == ("none", CRASH, disk.path)
        assert lines(journal) == ["pre data", "post data"]
    assert any("method 'lvm' does not apply" in n and "not on an LVM logical volume" in n for n in snap.notes), snap.notes

    journal.unlink()
    with pytest.raises(SnapshotError, match="method 'lvm' does not apply"):
        take_snapshot(ssh, ssh_host_config, disk, SnapshotPolicy(method="lvm", fallback=False, **scripts(journal)))
    assert lines(journal) == ["pre data", "post data"]


def test_the_root_file_system_is_never_frozen(ssh: SshConnector, ssh_host_config: HostConfig) -> None:
    root = DiskConfig(name="root", path="/", kind="directory")
    with pytest.raises(SnapshotError, match="refusing to freeze the root filesystem"):
        take_snapshot(ssh, ssh_host_config, root, SnapshotPolicy(method="fsfreeze", fallback=False))


def test_an_offline_host_is_crash_consistent_without_a_call(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    unreachable = ssh_host_config.model_copy(update={"port": 1})
    with SshConnector(settings_for(unreachable)) as connector:
        snap = take_snapshot(connector, unreachable, data_disk(tmp_path),
                             SnapshotPolicy(pre_script="false"), host_online=False)
    assert (snap.method, snap.consistency) == ("none", CRASH)
    assert "is off" in snap.notes[0]


# -- a real file system: fsfreeze and reflink ------------------------------------------------

def is_frozen(mount: Path) -> bool:
    """Freezing a frozen file system fails with EBUSY; otherwise freeze it back out at once."""
    attempt = subprocess.run(["fsfreeze", "--freeze", str(mount)], capture_output=True, text=True)
    if attempt.returncode == 0:
        subprocess.run(["fsfreeze", "--unfreeze", str(mount)], check=True)
        return False
    assert "busy" in attempt.stderr.lower(), attempt.stderr
    return True


def test_fsfreeze_holds_the_file_system_frozen_for_the_read(
        ssh: SshConnector, ssh_host_config: HostConfig, xfs: Path, journal: Path) -> None:
    (xfs / "data").mkdir()
    (xfs / "data" / "table.db").write_bytes(b"committed rows")
    disk = DiskConfig(name="data", path=str(xfs / "data"), kind="directory")
    with take_snapshot(ssh, ssh_host_config, disk, SnapshotPolicy(method="fsfreeze", **scripts(journal))) as snap:
        assert (snap.method, snap.consistency) == ("fsfreeze", APPLICATION)
        assert is_frozen(xfs)
        assert (Path(snap.read_path) / "table.db").read_bytes() == b"committed rows"
        assert lines(journal) == ["pre data", "post data"], "the post-script waits for nothing once frozen"
        snap.verify()
    assert not is_frozen(xfs)
    (xfs / "data" / "after.db").write_bytes(b"writable again")


def test_the_safety_thaw_makes_verify_fail(ssh: SshConnector, ssh_host_config: HostConfig, xfs: Path) -> None:
    disk = DiskConfig(name="data", path=str(xfs), kind="directory")
    with take_snapshot(ssh, ssh_host_config, disk, SnapshotPolicy(method="fsfreeze", freeze_limit=0.01)) as snap:
        deadline = time.monotonic() + 60  # a guard against hanging, not a measured expectation
        while is_frozen(xfs) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(SnapshotError, match="safety timer thawed"):
            snap.verify()
    assert snap.removed and snap.removal_error is None


def test_auto_clones_an_image_file_at_one_instant(
        ssh: SshConnector, ssh_host_config: HostConfig, xfs: Path) -> None:
    image = xfs / "vm.img"
    image.write_bytes(b"A" * 65536)
    disk = DiskConfig(name="vm", path=str(image), kind="block")
    with take_snapshot(ssh, ssh_host_config, disk, SnapshotPolicy()) as snap:
        assert (snap.method, snap.consistency) == ("reflink", FILE_SYSTEM)
        clone = Path(snap.read_path)
        assert clone != image and clone.parent.parent == xfs
        image.write_bytes(b"B" * 65536)
        assert clone.read_bytes() == b"A" * 65536
        assert not is_frozen(xfs)
    assert not clone.exists() and not clone.parent.exists()
    snap.remove()


def test_auto_without_reflink_reads_the_image_live(
        ssh: SshConnector, ssh_host_config: HostConfig, tmp_path: Path) -> None:
    """/tmp here is ext4 (no reflink) on no LV: nothing applies, and the notes say why."""
    image = tmp_path / "vm.img"
    image.write_bytes(b"A" * 4096)
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(image)], capture_output=True, text=True)
    if found.stdout.strip() in ("xfs", "btrfs"):
        pytest.skip(f"{tmp_path} is on {found.stdout.strip()}, which can clone")
    snap = take_snapshot(ssh, ssh_host_config, DiskConfig(name="vm", path=str(image)), SnapshotPolicy(fallback=False))
    assert (snap.method, snap.consistency, snap.read_path) == ("none", CRASH, str(image))
    assert any("cannot clone" in n for n in snap.notes), snap.notes
    assert not list(tmp_path.glob(".patchdrill-snap-*"))
