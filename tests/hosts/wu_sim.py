"""A simulated Windows Update behind the WinRM test host.

Simulated, plainly: there is no Windows Update Agent here. When the test host receives the
shipped tasks/patching/host_scripts/windows_update.ps1 (matched on its exact text, as every wsman_sim
handler is), this handler answers with the JSON document that script prints on Windows (the
WuReport model of tasks/patching/windows_update.py), computed from a small catalogue of
updates kept per host:

* Assess lists the catalogue's updates not yet installed and changes nothing.
* Install marks the requested, offered updates installed (or Failed, for an update the test
  declared failing, which then stays offered), reports per-update result codes and the ids no
  longer offered, and, when an installed update may reboot, sets reboot-pending: the
  WindowsUpdate `RebootRequired` key and CBS `RebootPending` are reported true until the host's
  next boot.
* `Restart-Computer -Force` makes the test host reboot: it goes down (connections refused) a
  moment after answering and comes back with a new LastBootUpTime, which is what
  boot_identity.ps1 and the report's `os.last_boot_up_time` read.

What is real: the WS-Management endpoint, pywinrm, the connector, the script text sent and
its arguments; the parsing and validation of the report on the product's side.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import date, datetime

from tasks.patching.windows_update import SCRIPT
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wsman_sim import SimResult, script_handler, windows_datetime

RESTART = "Restart-Computer -Force"
_FAILED_HRESULT = -2145124318  # 0x80240022, WU_E_ALL_UPDATES_FAILED


@dataclass(frozen=True)
class SimulatedUpdate:
    kb: str
    title: str
    classification: str = "Security Updates"
    severity: str = "Important"
    size_bytes: int = 50_000_000
    release_date: date | None = None
    reboot_behaviour: str = "may"
    hotpatch: bool = False
    fails: bool = False

    @property
    def update_id(self) -> str:
        # A stable GUID-shaped identity derived from the KB number.
        digits = self.kb.removeprefix("KB").rjust(12, "0")
        return f"00000000-0000-4000-8000-{digits}"


@dataclass
class SimulatedWindowsUpdate:
    host: WsmanTestHost
    catalogue: list[SimulatedUpdate]
    caption: str = "Microsoft Windows Server 2022 Datacenter: Azure Edition"
    build: str = "20348.2227"
    reboot_down_for: float = 0.3
    installed: set[str] = field(default_factory=set)
    install_requests: list[list[str]] = field(default_factory=list)
    reboots: int = 0
    #: the boot during which an install asked for a reboot; pending until the host boots again
    _pending_on_boot: datetime | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self) -> "SimulatedWindowsUpdate":
        self.host.windows.caption = self.caption.removeprefix("Microsoft ")
        self.host.handlers.insert(0, script_handler(SCRIPT, self._answer))
        self.host.handlers.insert(0, self._restart)
        return self

    @property
    def reboot_pending(self) -> bool:
        return self._pending_on_boot is not None and self._pending_on_boot == self.host.boot_time

    def _record(self, update: SimulatedUpdate) -> dict[str, object]:
        return {
            "id": update.kb, "update_id": update.update_id, "revision": 1, "title": update.title,
            "classification": update.classification, "severity": update.severity,
            "kb_article_ids": [update.kb.removeprefix("KB")], "size_bytes": update.size_bytes,
            "release_date": update.release_date.isoformat() if update.release_date else None,
            "reboot_behaviour": update.reboot_behaviour, "hotpatch": update.hotpatch, "downloaded": False,
        }

    def _missing(self) -> list[SimulatedUpdate]:
        return [u for u in self.catalogue if u.kb not in self.installed]

    def _install(self, wanted: list[str]) -> dict[str, object]:
        offered = {u.kb.upper(): u for u in self._missing()}
        offered.update({u.update_id.upper(): u for u in self._missing()})
        results, chosen = [], [offered[w] for w in wanted if w in offered]
        for update in chosen:
            if update.fails:
                results.append({"id": update.kb, "result_code": 4, "result": "Failed", "hresult": _FAILED_HRESULT})
                continue
            self.installed.add(update.kb)
            results.append({"id": update.kb, "result_code": 2, "result": "Succeeded", "hresult": 0})
            if update.reboot_behaviour != "never":
                self._pending_on_boot = self.host.boot_time
        failed = any(r["result"] == "Failed" for r in results)
        code = (4 if failed and len(results) == 1 else 3 if failed else 2) if results else 0
        return {
            "result_code": code, "result": ["NotStarted", "InProgress", "Succeeded", "SucceededWithErrors", "Failed",
                                            "Aborted"][code],
            "reboot_required": self.reboot_pending, "updates": results,
            "not_offered": [w for w in wanted if w not in offered],
        }

    def _answer(self, args: dict[str, str]) -> SimResult:
        operation = args.get("Operation", "Assess")
        with self._lock:
            install = None
            if operation == "Install":
                wanted = [w.strip().upper() for w in args.get("UpdateIds", "").split(",") if w.strip()]
                self.install_requests.append(wanted)
                install = self._install(wanted)
            pending = self.reboot_pending
            report = {
                "schema_version": 1, "operation": operation.lower(), "computer": self.host.windows.computer_name,
                "os": {"caption": self.caption, "version": self.host.windows.version, "build": self.build,
                       "azure_edition": "Azure Edition" in self.caption,
                       "last_boot_up_time": windows_datetime(self.host.boot_time)},
                "reboot_pending": {"component_based_servicing": pending, "windows_update": pending,
                                   "pending_file_rename": False},
                "updates": [self._record(u) for u in self._missing()],
                "install": install, "errors": [],
            }
        return SimResult(stdout=json.dumps(report, indent=2) + "\r\n")

    def _restart(self, script: str, args: list[str]) -> SimResult | None:
        if script.strip() != RESTART:
            return None
        self.reboots += 1
        # Windows answers Restart-Computer, then goes down; the timer lets the answer leave first.
        threading.Timer(0.1, self.host.reboot, args=(self.reboot_down_for,)).start()
        return SimResult()


__all__ = ["SimulatedUpdate", "SimulatedWindowsUpdate"]
