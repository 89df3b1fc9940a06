"""LVM snapshots: the real linux_snapshot.sh and take_snapshot, with stand-in LVM tools.

This kernel has no device-mapper (`lvcreate` answers "Required device-mapper target(s) not
detected"), so LVM cannot run here. Mocked, and only this: `lvs`, `lvcreate`, `lvremove`,
`mount` and `umount` are small shell stand-ins first on PATH that record their arguments and
answer as LVM would for one logical volume vg0/data. Everything else is real: the script runs
under sh through LocalConnector, `findmnt` and `readlink` look at the real file systems, and
take_snapshot parses, records and removes as it would on a host.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from configs.models import DiskConfig, HostConfig
from configs.policies import SnapshotPolicy
from connectors import settings_for
from connectors.base import CommandResult, Script, script_source
from connectors.local import LocalConnector
from tasks.backup.snapshot.view import APPLICATION, CRASH, FILE_SYSTEM, SnapshotError
from tasks.backup.snapshot.take import take_snapshot

STAND_INS = {
    "lvs": r'''
last=""; for a in "$@"; do last=$a; done
case "$*" in
  *vg_name,lv_name*) [ "$last" = "$ORIGIN_DEV" ] && echo "  vg0/data" && exit 0; exit 5 ;;
  *lv_layout*) echo "  linear" ;;
  *lv_attr*) [ -e "$LVM_STATE/lv-${last#vg0/}" ] || exit 5
             if [ -e "$LVM_STATE/overflowed" ]; then echo "  swi-I-s---"; else echo "  swi-a-s---"; fi ;;
  *snap_percent*) echo "  100.00" ;;
  *) [ -e "$LVM_STATE/lv-${last#vg0/}" ] ;;
esac''',
    "lvcreate": r'''
[ -e "$LVM_STATE/refuse" ] && { echo "  Insufficient free space: 256 extents needed" >&2; exit 5; }
name=""; while [ $# -gt 0 ]; do [ "$1" = -n ] && name=$2; shift; done
touch "$LVM_STATE/lv-$name"''',
    "lvremove": r'''for a in "$@"; do last=$a; done; rm -f "$LVM_STATE/lv-${last#vg0/}"''',
    "mount": "exit 0",
    "umount": "exit 0",
}


class StandInLvmHost(LocalConnector):
    """LocalConnector that runs scripts with the stand-in tools first on PATH."""

    def __init__(self, host: HostConfig, env: dict[str, str]) -> None:
        super().__init__(settings_for(host))
        self.env = env

    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        return self.run(f"sh -s -- {shlex.join(args or [])}", timeout=timeout, check=check, env=self.env,
                        stdin=script_source(script)[1].encode())


@pytest.fixture
def lvm_state(tmp_path: Path) -> Path:
    state = tmp_path / "lvm-state"
    state.mkdir()
    return state


@pytest.fixture
def calls(tmp_path: Path) -> Path:
    return tmp_path / "calls"


def make_host(tmp_path: Path, lvm_state: Path, calls: Path, origin_device: str) -> tuple[StandInLvmHost, HostConfig]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STAND_INS.items():
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "$LVM_CALLS"\n{body}\n')
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LVM_STATE": str(lvm_state), "LVM_CALLS": str(calls),
           "ORIGIN_DEV": origin_device, "PATCHDRILL_STATE_DIR": str(tmp_path / "run")}
    config = HostConfig(name="db1", transport="local")
    return StandInLvmHost(config, env), config


def source_of(path: Path) -> tuple[str, str]:
    found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,TARGET", "--target", str(path)],
                           capture_output=True, text=True, check=True).stdout.split()
    return found[0].split("[")[0], found[1]


def recorded(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_folder_on_an_lv_is_read_from_the_snapshot_mounted_read_only(
        tmp_path: Path, lvm_state: Path, calls: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    device, mount = source_of(data)
    connector, host = make_host(tmp_path, lvm_state, calls, device)
    disk = DiskConfig(name="data", path=str(data), kind="directory")
    with take_snapshot(connector, host, disk, SnapshotPolicy(lvm_snapshot_size="2G")) as snap:
        sid = snap.snapshot_id
        mount_dir = tmp_path / "run" / f"snap-{sid}"
        assert (snap.method, snap.consistency) == ("lvm", FILE_SYSTEM)
        assert snap.read_path == str(mount_dir / data.relative_to(mount))
        assert snap.details == {"snapshot_lv": f"vg0/patchdrill-{sid}", "mount_dir": str(mount_dir)}
        creating = [c for c in recorded(calls) if c.split()[0] in ("lvcreate", "mount")]
        assert creating[0] == f"lvcreate -q -s -n patchdrill-{sid} -L 2G vg0/data"
        assert creating[1].startswith("mount -o ro") and creating[1].endswith(f"/dev/vg0/patchdrill-{sid} {mount_dir}")
        snap.verify()
    assert f"lvremove -q -f vg0/patchdrill-{sid}" in recorded(calls)
    assert not (lvm_state / f"lv-patchdrill-{sid}").exists() and not mount_dir.exists()
    before = len(recorded(calls))
    snap.remove()
    assert len(recorded(calls)) == before


def test_a_block_device_on_an_lv_is_read_from_the_snapshot_device(
        tmp_path: Path, lvm_state: Path, calls: Path) -> None:
    device = next((str(p) for p in sorted(Path("/dev").glob("loop[0-9]*")) if p.is_block_device()), None)
    if device is None:
        pytest.skip("no /dev/loopN block device node to stand for an LV")
    connector, host = make_host(tmp_path, lvm_state, calls, device)
    with take_snapshot(connector, host, DiskConfig(name="os", path=device, kind="block"), SnapshotPolicy()) as snap:
        assert (snap.method, snap.read_path) == ("lvm", f"/dev/vg0/patchdrill-{snap.snapshot_id}")
        assert f"lvcreate -q -s -n patchdrill-{snap.snapshot_id} -l 10%ORIGIN vg0/data" in recorded(calls)
        assert not any(c.startswith("mount") for c in recorded(calls))


def test_an_overflowed_snapshot_fails_verify(tmp_path: Path, lvm_state: Path, calls: Path) -> None:
    connector, host = make_host(tmp_path, lvm_state, calls, source_of(tmp_path)[0])
    with take_snapshot(connector, host, DiskConfig(name="data", path=str(tmp_path)), SnapshotPolicy()) as snap:
        (lvm_state / "overflowed").touch()
        with pytest.raises(SnapshotError, match=r"overflowed \(100.00% used\) and is invalid"):
            snap.verify()


def test_a_failed_lvcreate_still_runs_the_post_script(tmp_path: Path, lvm_state: Path, calls: Path) -> None:
    connector, host = make_host(tmp_path, lvm_state, calls, source_of(tmp_path)[0])
    (lvm_state / "refuse").touch()
    journal = tmp_path / "journal"
    policy = SnapshotPolicy(method="lvm", pre_script=f"echo pre >> {journal}", post_script=f"echo post >> {journal}")
    disk = DiskConfig(name="data", path=str(tmp_path))
    with take_snapshot(connector, host, disk, policy) as snap:
        assert (snap.method, snap.consistency) == ("none", CRASH)
        assert journal.read_text().split() == ["pre", "post"]
    assert any("Insufficient free space" in n for n in snap.notes), snap.notes

    journal.unlink()
    with pytest.raises(SnapshotError, match="Insufficient free space"):
        take_snapshot(connector, host, disk, policy.model_copy(update={"fallback": False}))
    assert journal.read_text().split() == ["pre", "post"]


def test_pre_script_and_lvm_make_an_application_consistent_point(tmp_path: Path, lvm_state: Path, calls: Path) -> None:
    connector, host = make_host(tmp_path, lvm_state, calls, source_of(tmp_path)[0])
    journal = tmp_path / "journal"
    policy = SnapshotPolicy(pre_script=f"echo pre >> {journal}", post_script=f"echo post >> {journal}")
    with take_snapshot(connector, host, DiskConfig(name="data", path=str(tmp_path)), policy) as snap:
        assert (snap.method, snap.consistency) == ("lvm", APPLICATION)
        # With a snapshot taken, the application is released before the read, not after.
        assert journal.read_text().split() == ["pre", "post"]
