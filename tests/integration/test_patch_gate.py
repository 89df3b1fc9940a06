"""Reboot gate, health probes and Windows patching over real transports.

Linux: real sshd hosts in their own mount namespace; the product's `shutdown` resolves to a
stub first on the session's PATH (set by sshd's SetEnv) that either refuses or does nothing,
so the gate's failure paths are exercised without rebooting anything. Windows: the WinRM test
host with the simulated Windows Update of tests/hosts/wu_sim.py (what is simulated is said
there), whose Restart-Computer takes the endpoint down and brings it back with a new
LastBootUpTime.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest

from configs.probes import CommandProbe, HttpProbe, ServiceProbe, TcpProbe
from connectors import connect
from connectors.base import BootIdentity
from tasks.patching import windows_host
from tasks.probes import check_health, failure_summary
from tasks.patching.models import ComplianceState
from tasks.patching.reboot_gate import RebootFailed, reboot_and_wait
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import SshdHost, free_port
from tests.hosts.winrm import HostFactory
from tests.hosts.wsman_server import WsmanTestHost
from tests.hosts.wu_sim import SimulatedUpdate, SimulatedWindowsUpdate

pytestmark = pytest.mark.integration
# Generous: the machine may be shared and busy; nothing here measures speed.
SLOW_HOST_SECONDS = 60.0


def _host_with_shutdown(sshd_factory: SshdMaker, tmp_path: Path, name: str, stub: str) -> SshdHost:
    stubs = tmp_path / f"bin-{name}"
    stubs.mkdir()
    (stubs / "shutdown").write_text(stub)
    (stubs / "shutdown").chmod(0o755)
    return sshd_factory(name, namespace=True, extra_config={"SetEnv": {"PATH": f"{stubs}:/usr/bin:/bin"}})


def test_a_host_that_does_not_reboot_fails_the_gate(sshd_factory: SshdMaker, tmp_path: Path) -> None:
    host = _host_with_shutdown(sshd_factory, tmp_path, "gate-stuck", "#!/bin/sh\nexit 0\n")
    recorded: list[BootIdentity] = []
    with connect(host.host_config(connect_timeout=SLOW_HOST_SECONDS)) as conn, \
            pytest.raises(RebootFailed, match="did not come back as a new boot within 2s"):
        reboot_and_wait(conn, timeout=2, interval=0.2, before_reboot=recorded.append)
    # The record of the attempt was written first, with the boot the host is still on.
    assert [b.boot_id for b in recorded] == [host.boot_id]


def test_a_refused_reboot_request_is_reported_with_its_error(sshd_factory: SshdMaker, tmp_path: Path) -> None:
    stub = "#!/bin/sh\necho 'shutdown: Permission denied' >&2\nexit 1\n"
    host = _host_with_shutdown(sshd_factory, tmp_path, "gate-refused", stub)
    with connect(host.host_config(connect_timeout=SLOW_HOST_SECONDS)) as conn, \
            pytest.raises(RebootFailed, match="reboot request exited 1: shutdown: Permission denied"):
        reboot_and_wait(conn, timeout=30, before_reboot=lambda _: None)


@pytest.fixture
def windows_update(wsman_host_factory: HostFactory) -> Iterator[tuple[WsmanTestHost, SimulatedWindowsUpdate]]:
    host = wsman_host_factory(scheme="https", auth=("ntlm",))
    wu = SimulatedWindowsUpdate(host, [
        SimulatedUpdate("KB5070001", "2026-11 Cumulative Update", reboot_behaviour="always"),
        SimulatedUpdate("KB5070002", "2026-11 Servicing Stack Update", fails=True),
        SimulatedUpdate("KB5070003", "Hotpatch", hotpatch=True, reboot_behaviour="never"),
    ]).attach()
    yield host, wu
    host.stop()


def test_windows_enroll_assess_install_and_reboot_through_the_gate(
        windows_update: tuple[WsmanTestHost, SimulatedWindowsUpdate]) -> None:
    host, wu = windows_update
    with connect(host.host_config("win-gate", timezone="Europe/Paris", connect_timeout=SLOW_HOST_SECONDS)) as conn:
        enrollment = windows_host.enroll(conn, timezone_name="Europe/Paris")
        assert enrollment.hotpatch_eligible and enrollment.build == "20348.2227"
        assert enrollment.package_manager == "windows-update" and enrollment.timezone == "Europe/Paris"
        missing = {u.id: u for u in windows_host.assess(conn)}
        assert set(missing) == {"KB5070001", "KB5070002", "KB5070003"} and missing["KB5070003"].hotpatchable
        assert wu.install_requests == [] and not windows_host.reboot_pending(conn)

        result = windows_host.install(conn, [missing["KB5070001"], missing["KB5070002"]])
        states = {o.update_id: o for o in result.outcomes}
        assert states["KB5070001"].state is ComplianceState.INSTALLED_PENDING_REBOOT
        assert states["KB5070002"].state is ComplianceState.FAILED and "0x80240022" in states["KB5070002"].reason
        assert result.reboot_required and windows_host.reboot_pending(conn)

        seen_before: list[tuple[str, bool]] = []
        outcome = reboot_and_wait(conn, timeout=60, interval=0.2,
                                  before_reboot=lambda b: seen_before.append((b.boot_id, host.is_up)))
        assert seen_before == [(outcome.before.boot_id, True)]
        assert outcome.after.boot_id != outcome.before.boot_id and wu.reboots == 1
        assert not windows_host.reboot_pending(conn)


class _Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_status_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_health_probes_pass_and_fail_for_the_right_reasons(sshd_host: SshdHost, http_status_server: int) -> None:
    config = sshd_host.host_config(connect_timeout=SLOW_HOST_SECONDS)
    closed_port = free_port(config.address)
    probes = [
        TcpProbe(port=sshd_host.port, timeout_seconds=SLOW_HOST_SECONDS),
        TcpProbe(port=closed_port, timeout_seconds=2),
        HttpProbe(url=f"http://127.0.0.1:{http_status_server}/healthz", timeout_seconds=SLOW_HOST_SECONDS),
        HttpProbe(url=f"http://127.0.0.1:{http_status_server}/broken", timeout_seconds=SLOW_HOST_SECONDS),
        CommandProbe(command="test -d /etc", timeout_seconds=SLOW_HOST_SECONDS),
        CommandProbe(command="echo 'app not ready' >&2; exit 3", timeout_seconds=SLOW_HOST_SECONDS),
        ServiceProbe(service="patchdrill-no-such-unit", expect_state="stopped", timeout_seconds=SLOW_HOST_SECONDS),
    ]
    with connect(config) as conn:
        results = check_health(config, conn, probes)
    assert [r.ok for r in results] == [True, False, True, False, True, False, True]
    summary = failure_summary(results)
    assert f"{config.address}:{closed_port}" in summary
    assert "answered 503, expected 200" in summary
    assert "exited 3, expected 0: app not ready" in summary
