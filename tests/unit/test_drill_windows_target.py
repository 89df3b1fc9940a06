"""A drill member on a Windows target: what is recorded, sent and checked, with hostile names.

No Windows runs here, and the WS-Management test host answers only the PowerShell it was
taught, so the target is simulated: a connector that records each PowerShell command it is
handed and answers as a Windows host whose service stops when told to. Every command sent
must parse (tree-sitter-powershell) and carry the hostile names only as quoted literals; the
ledger (a real local store) and the cleanup logic are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors.base import BootIdentity, CommandResult, Connector, Script
from connectors.stores.local import LocalBlobStore
from connectors.winrm import WinRmConnector
from tasks.drill.cleanup import cleanup_run
from tasks.drill.control import ControlSpec, CopyContext, start_copy
from tasks.drill.copies import claim_copy_root
from tasks.drill.isolation import IsolationUnsupported, require_isolation
from tasks.drill.ledger import Ledger, ServiceEntry
from tests.unit.test_powershell_parses import syntax_problems

HOSTILE_SERVICE = "SQL Copy \u2019; Stop-Computer -Force; '"
ROOT = "D:\\drills\\sql-01"


class SimulatedWindows(Connector):
    """Records commands; the service runs after Start-Service and stops after Stop-Service,
    unless `stuck` (a service that ignores its stop request)."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.name, self.os_family = "win-dr", "windows"
        self.sent: list[str] = []
        self.running = False
        self.stuck = stuck
        self.root_exists = False

    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        self.sent.append(command)
        stdout, code = "", 0
        if command.startswith("New-Item"):
            self.root_exists = True
        elif command.startswith("Start-Service"):
            self.running = True
        elif command.startswith("Stop-Service"):
            self.running = self.running and self.stuck
        elif "Get-Service" in command:
            code = 1 if self.running else 0
        elif command.startswith("if (-not (Test-Path"):
            stdout = "removed" if self.root_exists else "absent"
            self.root_exists = False
        elif command.startswith("if (Test-Path"):
            code = 1 if self.root_exists else 0
        result = CommandResult(host=self.name, command=command, exit_code=code, stdout=stdout, stderr="")
        return result.check() if check else result

    def run_script(self, script: Script, args: list[str] | None = None, *, timeout: float | None = None,
                   check: bool = False) -> CommandResult:
        raise AssertionError("a Windows drill step sends PowerShell commands, not scripts")

    def put(self, local: Path, remote: str) -> None:
        raise AssertionError("unexpected")

    def get(self, remote: str, local: Path) -> None:
        raise AssertionError("unexpected")

    def boot_identity(self) -> BootIdentity:
        return BootIdentity(host=self.name, os_family="windows", boot_id="b")

    def close(self) -> None:
        pass


def drill(store: LocalBlobStore, target: SimulatedWindows) -> Ledger:
    ledger = Ledger(store, "win-run")
    claim_copy_root(target, ledger, member="sql-01", root=ROOT)
    started = start_copy(target, ledger, ControlSpec("windows-service", "{name}"),
                         CopyContext(member="sql-01", root=ROOT, name=HOSTILE_SERVICE))
    assert isinstance(started.entry, ServiceEntry) and started.entry.service == HOSTILE_SERVICE
    return ledger


def test_a_windows_service_copy_is_recorded_started_stopped_and_proven(tmp_path: Path) -> None:
    store, target = LocalBlobStore(tmp_path / "store"), SimulatedWindows()
    drill(store, target)
    assert target.running and target.root_exists
    report = cleanup_run(store, "win-run", lambda host: target)
    assert report.ok and report.closed, report.summary()
    assert [(item.kind, item.identifier) for item in report.items] == [("service", HOSTILE_SERVICE), ("copy-root", ROOT)]
    assert "exited 0" in report.items[0].evidence
    assert report.items[0].record() == {
        "member": "sql-01", "kind": "service", "target": "win-dr", "identifier": HOSTILE_SERVICE,
        "action": f"Stop-Service {HOSTILE_SERVICE}: exit 0", "verified": True, "evidence": report.items[0].evidence}
    assert not target.running and not target.root_exists
    quoted = "'SQL Copy \u2019\u2019; Stop-Computer -Force; '''"
    assert f"Start-Service -Name {quoted}" in target.sent and f"Stop-Service -Name {quoted} -Force" in target.sent
    for command in target.sent:
        assert syntax_problems(command) == [], command
        assert "Stop-Computer" not in command.replace(quoted, "")


def test_a_service_that_does_not_stop_fails_the_cleanup(tmp_path: Path) -> None:
    store, target = LocalBlobStore(tmp_path / "store"), SimulatedWindows(stuck=True)
    drill(store, target)
    report = cleanup_run(store, "win-run", lambda host: target)
    assert not report.ok and not report.closed
    service = report.items[0]
    assert service.action.endswith(": exit 0") and not service.verified
    assert service.evidence.startswith("NOT gone: service")


@pytest.mark.parametrize("preset", ["process", "systemd", "libvirt"])
def test_linux_presets_are_refused_on_a_windows_target_before_anything_is_recorded(tmp_path: Path, preset: str) -> None:
    store, target = LocalBlobStore(tmp_path / "store"), SimulatedWindows()
    with pytest.raises(ValueError, match=f"member 'sql-01': start/stop preset '{preset}' needs a Linux target"):
        start_copy(target, Ledger(store, "win-run"), ControlSpec(preset, "app"),  # type: ignore[arg-type]
                   CopyContext(member="sql-01", root=ROOT))
    assert list(store.list("drills/")) == [] and target.sent == []


def test_windows_targets_have_no_namespaces() -> None:
    """A WinRM connector is built but never connects: the check reads its OS family only."""
    windows = WinRmConnector(HostConfig(name="win-dr", transport="winrm", os_family="windows", address="192.0.2.9",
                                        user="u"))
    with pytest.raises(IsolationUnsupported) as caught:
        require_isolation(windows, "sql-01", "netns")
    assert str(caught.value).startswith("member 'sql-01': isolation 'netns' needs a Linux target; win-dr")
    assert "'none'" in str(caught.value)
    require_isolation(windows, "sql-01", "none")
