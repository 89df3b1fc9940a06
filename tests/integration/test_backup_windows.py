"""Backups of a Windows host's disk image, end to end through tasks/backup/disk.py: a VSS
snapshot, the host scanning it and uploading changed blocks straight to Azure Blob with SAS
URLs, the controller turning them into chunks, the point, and the cleanup.

Real: pywinrm over HTTPS with NTLM to the WS-Management test host, connectors/winrm.py sending
the shipped win_blockscan.ps1, vss_snapshot.ps1 and vss_remove.ps1 with their arguments,
Azurite with SAS URLs signed by the store and PUT over real HTTP, the repository, restore.

Simulated (there is no Windows here): what those scripts do on Windows. `SimulatedWindowsDisk`
answers them, matched on their exact shipped text: the shadow copy is a point-in-time copy of
the image file, and the scanner does in Python what win_blockscan.ps1 does in PowerShell.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import uuid
from datetime import datetime, timedelta
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from configs.models import AzureStorage, DiskConfig, HostConfig, LocalStorage, PatchdrillConfig
from configs.policies import BackupPolicy
from connectors.stores import AzureBlobStore
from cli.app import app
from tasks.backup.sources import windows_direct_upload as staged
from tasks.backup.errors import SourceError
from tasks.backup.repo.retention import prune
from tasks.backup.repo.repository import chunk_key
from tasks.backup.restore import restore
from tasks.backup.disk import back_up_disk, open_repository
from tasks.backup.snapshot.host import VSS_REMOVE_SCRIPT, VSS_SCRIPT
from tasks.backup.repo.verify import verify
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process `patchdrill` fixture
from tests.e2e.test_backup_flows import _artifact
from tests.hosts.azurite import AzuriteServer
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024
BLOCKS = 24
POLICY = BackupPolicy(block_size=BLOCK, workers=2)


@dataclass
class SimulatedWindowsDisk:
    """VSS and win_blockscan.ps1 on one simulated Windows host whose "C:" is a local directory."""

    shadow_root: Path
    failing_writer: str | None = None
    shadows: dict[str, Path] = field(default_factory=dict)  # shadow id -> the copy VSS would expose
    scans: list[str] = field(default_factory=list)
    uploaded: list[list[int]] = field(default_factory=list)  # block indexes, one list per upload call
    #: write into the image between the scan and the upload, as a live (unsnapshotted) disk would change
    change_before_upload: bool = False
    #: what a hostile host does with each upload URL after its PUT (lease, snapshot, …)
    after_put: Callable[[str], None] | None = None
    #: called as each Upload call arrives, with the URLs it carries
    on_upload: Callable[[list[str]], None] | None = None

    # vss_snapshot.ps1 / vss_remove.ps1 -------------------------------------------------------
    def snapshot(self, args: dict[str, str]) -> SimResult:
        """A shadow copy is a point-in-time view: a copy of the image taken now."""
        shadow_id = "{" + str(uuid.uuid4()).upper() + "}"
        source = Path(args["Path"])
        copy = self.shadow_root / args["SnapshotId"] / source.name
        copy.parent.mkdir(parents=True)
        shutil.copyfile(source, copy)
        self.shadows[shadow_id] = copy
        writers = [{"name": "System Writer", "state": 1, "state_text": "Stable"},
                   {"name": "Microsoft Hyper-V VSS Writer", "state": 9 if self.failing_writer else 1,
                    "state_text": "Failed at freeze" if self.failing_writer else "Stable"}]
        consistency, reason = "application-consistent", None
        if self.failing_writer:
            if args.get("AllowFallback") != "true":
                return SimResult(errors=["VSS writers failed during the shadow copy"], exit_code=1)
            consistency = "file-system-consistent"
            reason = f"VSS writers failed: {self.failing_writer} [9] Failed at freeze; the shadow copy is kept as file-system-consistent"
        report = {"id": shadow_id, "device": "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy3",
                  "link": str(copy.parent), "volume": "C:\\", "read_path": str(copy), "consistency": consistency,
                  "context": "ClientAccessibleWriters", "writers": writers, "writers_failed_before": [],
                  "fallback_reason": reason}
        return SimResult(stdout=json.dumps(report) + "\r\n")

    def remove(self, args: dict[str, str]) -> SimResult:
        shadow_id = args["ShadowId"]
        if args.get("CheckOnly") == "true":
            state = "present" if shadow_id in self.shadows else "missing"
            return SimResult(stdout=json.dumps({"id": shadow_id, "shadow": state, "link": "none"}) + "\r\n")
        copy = self.shadows.pop(shadow_id, None)
        if copy is not None:
            shutil.rmtree(copy.parent)
        state = "removed" if copy else "already-gone"
        return SimResult(stdout=json.dumps({"id": shadow_id, "shadow": state, "link": "removed"}) + "\r\n")

    # win_blockscan.ps1 -----------------------------------------------------------------------
    def blockscan(self, args: dict[str, str]) -> SimResult:
        """Simulates win_blockscan.ps1 (PowerShell cannot run here): SHA-256 of every block in
        Scan mode; in Upload mode each listed block is read and PUT raw to its SAS URL with
        `x-ms-blob-type: BlockBlob` over real HTTP, several at once, and the same JSON report
        is printed."""
        path, block_size = Path(args["Path"]), int(args["BlockSize"])
        if args["Mode"] == "Scan":
            self.scans.append(str(path))
            if path.is_dir():
                return SimResult(stdout=json.dumps({"kind": "directory", "path": str(path)}))
            data = path.read_bytes()
            digests = "".join(hashlib.sha256(data[i:i + block_size]).hexdigest()
                              for i in range(0, len(data), block_size))
            return SimResult(stdout=json.dumps({"kind": "block", "hash": "sha256", "size": len(data),
                                                "block_size": block_size, "fingerprints": digests}) + "\r\n")
        if self.change_before_upload:
            with path.open("r+b") as handle:
                handle.write(b"changed after the scan")
        work = []
        for line in args["Uploads"].splitlines():
            index, url = line.split(" ", 1)
            work.append((int(index), url))
        if self.on_upload:
            self.on_upload([url for _, url in work])

        def put(item: tuple[int, str]) -> dict[str, object]:
            index, url = item
            with path.open("rb") as handle:
                handle.seek(index * block_size)
                block = handle.read(block_size)
            answer = httpx.put(url, content=block, headers={"x-ms-blob-type": "BlockBlob"})
            answer.raise_for_status()
            if self.after_put:
                self.after_put(url)
            return {"index": index, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()}

        with ThreadPoolExecutor(max_workers=int(args.get("Threads", "4"))) as pool:
            blocks = list(pool.map(put, work))
        self.uploaded.append([i for i, _ in work])
        return SimResult(stdout=json.dumps({"blocks": blocks, "bytes_sent": sum(b["bytes"] for b in blocks)}) + "\r\n")


@pytest.fixture
def simulated(fresh_winrm_server: WsmanTestHost, tmp_path: Path) -> SimulatedWindowsDisk:
    disk = SimulatedWindowsDisk(shadow_root=tmp_path / "shadows")
    handlers = [script_handler(VSS_SCRIPT, disk.snapshot), script_handler(VSS_REMOVE_SCRIPT, disk.remove),
                script_handler(staged.HOST_SCRIPT, disk.blockscan)]
    fresh_winrm_server.handlers[:0] = handlers
    return disk


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "c" / "vm.vhdx"
    path.parent.mkdir()
    path.write_bytes(random.Random(21).randbytes(BLOCKS * BLOCK + 777))
    return path


@pytest.fixture
def config(azure_store: AzureBlobStore, azurite: AzuriteServer, azure_container_name: str,
           fresh_winrm_server: WsmanTestHost, image: Path, monkeypatch: pytest.MonkeyPatch) -> PatchdrillConfig:
    monkeypatch.setenv("PATCHDRILL_TEST_AZURE", azurite.connection_string)
    host = fresh_winrm_server.host_config("win-1", disks=[DiskConfig(name="vm", path=str(image), kind="block"),
                                                      DiskConfig(name="docs", path=str(image.parent), kind="directory")])
    storage = AzureStorage(container=azure_container_name, connection_string="env:PATCHDRILL_TEST_AZURE")
    return PatchdrillConfig(storage=storage, hosts=[host])


def _disk(config: PatchdrillConfig, name: str) -> tuple[HostConfig, DiskConfig]:
    host = config.hosts[0]
    return host, next(d for d in host.disks if d.name == name)


def _rewrite(path: Path, indexes: list[int]) -> None:
    rng = random.Random(22)
    with path.open("r+b") as handle:
        for index in indexes:
            handle.seek(index * BLOCK + 100)
            handle.write(rng.randbytes(50))


def test_full_then_incremental_straight_to_azure(config: PatchdrillConfig, simulated: SimulatedWindowsDisk,
                                                 azure_store: AzureBlobStore, image: Path, tmp_path: Path) -> None:
    host, disk = _disk(config, "vm")
    full = back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    assert full.status == "ok" and full.consistency == "application-consistent" and full.snapshot_method == "vss"
    assert simulated.uploaded == [list(range(BLOCKS + 1))]
    assert simulated.scans[0].startswith(str(simulated.shadow_root)), "the scan read the live disk, not the shadow copy"

    changed = [0, 7, 8, 24]
    _rewrite(image, changed)
    second = back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    # Exactly the changed blocks went from the host to staging, and became new chunks.
    assert simulated.uploaded[1] == changed
    repo = open_repository(config.storage, tmp_path, POLICY)
    point = repo.find_point("win-1", "vm", None)
    assert point.key == second.point and point.parent == full.point
    assert (point.totals.changed_blocks, point.totals.uploaded_chunks) == (len(changed), len(changed))
    assert point.consistency == "application-consistent" and point.snapshot_method == "vss"
    assert point.source_path.startswith(str(simulated.shadow_root))

    assert list(azure_store.list("staging/")) == []
    assert list(azure_store.list("locks/")) == []
    assert simulated.shadows == {}, "a shadow copy outlived its backup"
    restore(repo, point, tmp_path / "restored.vhdx")
    assert (tmp_path / "restored.vhdx").read_bytes() == image.read_bytes()


def test_damaged_and_missing_chunks_are_uploaded_again_and_rehash_reads_everything(
        config: PatchdrillConfig, simulated: SimulatedWindowsDisk, image: Path, tmp_path: Path) -> None:
    """The host reports every block unchanged; blocks whose chunk verify found corrupt, or whose
    chunk is gone from the store, must still come up from the host and be written again."""
    host, disk = _disk(config, "vm")
    back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    repo = open_repository(config.storage, tmp_path, POLICY)
    data = image.read_bytes()
    corrupt, missing = (repo.codec.chunk_id(data[i * BLOCK:(i + 1) * BLOCK]) for i in (3, 5))
    blob = repo.store.get(chunk_key(corrupt))
    repo.store.put(chunk_key(corrupt), blob[:-1] + bytes([blob[-1] ^ 1]), overwrite=True)
    assert list(verify(repo).corrupt) == [corrupt.hex()]  # recorded for the next backup
    repo.store.delete(chunk_key(missing))
    assert list(verify(repo).missing) == [missing.hex()]  # deleted behind the index's back: verify finds it

    again = back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    assert simulated.uploaded[1] == [3, 5]
    assert again.repaired_chunks == 2 and again.scanned_bytes == 2 * BLOCK
    assert verify(repo).ok and repo.damaged_chunks() == {}
    restore(repo, repo.find_point("win-1", "vm", None), tmp_path / "restored.vhdx")
    assert (tmp_path / "restored.vhdx").read_bytes() == data

    every = back_up_disk(config.storage, tmp_path, host, disk, POLICY.model_copy(update={"rehash": True}))
    assert simulated.uploaded[2] == list(range(BLOCKS + 1))
    assert every.scanned_bytes == len(data) and every.uploaded_bytes == 0  # read and checked, nothing new


def test_a_failed_writer_is_recorded_as_file_system_consistent(config: PatchdrillConfig, simulated: SimulatedWindowsDisk,
                                                               tmp_path: Path) -> None:
    simulated.failing_writer = "Microsoft Hyper-V VSS Writer"
    host, disk = _disk(config, "vm")
    report = back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    point = open_repository(config.storage, tmp_path, POLICY).find_point("win-1", "vm", None)
    assert report.consistency == point.consistency == "file-system-consistent"
    assert any("Hyper-V VSS Writer" in note for note in point.notes), point.notes


def test_a_block_changed_after_the_scan_leaves_no_point_and_no_staging(
        config: PatchdrillConfig, simulated: SimulatedWindowsDisk, azure_store: AzureBlobStore, tmp_path: Path) -> None:
    """Reading the live disk instead of a snapshot would do this; the host's report gives it away."""
    simulated.change_before_upload = True
    host, disk = _disk(config, "vm")
    with pytest.raises(SourceError, match="block 0 .* changed between the scan and the upload"):
        back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    assert list(azure_store.list("points/")) == []
    assert list(azure_store.list("staging/")) == []
    assert simulated.shadows == {}


def test_directory_disks_and_local_stores_are_refused_before_any_snapshot(
        config: PatchdrillConfig, simulated: SimulatedWindowsDisk, tmp_path: Path) -> None:
    host, disk = _disk(config, "docs")
    with pytest.raises(SourceError, match="directory disks of Windows hosts are not supported"):
        back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    local = config.model_copy(update={"storage": LocalStorage(path=str(tmp_path / "repo"))})
    host, disk = _disk(local, "vm")
    with pytest.raises(SourceError, match="Windows backups need an Azure Blob repository"):
        back_up_disk(local.storage, tmp_path, host, disk, POLICY)
    assert simulated.scans == [] and simulated.shadows == {} and not (tmp_path / "shadows").exists()


def test_the_controller_passes_only_parameters_the_script_declares() -> None:
    """The simulation cannot catch a parameter renamed in the .ps1 alone; this can."""
    text = staged.HOST_SCRIPT.read_text(encoding="utf-8")
    declared = set(re.findall(r"\]\$(\w+)", text[text.index("param("):text.index("$ErrorActionPreference")]))
    assert {"Mode", "Path", "BlockSize", "Uploads", "Threads"} <= declared
    assert "'Scan', 'Upload'" in text and "x-ms-blob-type" in text


# A host that turns its upload URLs against the cleanup ------------------------------------------

def _lease_forever(url: str) -> None:
    answer = httpx.put(url + "&comp=lease", headers={"x-ms-lease-action": "acquire", "x-ms-lease-duration": "-1"})
    assert answer.status_code == 201, answer.text


def _lease_and_snapshot(url: str) -> None:
    assert httpx.put(url + "&comp=snapshot").status_code == 201
    _lease_forever(url)


def _staging_as_stored(store: AzureBlobStore) -> list[str]:
    blobs = store.container.list_blobs(name_starts_with="staging/", include=["snapshots", "uncommittedblobs"])
    return [blob.name for blob in blobs]


def test_a_host_leasing_and_snapshotting_its_staging_blobs_gets_them_deleted(
        config: PatchdrillConfig, simulated: SimulatedWindowsDisk, azure_store: AzureBlobStore, tmp_path: Path) -> None:
    simulated.after_put = _lease_and_snapshot
    host, disk = _disk(config, "vm")
    report = back_up_disk(config.storage, tmp_path, host, disk, POLICY)
    assert report.status == "ok" and report.point
    assert _staging_as_stored(azure_store) == []


def test_staging_the_backup_cannot_delete_is_a_warning_and_prune_still_succeeds(
        prefect_server: None, config: PatchdrillConfig, simulated: SimulatedWindowsDisk,
        azure_store: AzureBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        cli: Callable[..., tuple[int, str, str]]) -> None:
    """A host that takes its lease again the instant it is broken. That race cannot be staged on
    cue against Azurite, so the host's re-acquire (a real lease through its own URL) is hooked in
    right after each break. The backup runs as `patchdrill backup --json`, its flow on the
    Prefect test server: the leftover is in the disk's JSON row and the run's table artifact."""
    simulated.after_put = _lease_forever
    urls: dict[str, str] = {}
    simulated.on_upload = lambda batch: urls.update({urlsplit(u).path.split("/", 3)[3]: u for u in batch})
    original = AzureBlobStore._break_lease

    def host_leases_again(store: AzureBlobStore, name: str, key: str) -> None:
        original(store, name, key)
        _lease_forever(urls[name])

    monkeypatch.setattr(AzureBlobStore, "_break_lease", host_leases_again)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(json.dumps({
        "storage": config.storage.model_dump(mode="json", exclude_none=True),
        "hosts": [config.hosts[0].model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                  | {"disks": [{"name": "vm", "path": str(_disk(config, "vm")[1].path), "kind": "block"}]}],
        "backup_policies": {"default": POLICY.model_dump(mode="json", exclude_defaults=True)},
    }))
    code, out, err = cli("backup", "-c", str(fleet), "--host", "win-1", "--json")
    assert code == 0, err
    [report] = json.loads(out)
    assert (report["status"], report["error"], report["staging_left"]) == ("ok", None, BLOCKS + 1)
    assert f"{BLOCKS + 1} staged upload blobs under staging/win-1/vm/" in report["warning"]
    assert "the next prune removes them" in report["warning"]
    repo = open_repository(config.storage, tmp_path, POLICY)
    assert repo.find_point("win-1", "vm", None).key == report["point"]
    assert "backup.staging_left" in err
    assert len(list(azure_store.list("staging/"))) == BLOCKS + 1
    rows = [row for data in _artifact("backup-win-1") for row in (json.loads(data) if isinstance(data, str) else data)]
    assert [(row["disk"], row["status"], row["warning"]) for row in rows] == [("vm", "ok", report["warning"])]

    cfg = tmp_path / "store.yaml"
    cfg.write_text(json.dumps({"storage": config.storage.model_dump(mode="json", exclude_none=True), "hosts": []}))
    code, out, err = cli("prune", "-c", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(out)["staged_left"] == BLOCKS + 1
    assert f"warning: {BLOCKS + 1} staged upload blobs could not be deleted" in err

    monkeypatch.undo()  # the host stops: the next prune removes everything
    assert prune(repo).staged_deleted == BLOCKS + 1
    assert _staging_as_stored(azure_store) == []


def test_each_batch_of_urls_is_signed_when_the_host_needs_it(
        config: PatchdrillConfig, simulated: SimulatedWindowsDisk, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setattr(staged, "URLS_PER_CALL", 8)
    signed = 0
    original = AzureBlobStore.upload_url

    def counting(store: AzureBlobStore, key: str, **kwargs: object) -> str:
        nonlocal signed
        signed += 1
        return original(store, key, **kwargs)

    monkeypatch.setattr(AzureBlobStore, "upload_url", counting)
    signed_when_called: list[int] = []
    expiries: list[set[str]] = []

    def arrived(batch: list[str]) -> None:
        signed_when_called.append(signed)
        expiries.append({parse_qs(urlsplit(url).query)["se"][0] for url in batch})

    simulated.on_upload = arrived
    host, disk = _disk(config, "vm")
    assert back_up_disk(config.storage, tmp_path, host, disk, POLICY).status == "ok"
    # Signed batch by batch, never ahead of the host: 8, 16, 24, then the last block.
    assert signed_when_called == [8, 16, 24, 25]
    # Each batch signed at once: its expiries (whole seconds) lie within one second of each
    # other, the most a batch signed across a second's boundary can differ by.
    for batch in expiries:
        times = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")) for t in batch)
        assert times[-1] - times[0] <= timedelta(seconds=1), batch
