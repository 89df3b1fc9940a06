"""Windows members: free space on a Windows DR target checked in a drill's readiness, and a
Windows member's failover and failback, through the real WinRM transport.

Real: pywinrm over HTTPS with NTLM to the WS-Management test host, connectors/winrm.py sending
the shipped tasks/drill/host_scripts/free_space.ps1 with its arguments, the `patchdrill drill
run` command on the Prefect test server, the backup of the primary's disk into a local store and
the readiness step reading the points' sizes from it.

Simulated (there is no Windows here): what free_space.ps1 does on Windows. A handler of the test
host, matched on the script's exact shipped text, answers as a volume with the free bytes the
test gives it; every other script the drill might send is recorded, so the test proves readiness
created nothing on the target.

Failover and failback of a Windows member: real as above, and also Azurite as the store (Windows
hosts upload their changed blocks straight to it with SAS URLs), the failover and failback
commands and flows, and the restore onto a Windows host (tasks/backup/remote_restore.py: the
controller compares block hashes and sends only the blocks that differ, through the connector's
put). Simulated, each answered by a handler matched on the exact text patchdrill sends: VSS and
the block scanner (SimulatedWindowsDisk, as the Windows backup tests use it: a shadow copy is a
point-in-time copy of the image file), win_restore.ps1 (WindowsRestoreSim, doing in Python what
the script does in PowerShell), and the Service Control Manager and Hyper-V (ServiceManager:
Start-Service/Stop-Service/Get-Service and Start-VM/Stop-VM/Get-VM change and report a running
flag; nothing runs). The "C:" of each simulated host is a local directory.
"""

from __future__ import annotations

import json
import random
import re
import struct
from datetime import datetime, timezone
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from configs.loader import load_config
from configs.policies import BackupPolicy
from connectors import connect
from tasks.backup.disk import back_up_disk
from tasks.backup.remote_restore import WINDOWS_SCRIPT
from tasks.backup.snapshot.host import VSS_REMOVE_SCRIPT, VSS_SCRIPT
from tasks.backup.sources import windows_direct_upload as staged
from tasks.drill.copy import repository
from tasks.drill.evidence import DrillEvidence
from tasks.drill.members import find_plan, resolve
from tasks.drill.readiness import FREE_SPACE_SCRIPT, Readiness, check_points, check_target
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.hosts.azurite import AzuriteServer
from tests.hosts.winrm import HostFactory
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler
from tests.integration.test_backup_windows import SimulatedWindowsDisk

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


# --------------------------------------------------------------------------- failover of a Windows member

IMAGE_BLOCKS = 24
_NAME = r"'((?:[^']|'')*)'"


@dataclass
class ServiceManager:
    """Windows services and Hyper-V VMs of one simulated host: a running flag per name."""

    running: dict[str, bool] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def handle(self, script: str, args: list[str]) -> SimResult | None:
        text = script.strip()
        change = re.fullmatch(rf"(Start|Stop)-(Service|VM) -Name {_NAME}(?: -TurnOff)?(?: -Force)?", text)
        if change:
            name = change.group(3).replace("''", "'")
            self.calls.append(f"{change.group(1)}-{change.group(2)} {name}")
            self.running[name] = change.group(1) == "Start"
            return SimResult()
        check = re.fullmatch(rf"if \(\(Get-(Service|VM) -Name {_NAME}\)\.(?:Status|State) -eq '(?:Stopped|Off)'\) "
                             r"\{ exit 0 \} else \{ exit 1 \}", text)
        if check:
            name = check.group(2).replace("''", "'")
            self.calls.append(f"Get-{check.group(1)} {name}")
            return SimResult(exit_code=1 if self.running.get(name) else 0)
        return None


class WindowsRestoreSim:
    """win_restore.ps1 in Python: Probe, Apply (patch records into the image), Discard."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, int]] = []  # (target, bytes) per Apply

    def respond(self, args: dict[str, str]) -> SimResult:
        path = Path(args["Path"])
        work = Path(f"{path}.patchdrill-restore")
        if args["Mode"] == "Discard":
            work.unlink(missing_ok=True)
            return SimResult()
        if args["Mode"] == "Probe":
            path.parent.mkdir(parents=True, exist_ok=True)
            work.unlink(missing_ok=True)
            found = {"exists": path.exists(), "kind": ("dir" if path.is_dir() else "file") if path.exists() else None,
                     "size": path.stat().st_size if path.is_file() else None}
            return SimResult(stdout=json.dumps(found) + "\r\n")
        fresh = args.get("Fresh") == "true"
        into = work if fresh else path
        patch = Path(args["Patch"]).read_bytes()
        block_size, written, offset = int(args["BlockSize"]), 0, 0
        with open(into, "r+b" if into.exists() else "w+b") as image:
            while offset + 12 <= len(patch):
                index, length = struct.unpack(">QI", patch[offset:offset + 12])
                image.seek(index * block_size)
                image.write(patch[offset + 12:offset + 12 + length])
                written += length
                offset += 12 + length
            image.truncate(int(args["Size"]))
        Path(args["Patch"]).unlink()
        if fresh and args.get("Finish") == "true":
            work.replace(path)
        self.applied.append((str(path), written))
        return SimResult(stdout=json.dumps({"blocks": 0, "bytes": written}) + "\r\n")


@dataclass
class WinHost:
    server: WsmanTestHost
    disk: SimulatedWindowsDisk
    services: ServiceManager
    restores: WindowsRestoreSim

    def reset(self) -> None:
        self.services.running.clear()
        self.services.calls.clear()
        self.restores.applied.clear()
        self.disk.uploaded.clear()


@pytest.fixture(scope="module")
def win_pair(wsman_host_factory: HostFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WinHost]]:
    """Two simulated Windows hosts for the module: a primary and its DR target."""
    hosts = {}
    for role in ("primary", "dr"):
        server = wsman_host_factory(scheme="https", auth=("ntlm",))
        disk = SimulatedWindowsDisk(shadow_root=tmp_path_factory.mktemp(f"shadows-{role}"))
        services, restores = ServiceManager(), WindowsRestoreSim()
        server.handlers[:0] = [script_handler(VSS_SCRIPT, disk.snapshot), script_handler(VSS_REMOVE_SCRIPT, disk.remove),
                               script_handler(staged.HOST_SCRIPT, disk.blockscan),
                               script_handler(WINDOWS_SCRIPT, restores.respond), services.handle]
        hosts[role] = WinHost(server, disk, services, restores)
    yield hosts
    for host in hosts.values():
        host.server.stop()


def _windows_plan(tmp_path: Path, pair: dict[str, WinHost], azurite: AzuriteServer, container: str,
                  app: dict[str, object], point: str) -> tuple[Path, Path, Path]:
    """A primary VM image (vm.vhdx on the primary's simulated C:) and a plan failing it over to
    the DR host under a path whose parent does not exist yet."""
    image = tmp_path / "c" / "vms" / "vm.vhdx"
    image.parent.mkdir(parents=True)
    image.write_bytes(random.Random(7).randbytes(IMAGE_BLOCKS * BLOCK + 321))
    copy_root = tmp_path / "d" / "dr" / "vms"
    hosts = [pair["primary"].server.host_config("win-primary", connect_timeout=60,
                                                 disks=[{"name": "vm", "path": str(image), "kind": "block"}]),
             pair["dr"].server.host_config("win-dr", connect_timeout=60)]
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"kind": "azure", "container": container, "connection_string": "env:PATCHDRILL_TEST_AZURE"},
        "hosts": [h.model_dump(mode="json", exclude_none=True) for h in hosts],
        "backup_policies": {"default": {"block_size": BLOCK, "workers": 2}},
        "recovery_plans": {"win": {"rto_target": 900, "rpo_target": 86400, "groups": [{"name": "vms", "members": [{
            "host": "win-primary", "point": point, "isolation": "none",
            "target": {"host": "win-dr", "path": str(copy_root)}, "app": app}]}]}},
    }))
    return config, image, copy_root / "vm"


def _rewrite(path: Path, blocks: list[int]) -> None:
    with open(path, "r+b") as handle:
        for index in blocks:
            handle.seek(index * BLOCK + 10)
            handle.write(b"written on the DR side")


def _summary(out: str) -> dict[str, object]:
    found, _ = json.JSONDecoder().raw_decode(out)
    return found


def test_windows_service_member_fails_over_planned_and_back_with_vss_points(
        prefect_server: None, win_pair: dict[str, WinHost], azure_store: object, azurite: AzuriteServer,
        azure_container_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli) -> None:  # noqa: F811
    monkeypatch.setenv("PATCHDRILL_TEST_AZURE", azurite.connection_string)
    primary, dr = win_pair["primary"], win_pair["dr"]
    for host in (primary, dr):
        host.reset()
    app = {"preset": "windows-service", "name": "AppSvc-DR", "primary": {"name": "AppSvc"}}
    config, image, copy = _windows_plan(tmp_path, win_pair, azurite, azure_container_name, app, "latest")
    primary.services.running["AppSvc"] = True

    code, out, err = cli("failover", "win", "--planned", "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    over = _summary(out)
    assert primary.services.calls[:2] == ["Stop-Service AppSvc", "Get-Service AppSvc"]
    assert dr.services.running == {"AppSvc-DR": True} and not primary.services.running["AppSvc"]
    assert copy.read_bytes() == image.read_bytes()
    [used] = _evidence_azure(azurite, azure_container_name, str(over["run_id"]))["points"]
    assert (used["consistency"], used["host"]) == ("application-consistent", "win-primary")
    assert over["bytes_moved"] == IMAGE_BLOCKS * BLOCK + 321  # a fresh target: every block once
    assert dr.restores.applied == [(str(copy), IMAGE_BLOCKS * BLOCK + 321)]  # through win_restore.ps1
    assert cli("failover", "commit", str(over["run_id"]), "-c", str(config))[0] == 0

    changed = [3, 17]
    _rewrite(copy, changed)
    code, out, err = cli("failback", "win", "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    back = _summary(out)
    assert back["bytes_moved"] == len(changed) * BLOCK  # only the blocks changed on the DR side
    assert primary.restores.applied == [(str(image), len(changed) * BLOCK)]
    assert image.read_bytes() == copy.read_bytes()
    assert primary.services.running == {"AppSvc": True} and dr.services.running == {"AppSvc-DR": False}
    assert "Get-Service AppSvc-DR" in dr.services.calls
    steps = [s["name"] for s in _evidence_azure(azurite, azure_container_name, str(back["run_id"]))["steps"]]
    assert steps == ["re-protect", "stop-copy", "final-backup", "restore", "start", "probe"]
    assert primary.disk.shadows == {} and dr.disk.shadows == {}


def test_hyperv_member_fails_over_unplanned_from_its_latest_vss_point_and_back(
        prefect_server: None, win_pair: dict[str, WinHost], azure_store: object, azurite: AzuriteServer,
        azure_container_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli) -> None:  # noqa: F811
    """Two backups: one application-consistent (VSS writers stable), then a newer one whose
    Hyper-V writer failed (file-system-consistent). The member asks for the latest
    application-consistent point: the failover restores the older one."""
    monkeypatch.setenv("PATCHDRILL_TEST_AZURE", azurite.connection_string)
    primary, dr = win_pair["primary"], win_pair["dr"]
    for host in (primary, dr):
        host.reset()
    app = {"preset": "hyperv", "name": "web-vm-dr", "primary": {"name": "web-vm"}}
    config, image, copy = _windows_plan(tmp_path, win_pair, azurite, azure_container_name, app,
                                        "latest-application-consistent")
    consistent = image.read_bytes()
    assert cli("backup", "-c", str(config), "--json")[0] == 0
    _rewrite(image, [5])
    primary.disk.failing_writer = "Microsoft Hyper-V VSS Writer"
    try:
        code, out, err = cli("backup", "-c", str(config), "--json")
    finally:
        primary.disk.failing_writer = None
    assert code == 0 and json.loads(out)[0]["consistency"] == "file-system-consistent", out + err

    code, out, err = cli("failover", "win", "--unplanned", "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    over = _summary(out)
    [used] = _evidence_azure(azurite, azure_container_name, str(over["run_id"]))["points"]
    assert used["consistency"] == "application-consistent"
    assert copy.read_bytes() == consistent  # the VSS point, not the newer file-system-consistent one
    assert dr.services.running == {"web-vm-dr": True} and primary.services.calls == []  # the primary untouched
    assert cli("failover", "commit", str(over["run_id"]), "-c", str(config))[0] == 0

    code, out, err = cli("failback", "win", "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    assert image.read_bytes() == consistent
    assert dr.services.calls == ["Start-VM web-vm-dr", "Stop-VM web-vm-dr", "Get-VM web-vm-dr"]
    assert primary.services.running == {"web-vm": True} and dr.services.running == {"web-vm-dr": False}
    assert _summary(out)["bytes_moved"] == BLOCK  # block 5, rewritten on the primary after the VSS point
    assert primary.restores.applied == [(str(image), BLOCK)]


def _evidence_azure(azurite: AzuriteServer, container: str, run_id: str) -> dict[str, Any]:
    client = azurite.container(container)
    [name] = [b.name for b in client.list_blobs(name_starts_with="evidence/drills/win/") if run_id in b.name]
    return json.loads(client.download_blob(name).readall())
