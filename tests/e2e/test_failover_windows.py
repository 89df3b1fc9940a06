"""Windows DR targets: free space checked in a drill's readiness, through the real WinRM
transport.

Real: pywinrm over HTTPS with NTLM to the WS-Management test host, connectors/winrm.py sending
the shipped tasks/drill/host_scripts/free_space.ps1 with its arguments, the `patchdrill drill
run` command on the Prefect test server, the backup of the primary's disk into a local store and
the readiness step reading the points' sizes from it.

Simulated (there is no Windows here): what free_space.ps1 does on Windows. A handler of the test
host, matched on the script's exact shipped text, answers as a volume with the free bytes the
test gives it; every other script the drill might send is recorded, so the test proves readiness
created nothing on the target.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from configs.loader import load_config
from configs.policies import BackupPolicy
from connectors import connect
from tasks.backup.disk import back_up_disk
from tasks.drill.copy import repository
from tasks.drill.evidence import DrillEvidence
from tasks.drill.members import find_plan, resolve
from tasks.drill.readiness import FREE_SPACE_SCRIPT, Readiness, check_points, check_target
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.hosts.winrm import HostFactory
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler

pytestmark = pytest.mark.e2e
Cli = Callable[..., tuple[int, str, str]]
BLOCK = 64 * 1024
ROOT = "D:\\drills\\web"


@dataclass
class Volume:
    """The simulated D: volume of the Windows DR target."""

    free: int = 0
    asked: list[dict[str, str]] = field(default_factory=list)
    others: list[str] = field(default_factory=list)

    def free_space(self, args: dict[str, str]) -> SimResult:
        self.asked.append(args)
        return SimResult(stdout=json.dumps({"path": "D:\\", "volume": "D:\\", "free": self.free}) + "\r\n")

    def record(self, script: str, args: list[str]) -> SimResult | None:
        self.others.append(script.strip().splitlines()[0] if script.strip() else "")
        return None


@dataclass
class WinLab:
    config: Path
    volume: Volume
    size: int


@pytest.fixture(scope="module")
def win_dr(wsman_host_factory: HostFactory) -> Iterator[tuple[WsmanTestHost, Volume]]:
    host = wsman_host_factory(scheme="https", auth=("ntlm",))
    volume = Volume()
    host.handlers[:0] = [script_handler(FREE_SPACE_SCRIPT, volume.free_space)]
    yield host, volume
    host.stop()


@pytest.fixture(scope="module")
def win_lab(win_dr: tuple[WsmanTestHost, Volume], tmp_path_factory: pytest.TempPathFactory) -> WinLab:
    """A Linux primary (this machine) whose directory disk is backed up, drilled onto the Windows target."""
    host, volume = win_dr
    root = tmp_path_factory.mktemp("win-lab")
    disk = root / "www"
    disk.mkdir()
    (disk / "index.html").write_text("hello\n")
    (disk / "data.bin").write_bytes(bytes(range(256)) * 1024)
    target = host.host_config("win-dr", connect_timeout=60).model_dump(mode="json", exclude_none=True)
    config = root / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab", "transport": "local", "disks": [{"name": "www", "path": str(disk), "kind": "directory"}]},
                  target],
        "backup_policies": {"default": {"block_size": BLOCK, "snapshot_method": "none"}},
        "recovery_plans": {"win": {"rto_target": 600, "rpo_target": 86400, "groups": [{"name": "web", "members": [{
            "host": "lab", "target": {"host": "win-dr", "path": ROOT}, "isolation": "none",
            "app": {"preset": "windows-service", "name": "W3SVC"}}]}]}},
    }))
    loaded = load_config(config)
    lab = loaded.config.hosts[0]
    report = back_up_disk(loaded.config.storage, loaded.base_dir, lab, lab.disks[0],
                          BackupPolicy(block_size=BLOCK, snapshot_method="none"))
    return WinLab(config=config, volume=volume, size=report.scanned_bytes or 0)


def test_a_windows_target_without_room_stops_the_drill_naming_member_target_and_bytes(
        prefect_server: None, win_lab: WinLab, win_dr: tuple[WsmanTestHost, Volume], cli: Cli) -> None:  # noqa: F811
    host, volume = win_dr
    volume.free, volume.asked, volume.others = 4096, [], []
    host.handlers.insert(0, volume.record)
    try:
        code, out, err = cli("drill", "run", "win", "-c", str(win_lab.config), "--yes", "--json")
    finally:
        host.handlers.remove(volume.record)
    assert code == 1, out + err
    evidence = DrillEvidence.model_validate_json(out)
    assert evidence.outcome == "failed"
    [note] = [n for n in evidence.notes if n.startswith("not ready")]
    assert "web/lab#0: target: win-dr:D:\\drills\\web has 0 MiB (4096 bytes) free, the restore needs " in note, note
    assert note.endswith("bytes): not enough room"), note
    needs = int(note.rsplit("(", 1)[1].split()[0])
    assert needs >= win_lab.size > 4096 and evidence.points == []
    assert volume.asked == [{"Path": ROOT}]
    # Readiness sent the free-space script and nothing else: no directory, service or file was made.
    print(volume.others)
    assert volume.others == [FREE_SPACE_SCRIPT.read_text().splitlines()[0]]


def test_a_windows_target_with_room_passes_the_free_space_check(win_lab: WinLab,
                                                                win_dr: tuple[WsmanTestHost, Volume]) -> None:
    _, volume = win_dr
    volume.free = 50 * 2 ** 30
    loaded = load_config(win_lab.config)
    [[member]] = resolve(loaded.config, loaded.base_dir, find_plan(loaded.config, "win"))
    ready = Readiness()
    check_points(member, repository(loaded.config, loaded.base_dir, None), datetime.now(timezone.utc), 86400, ready)
    with connect(member.target, base_dir=loaded.base_dir) as target:
        check_target(member, target, ready)
    assert ready.ok, ready.summary()
    [space] = [c for c in ready.checks if c.check == "target"]
    assert space.detail.startswith(f"win-dr:{ROOT} has 51200 MiB ({50 * 2 ** 30} bytes) free, the restore needs ")
