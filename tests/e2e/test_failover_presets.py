"""Failover and failback with the `process` and `systemd` start/stop presets, between two real
sshd hosts, through the `patchdrill` CLI on the Prefect test server.

Real: OpenSSH, the hosts' own processes and ports (Python's http.server over the disk), the
pidfiles patchdrill writes and reads on each side, the backups, the delta restores (the DR
target's parent directories do not exist before the failover), the HTTP probes.

Simulated: systemd itself. It is not PID 1 on this machine, so `systemctl` answers "System has
not been booted with systemd". Each host's session finds a `systemctl` of the test's first on its
PATH (sshd's SetEnv): it reads the unit's `ExecStart=` from a unit file in the host's own unit
directory, runs it detached, and answers `start`, `stop` and `show --property=ActiveState` from
that process. Everything patchdrill sends (the commands rendered by tasks/drill/control.py, the
stopped check) is the real text; only what systemd would do with it is simulated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from configs.models import HostConfig
from connectors import connect
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.hosts.sshd import SshdFleet
from tests.hosts.sshd_server import SshdHost, free_port

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
Cli = Callable[..., tuple[int, str, str]]

FAKE_SYSTEMCTL = r"""#!/bin/sh
# systemd simulated for the tests (see the module docstring): units are files in $PATCHDRILL_TEST_UNITS.
units=$PATCHDRILL_TEST_UNITS
for unit; do :; done
pidfile="$units/$unit.pid"
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
case "$1" in
  start)
    [ -f "$units/$unit" ] || { echo "Failed to start $unit: Unit $unit not found." >&2; exit 5; }
    running && exit 0
    command=$(sed -n 's/^ExecStart=//p' "$units/$unit")
    setsid sh -c "exec $command" </dev/null >>"$units/$unit.log" 2>&1 &
    echo $! > "$pidfile" ;;
  stop)
    # A unit whose stop request is acknowledged but does nothing (the stuck-unit test).
    grep -q '^X-Test-Stop=ignored' "$units/$unit" && exit 0
    if running; then
      pid=$(cat "$pidfile"); kill "$pid"
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    fi
    rm -f "$pidfile" ;;
  show)
    if running; then echo active; else echo inactive; fi ;;
  *) echo "systemctl (test): $1 is not simulated" >&2; exit 1 ;;
esac
"""


@dataclass
class Side:
    host: SshdHost
    units: Path

    @property
    def config(self) -> HostConfig:
        return self.host.config

    def url(self, port: int) -> str:
        return f"http://{self.host.address}:{port}/index.html"

    def run(self, command: str) -> str:
        with connect(self.config) as connector:
            result = connector.run(command, timeout=60)
        assert result.ok, result.stderr
        return result.stdout


@dataclass
class Pair:
    primary: Side
    dr: Side
    work: Path


@pytest.fixture(scope="module")
def pair(sshd_fleet: SshdFleet) -> Iterator[Pair]:
    """Two sshd hosts for the whole module, each with the simulated systemctl first on its PATH."""
    work = Path(tempfile.mkdtemp(prefix="pd-failover-presets-"))
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    sides = []
    for name in ("preset-primary", "preset-dr"):
        units = work / f"units-{name}"
        units.mkdir()
        env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "PATCHDRILL_TEST_UNITS": str(units)}
        sides.append(Side(sshd_fleet.create(name, extra_config={"SetEnv": env}), units))
    try:
        yield Pair(primary=sides[0], dr=sides[1], work=work)
    finally:
        for side in sides:
            for pidfile in side.units.glob("*.pid"):
                side.run(f"kill $(cat {pidfile}) 2>/dev/null; true")
            side.host.close()
        shutil.rmtree(work, ignore_errors=True)


def serves(url: str, text: str = "hello") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return text in answer.read().decode()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def lab(pair: Pair, name: str, app: dict[str, Any], port: int) -> tuple[Path, Path, Path]:
    """A config whose plan moves one directory disk from the primary to a DR path whose parents
    do not exist yet. Returns the config, the primary's disk and the copy's disk."""
    root = pair.work / name
    data = root / "primary" / "www"
    data.mkdir(parents=True)
    (data / "index.html").write_text("hello from the primary\n")
    (data / "big.bin").write_bytes(os.urandom(6 * BLOCK))
    copy_root = root / "dr" / "not" / "there" / "yet"
    probe = {"kind": "http", "name": "index", "url": f"http://{{address}}:{port}/index.html", "expect_body": "hello"}
    hosts = [{**pair.primary.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
              "transport": "ssh", "disks": [{"name": "www", "path": str(data), "kind": "directory"}]},
             {**pair.dr.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True), "transport": "ssh"}]
    config = root / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": hosts,
        "backup_policies": {"default": {"block_size": BLOCK, "snapshot_method": "none"}},
        "recovery_plans": {name: {"rto_target": 600, "rpo_target": 3600, "groups": [{"name": "web", "members": [{
            "host": pair.primary.host.name, "disks": ["www"], "isolation": "none",
            "target": {"host": pair.dr.host.name, "path": str(copy_root)},
            "app": {**app, "port": port, "ready_wait_seconds": 20}, "probes": [probe], "steady_state": [dict(probe)]}]}]}},
    }))
    return config, data, copy_root / "www"


def fail_over_and_back(cli: Cli, config: Path, plan: str, pair: Pair, port: int,  # noqa: F811
                       copy: Path, primary: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Planned failover, commit, a write on the DR side, failback; the JSON summaries of both."""
    code, out, err = cli("failover", plan, "--planned", "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    over = json.loads(out)
    assert serves(pair.dr.url(port)) and not serves(pair.primary.url(port))
    assert cli("failover", "commit", over["run_id"], "-c", str(config))[0] == 0
    (copy / "index.html").write_text("hello from the DR side\n")

    code, out, err = cli("failback", plan, "--yes", "-c", str(config), "--json")
    assert code == 0, out + err
    back = json.loads(out)
    assert serves(pair.primary.url(port), "hello from the DR side") and not serves(pair.dr.url(port))
    assert (primary / "index.html").read_text() == "hello from the DR side\n"
    return over, back


def test_process_preset_fails_over_and_back_stopping_each_side_by_its_pidfile(
        prefect_server: None, pair: Pair, cli: Cli) -> None:  # noqa: F811
    """The primary was started by hand with a daemon's plain pidfile (just the pid); the copy and,
    on failback, the primary are started by patchdrill, which keeps pid, start time and boot id."""
    port = free_port(pair.primary.host.address)
    serve = f"python3 -m http.server {port} --directory {{disk:www}} --bind"
    app = {"preset": "process", "command": f"{serve} {pair.dr.host.address}", "pidfile": "{root}/web.pid",
           "primary": {"command": f"{serve} {pair.primary.host.address}"}}
    config, primary, copy = lab(pair, "web-process", app, port)
    pidfile = primary.parent / "web.pid"
    pair.primary.run(f"cd {primary.parent}; nohup python3 -m http.server {port} --directory {primary} "
                     f"--bind {pair.primary.host.address} </dev/null >/dev/null 2>&1 & echo $! > {pidfile}")
    first = int(pidfile.read_text())
    deadline = time.monotonic() + 20
    while not serves(pair.primary.url(port)) and time.monotonic() < deadline:
        time.sleep(0.1)

    over, back = fail_over_and_back(cli, config, "web-process", pair, port, copy, primary)
    assert not alive(first), "the primary's process outlived the planned failover"
    copy_pid = int((copy.parent / "web.pid").read_text().split()[0])
    assert not alive(copy_pid), "the copy's process outlived the failback"
    pid, start_time, boot_id = pidfile.read_text().split()  # patchdrill's own format now
    assert alive(int(pid)) and int(start_time) > 0 and boot_id
    steps = {s: d for s, d in ((x["name"], x["detail"]) for x in _evidence(config, over["run_id"])["steps"])}
    assert steps["stop-primary"].startswith(f"sent TERM to pid {first}"), steps
    assert back["bytes_moved"] > 0 and over["bytes_moved"] >= 6 * BLOCK


def test_systemd_preset_fails_over_and_back_with_a_unit_named_differently_on_each_side(
        prefect_server: None, pair: Pair, cli: Cli) -> None:  # noqa: F811
    port = free_port(pair.primary.host.address)
    app = {"preset": "systemd", "name": "web-dr.service", "command": "unused by a failover",
           "primary": {"name": "web.service"}}
    config, primary, copy = lab(pair, "web-systemd", app, port)
    serve = f"python3 -m http.server {port} --directory"
    (pair.primary.units / "web.service").write_text(
        f"[Service]\nExecStart={serve} {primary} --bind {pair.primary.host.address}\n")
    (pair.dr.units / "web-dr.service").write_text(
        f"[Service]\nExecStart={serve} {copy} --bind {pair.dr.host.address}\n")
    pair.primary.run("systemctl start web.service")
    deadline = time.monotonic() + 20
    while not serves(pair.primary.url(port)) and time.monotonic() < deadline:
        time.sleep(0.1)

    over, back = fail_over_and_back(cli, config, "web-systemd", pair, port, copy, primary)
    assert pair.primary.run("systemctl show --property=ActiveState --value -- web.service").strip() == "active"
    assert pair.dr.run("systemctl show --property=ActiveState --value -- web-dr.service").strip() == "inactive"
    over_steps = [(s["name"], s["detail"]) for s in _evidence(config, over["run_id"])["steps"]]
    assert ("stop-primary", f"systemd web.service stopped (checked) on {pair.primary.host.name}") in over_steps
    assert ("start", f"systemd web-dr.service started on {pair.dr.host.name}") in over_steps
    back_steps = [(s["name"], s["detail"]) for s in _evidence(config, back["run_id"])["steps"]]
    assert ("stop-copy", f"systemd web-dr.service stopped (checked) on {pair.dr.host.name}") in back_steps


def test_a_unit_that_does_not_stop_fails_the_failover_before_the_final_backup(
        prefect_server: None, pair: Pair, cli: Cli) -> None:  # noqa: F811
    """`systemctl stop` exits 0 but the application keeps running (ActiveState stays active):
    the preset's stopped check catches it, and nothing is backed up or restored."""
    port = free_port(pair.primary.host.address)
    app = {"preset": "systemd", "name": "stuck-dr.service", "primary": {"name": "stuck.service"}, "command": "x"}
    config, _, copy = lab(pair, "web-stuck", app, port)
    (pair.primary.units / "stuck.service").write_text("[Service]\nExecStart=sleep 300\nX-Test-Stop=ignored\n")
    pair.primary.run("systemctl start stuck.service")
    code, out, err = cli("failover", "web-stuck", "--planned", "--yes", "-c", str(config), "--json")
    assert code == 1, out + err
    summary, _ = json.JSONDecoder().raw_decode(out)
    assert "stop of web/preset-primary#0 on the primary" in out + err and "is not stopped after its stop command" in out + err
    steps = [(s["name"], s["ok"]) for s in _evidence(config, summary["run_id"])["steps"]]
    assert steps == [("stop-primary", False)] and not copy.exists()


def _evidence(config: Path, run_id: str) -> dict[str, Any]:
    [found] = [p for p in (config.parent / "store" / "evidence").rglob(f"{run_id}.json")]
    return json.loads(found.read_text())
