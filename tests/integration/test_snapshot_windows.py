"""VSS snapshots driven over a real WinRM transport (pywinrm to the WS-Management test host).

Real: pywinrm, HTTPS with NTLM, the WS-Man shell, connectors/winrm.py sending the shipped
vss_snapshot.ps1 and vss_remove.ps1 with their arguments, and take_snapshot's handling of what
comes back.

Simulated (there is no Windows here): what those two scripts do on Windows. `SimulatedVss`
answers them, matched on their exact shipped text, the way the scripts behave: shadow copies
with writers, writers that fail after Create or make Create refuse, the fallback to a copy
without writers when -AllowFallback is given, the JSON each script prints, and deletion by id.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from configs.models import DiskConfig, HostConfig
from configs.policies import SnapshotPolicy
from connectors import settings_for
from connectors.winrm import WinRmConnector
from tasks.backup.snapshot.view import APPLICATION, FILE_SYSTEM, SnapshotError, SnapshotRemovalError
from tasks.backup.snapshot.host import VSS_REMOVE_SCRIPT, VSS_SCRIPT
from tasks.backup.snapshot.take import take_snapshot
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler

pytestmark = pytest.mark.integration

STABLE = (1, "Stable")
FAILED_AT_FREEZE = (9, "Failed at freeze")
WRITERS = ("System Writer", "SqlServerWriter", "Registry Writer")


@dataclass
class SimulatedVss:
    """The volume shadow copies of one simulated Windows host."""

    failing_writer: str | None = None
    refuse_create_with_writers: bool = False
    refuse_removal: bool = False
    shadows: dict[str, str] = field(default_factory=dict)  # id -> context
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def writer_states(self) -> list[dict[str, object]]:
        return [{"name": name, "state": (FAILED_AT_FREEZE if name == self.failing_writer else STABLE)[0],
                 "state_text": (FAILED_AT_FREEZE if name == self.failing_writer else STABLE)[1]} for name in WRITERS]

    def new_shadow(self, context: str) -> str:
        shadow_id = "{" + str(uuid.uuid4()).upper() + "}"
        self.shadows[shadow_id] = context
        return shadow_id

    def snapshot(self, args: dict[str, str]) -> SimResult:
        self.calls.append(("snapshot", args))
        fallback = args.get("AllowFallback") == "true"
        writers = self.writer_states()
        context, consistency, reason = "ClientAccessibleWriters", APPLICATION, None
        if self.refuse_create_with_writers:
            why = "Win32_ShadowCopy.Create(ClientAccessibleWriters) returned 10 (the shadow copy provider vetoed the operation)"
            if not fallback:
                return SimResult(errors=[f"application-consistent shadow copy of C:\\ failed: {why}"], exit_code=1)
            context, consistency = "ClientAccessible", FILE_SYSTEM
            reason = f"with writers: {why}; took a shadow copy without writers"
        elif self.failing_writer:
            names = f"{self.failing_writer} [9] Failed at freeze"
            if not fallback:
                return SimResult(errors=[f"VSS writers failed during the shadow copy of C:\\: {names}"], exit_code=1)
            consistency = FILE_SYSTEM
            reason = f"VSS writers failed: {names}; the shadow copy is kept as file-system-consistent"
        shadow_id = self.new_shadow(context)
        link = f"C:\\ProgramData\\patchdrill\\snap-{args['SnapshotId']}"
        relative = args["Path"][3:]
        report = {"id": shadow_id, "device": "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy7", "link": link,
                  "volume": "C:\\", "read_path": f"{link}\\{relative}", "consistency": consistency, "context": context,
                  "writers": writers, "writers_failed_before": [], "fallback_reason": reason}
        return SimResult(stdout=json.dumps(report, separators=(",", ":")) + "\r\n")

    def remove(self, args: dict[str, str]) -> SimResult:
        self.calls.append(("remove", args))
        shadow_id = args["ShadowId"]
        if args.get("CheckOnly") == "true":
            state = "present" if shadow_id in self.shadows else "missing"
            return SimResult(stdout=json.dumps({"id": shadow_id, "shadow": state, "link": "none"}) + "\r\n")
        if self.refuse_removal:
            return SimResult(errors=["Remove-CimInstance : Another shadow copy operation is already in progress."], exit_code=1)
        state = "removed" if self.shadows.pop(shadow_id, None) else "already-gone"
        return SimResult(stdout=json.dumps({"id": shadow_id, "shadow": state, "link": "removed"}) + "\r\n")


@pytest.fixture(scope="module")
def vss_server(wsman_host_factory) -> Iterator[WsmanTestHost]:  # type: ignore[no-untyped-def]
    host = wsman_host_factory(scheme="https", auth=("ntlm",))
    yield host
    host.stop()


@pytest.fixture
def vss(vss_server: WsmanTestHost) -> Iterator[SimulatedVss]:
    simulated = SimulatedVss()
    handlers = [script_handler(VSS_SCRIPT, simulated.snapshot), script_handler(VSS_REMOVE_SCRIPT, simulated.remove)]
    vss_server.handlers[:0] = handlers
    yield simulated
    for handler in handlers:
        vss_server.handlers.remove(handler)


@pytest.fixture
def windows(vss_server: WsmanTestHost) -> HostConfig:
    return vss_server.host_config("win-sql")


@pytest.fixture
def winrm(windows: HostConfig) -> Iterator[WinRmConnector]:
    with WinRmConnector(settings_for(windows)) as connector:
        yield connector


DATA = DiskConfig(name="data", path="C:\\SQLData", kind="directory")


def test_healthy_writers_give_an_application_consistent_copy_removed_on_exit(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
        assert (snap.method, snap.consistency, snap.notes) == ("vss", APPLICATION, [])
        assert snap.read_path == f"C:\\ProgramData\\patchdrill\\snap-{snap.snapshot_id}\\SQLData"
        assert list(vss.shadows) == [snap.details["shadow_id"]]
        assert vss.shadows[snap.details["shadow_id"]] == "ClientAccessibleWriters"
        assert {w["name"] for w in snap.details["writers"]} == set(WRITERS)
        snap.verify()
    assert vss.shadows == {}
    removals = [args for kind, args in vss.calls if kind == "remove" and "CheckOnly" not in args]
    assert removals == [{"ShadowId": snap.details["shadow_id"], "SnapshotId": snap.snapshot_id}]
    snap.remove()
    assert len([c for c in vss.calls if c[0] == "remove"]) == 2, "a second remove() called the host again"


def test_a_failing_writer_falls_back_to_file_system_consistent_and_says_which(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    vss.failing_writer = "SqlServerWriter"
    with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
        assert snap.consistency == FILE_SYSTEM
        assert any("SqlServerWriter" in n and "Failed at freeze" in n for n in snap.notes), snap.notes
        assert snap.record()["details"]["writers"][1] == {"name": "SqlServerWriter", "state": 9, "state_text": "Failed at freeze"}
    assert vss.shadows == {}


def test_a_pre_script_does_not_hide_a_failed_writer(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    """The simulated host has no scripts of its own: pre/post run as plain commands the test
    host answers with `sh`, which is enough to tell they succeeded."""
    vss.failing_writer = "SqlServerWriter"
    policy = SnapshotPolicy(pre_script="exit 0", post_script="exit 0")
    with take_snapshot(winrm, windows, DATA, policy) as snap:
        assert snap.consistency == FILE_SYSTEM


def test_create_refused_with_writers_retries_without_them(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    vss.refuse_create_with_writers = True
    with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
        assert (snap.consistency, snap.details["context"]) == (FILE_SYSTEM, "ClientAccessible")
        assert any("vetoed" in n for n in snap.notes), snap.notes


def test_without_fallback_a_failing_writer_fails_the_snapshot(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    vss.failing_writer = "SqlServerWriter"
    with pytest.raises(SnapshotError) as failure:
        take_snapshot(winrm, windows, DATA, SnapshotPolicy(fallback=False))
    assert failure.value.host == "win-sql" and failure.value.disk == "data"
    assert "SqlServerWriter" in str(failure.value)
    assert vss.calls[0][1].get("AllowFallback") is None
    assert vss.shadows == {}


def test_a_removal_failure_never_masks_the_backups_own_error(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    vss.refuse_removal = True
    with capture_logs() as events, pytest.raises(RuntimeError, match="upload failed") as failure:
        with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
            raise RuntimeError("upload failed")
    shadow_id = snap.details["shadow_id"]
    logged = [e for e in events if e["event"] == "snapshot.removal_failed"]
    assert [(e["host"], e["snapshot_id"], e["log_level"]) for e in logged] == [("win-sql", snap.snapshot_id, "error")]
    assert any(shadow_id in note and "win-sql" in note for note in failure.value.__notes__)
    assert isinstance(snap.removal_error, SnapshotRemovalError) and not snap.removed
    assert shadow_id in vss.shadows

    vss.refuse_removal = False
    snap.remove()
    assert vss.shadows == {} and snap.removed and snap.removal_error is None


def test_a_removal_failure_after_a_good_backup_is_raised(
        vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    vss.refuse_removal = True
    with pytest.raises(SnapshotRemovalError) as failure:
        with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
            pass
    assert snap.details["shadow_id"] in str(failure.value) and "host win-sql disk data" in str(failure.value)
    assert "Another shadow copy operation" in str(failure.value)
    vss.refuse_removal = False
    snap.remove()


def test_verify_fails_when_vss_deleted_the_copy(vss: SimulatedVss, winrm: WinRmConnector, windows: HostConfig) -> None:
    with take_snapshot(winrm, windows, DATA, SnapshotPolicy()) as snap:
        vss.shadows.clear()  # as VSS does when the diff area runs out of space
        with pytest.raises(SnapshotError, match="is gone"):
            snap.verify()
