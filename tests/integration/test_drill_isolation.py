"""Drill isolation, start/stop and proven cleanup on a real sshd host with real `ip netns`.

The DR target is a real OpenSSH server (tests/hosts/sshd.py) reached by the SSH connector, as
root, on this machine: the namespaces, processes and files it makes are checked from the test
process too. Every test's ledger is swept by tests/hosts/drill_guard.py afterwards with plain
commands, so a failing test leaves no namespace or process behind.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors.local import LocalConnector
from connectors.ssh import SshConnector
from connectors.stores.local import LocalBlobStore
from tasks.drill import control, isolation
from tasks.drill.cleanup import cleanup_run
from tasks.drill.control import ControlSpec, CopyContext, start_copy, stop_copy, wait_listening
from tasks.drill.copies import claim_copy_root, record_path
from tasks.drill.isolation import create_namespace, namespace_name, prove_isolation
from tasks.drill.ledger import ClosedEntry, Ledger
from tests.hosts.drill_guard import Guard, namespaces, proc_start_time
from tests.hosts.sshd_server import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HTTP_SERVER = "python3 -m http.server {port} --bind 127.0.0.1 --directory {root}"


class Listener:
    """A production service stand-in: a real listening socket in this machine's own namespace."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.address, self.port = address, self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def outside_address() -> str | None:
    """This machine's first non-loopback IPv4 address, if it has one."""
    listed = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        return line.split()[3].split("/")[0]
    return None


@pytest.fixture
def target(ssh_host_config: HostConfig) -> Iterator[SshConnector]:
    connector = SshConnector(ssh_host_config)
    yield connector
    connector.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "store")


@pytest.fixture
def run_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def guard(store: LocalBlobStore, run_id: str) -> Iterator[Guard]:
    sweeper = Guard(store, run_id)
    yield sweeper
    sweeper.sweep()


def in_namespace(name: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def connects(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((address, port)) == 0


def test_the_copy_answers_inside_its_namespace_and_cannot_reach_production(
        target: SshConnector, store: LocalBlobStore, run_id: str, guard: Guard, tmp_path: Path,
        ssh_host_config: HostConfig) -> None:
    production = [Listener(ssh_host_config.address)]
    if (address := outside_address()) is not None:
        production.append(Listener(address))
    try:
        ledger = Ledger(store, run_id)
        root = str(tmp_path / "copy")
        claim_copy_root(target, ledger, member="web", root=root)
        record_path(target, ledger, member="web", root=root, path=f"{root}/index.html")
        Path(root, "index.html").write_text("restored page\n")
        namespace = create_namespace(target, ledger, member="web")
        assert namespace.name == namespace_name(run_id, "web") and namespace.name in namespaces()
        port = free_port("127.0.0.1")
        started = start_copy(target, ledger, ControlSpec("process", HTTP_SERVER),
                             CopyContext(member="web", root=root, port=port, namespace=namespace.name))
        assert wait_listening(target, port, namespace=namespace.name, timeout=30)

        proof = prove_isolation(target, namespace, [(p.address, p.port) for p in production], copy_port=port)
        assert proof.ok, proof.evidence
        assert proof.links == ["lo"] and proof.routes == []
        assert all(a.errno in ("ECONNREFUSED", "ENETUNREACH") for a in proof.production_inside)
        assert all(a.connected for a in proof.production_outside), "the control connect from the target failed"
        # The test's own view agrees: the copy answers HTTP inside, and is invisible outside.
        fetched = in_namespace(namespace.name, f"import urllib.request; print(urllib.request.urlopen("
                                               f"'http://127.0.0.1:{port}/index.html', timeout=10).read().decode(), end='')")
        assert fetched.stdout == "restored page\n", fetched.stderr
        assert not connects("127.0.0.1", port)
        pid = started.entry.pid  # type: ignore[union-attr]
        assert pid and Path(root, ".patchdrill", "web.pid").read_text().split()[0] == str(pid)

        stopped = stop_copy(target, started.entry, run_id=run_id, grace=5)
        assert stopped.action == f"sent TERM to pid {pid}"
        assert proc_start_time(pid) is None or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
        again = stop_copy(target, started.entry, run_id=run_id, grace=5)
        assert again.action == f"pid {pid} had already exited"

        report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))
        assert report.ok, report.summary()
        assert namespace.name not in namespaces() and not Path(root).exists()
    finally:
        for listener in production:
            listener.close()


def test_a_namespace_with_a_way_out_fails_the_proof(target: SshConnector, store: LocalBlobStore, run_id: str,
                                                    guard: Guard) -> None:
    """A veth pair gives the namespace an address and a route to this machine: the proof must
    name the interface, the route and the production endpoint it reached."""
    namespace = create_namespace(target, Ledger(store, run_id), member="leaky")
    outer, inner = f"pdo{run_id[-8:]}", f"pdi{run_id[-8:]}"
    octet = int(run_id[-2:], 16)
    try:
        for command in (f"ip link add {outer} type veth peer name {inner} netns {namespace.name}",
                        f"ip addr add 10.231.{octet}.1/30 dev {outer}", f"ip link set {outer} up",
                        f"ip -n {namespace.name} addr add 10.231.{octet}.2/30 dev {inner}",
                        f"ip -n {namespace.name} link set {inner} up"):
            subprocess.run(command.split(), check=True, capture_output=True)
        production = Listener(f"10.231.{octet}.1")
        try:
            proof = prove_isolation(target, namespace, [(production.address, production.port)], copy_port=free_port("127.0.0.1"))
        finally:
            production.close()
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
    assert not proof.ok
    problems = "\n".join(proof.problems)
    assert f"interface {inner} besides loopback" in problems
    assert f"10.231.{octet}.0/30" in problems
    assert f"production 10.231.{octet}.1:{production.port} is reachable from inside" in problems
    assert "the copy does not answer" in problems


def test_a_plain_process_without_isolation_starts_and_stops(target: SshConnector, store: LocalBlobStore,
                                                            run_id: str, guard: Guard, tmp_path: Path,
                                                            ssh_host_config: HostConfig) -> None:
    ledger = Ledger(store, run_id)
    root = str(tmp_path / "plain")
    claim_copy_root(target, ledger, member="plain", root=root)
    port = free_port("127.0.0.1")
    started = start_copy(target, ledger, ControlSpec("process", HTTP_SERVER),
                         CopyContext(member="plain", root=root, port=port))
    assert wait_listening(target, port, namespace=None, timeout=30)
    assert connects("127.0.0.1", port)
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config), grace=5)
    assert report.ok, report.summary()
    process = next(item for item in report.items if item.kind == "process")
    assert f"127.0.0.1:{port} on {ssh_host_config.name}: ECONNREFUSED" in process.evidence
    assert not connects("127.0.0.1", port)
    assert proc_start_time(started.entry.pid) is None or "Z" in Path(f"/proc/{started.entry.pid}/stat").read_text()  # type: ignore[union-attr]


CRASHING_CONTROLLER = """
import json, sys, time
from configs.models import HostConfig
from connectors.ssh import SshConnector
from connectors.stores.local import LocalBlobStore
from tasks.drill.control import ControlSpec, CopyContext, start_copy, wait_listening
from tasks.drill.copies import claim_copy_root, record_path
from tasks.drill.isolation import create_namespace
from tasks.drill.ledger import Ledger

config, store_dir, run_id, root, port = sys.argv[1:]
target = SshConnector(HostConfig.model_validate_json(config))
ledger = Ledger(LocalBlobStore(store_dir), run_id)
claim_copy_root(target, ledger, member="db", root=root)
record_path(target, ledger, member="db", root=root, path=root + "/disk.img")
open(root + "/disk.img", "wb").write(b"\\0" * 65536)
namespace = create_namespace(target, ledger, member="db")
started = start_copy(target, ledger, ControlSpec("process", "python3 -m http.server {port} --bind 127.0.0.1"),
                     CopyContext(member="db", root=root, port=int(port), namespace=namespace.name))
assert wait_listening(target, int(port), namespace=namespace.name, timeout=30)
print("READY " + json.dumps({"namespace": namespace.name, "pid": started.entry.pid}), flush=True)
time.sleep(600)
"""


def test_cleanup_after_a_controller_killed_mid_drill_works_from_the_ledger_alone(
        store: LocalBlobStore, run_id: str, guard: Guard, tmp_path: Path, ssh_host_config: HostConfig) -> None:
    root = str(tmp_path / "crashed")
    port = free_port("127.0.0.1")
    controller = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CONTROLLER, ssh_host_config.model_dump_json(), str(store.root), run_id, root,
         str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Its log lines come first; the marker line says everything is made and running.
        for line in controller.stdout:  # type: ignore[union-attr]
            if line.startswith("READY "):
                break
        else:
            pytest.fail(f"the controller exited before it was ready: {controller.stderr.read()}")  # type: ignore[union-attr]
        made = json.loads(line.removeprefix("READY "))
    finally:
        controller.kill()  # SIGKILL: no finally block, no atexit in the controller runs
        controller.wait()
    assert made["namespace"] in namespaces() and proc_start_time(made["pid"]) is not None
    assert in_namespace(made["namespace"], f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)").returncode == 0

    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config), grace=5)

    assert report.ok, report.summary()
    assert [item.kind for item in report.items] == ["process", "namespace", "path", "copy-root"]
    assert made["namespace"] not in namespaces()
    state = Path(f"/proc/{made['pid']}/stat")
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not Path(root).exists()
    entries = Ledger(store, run_id).read()
    assert isinstance(entries[-1], ClosedEntry) and entries[-1].items == 4

    # Cleaning up again finds everything gone, says so, and still proves it.
    second = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config), grace=5)
    assert second.ok and second.closed
    assert sum(isinstance(entry, ClosedEntry) for entry in Ledger(store, run_id).read()) == 1
    actions = {item.kind: item.action for item in second.items}
    assert actions["namespace"] == f"namespace {made['namespace']} was already gone"
    assert actions["copy-root"] == "was already gone" and actions["path"] == "was already gone"
    assert f"pid {made['pid']}" in actions["process"] and "already exited" in actions["process"]


def test_recorded_but_never_created_is_cleaned_as_gone(store: LocalBlobStore, run_id: str, guard: Guard,
                                                       tmp_path: Path, ssh_host_config: HostConfig) -> None:
    """A controller that died between writing the ledger and creating the thing: the entries
    name things that never existed, and cleanup proves each absent."""
    ledger = Ledger(store, run_id)
    root = str(tmp_path / "never")
    ledger.record("copy-root", host=ssh_host_config.name, member="m", copy_root=root)
    ledger.record("namespace", host=ssh_host_config.name, member="m", name=namespace_name(run_id, "m"))
    ledger.record("process", host=ssh_host_config.name, member="m", copy_root=root,
                  pidfile=f"{root}/.patchdrill/m.pid", namespace=namespace_name(run_id, "m"), port=free_port("127.0.0.1"))
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))
    assert report.ok, report.summary()
    process = report.items[0]
    assert "never started" in process.action and "is gone, nothing can listen in it" in process.evidence


def test_hostile_ledger_entries_touch_nothing_outside_the_drill(store: LocalBlobStore, run_id: str, guard: Guard,
                                                                tmp_path: Path, ssh_host_config: HostConfig) -> None:
    """Entries that are valid in form but point at things the drill does not own: a path behind
    a symbolic link out of the copy root, a directory without this run's marker, a path under a
    root the ledger never recorded, someone else's running process (with its true pid and start
    time) under the drill's own root and under a foreign one, and a namespace this run did not
    make, with a process in it."""
    decoy = tmp_path / "decoy" / "important"
    decoy.mkdir(parents=True)
    (decoy / "keep.txt").write_text("precious")
    root = tmp_path / "copy"
    victim = f"pdx-victim-{run_id[-8:]}"
    subprocess.run(["ip", "netns", "add", victim], check=True)
    guard.namespaces.append(victim)
    inside_victim = subprocess.Popen(["ip", "netns", "exec", victim, "sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    for process in (inside_victim, bystander):
        guard.keep_pid(process.pid)
    identity = {"pid": bystander.pid, "start_time": proc_start_time(bystander.pid),
                "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
    with SshConnector(ssh_host_config) as target:
        ledger = Ledger(store, run_id)
        claim_copy_root(target, ledger, member="m", root=str(root))
    (root / "escape").symlink_to(decoy)
    ledger.record("path", host=target.name, member="m", copy_root=str(root), path=f"{root}/escape/keep.txt")
    ledger.record("copy-root", host=target.name, member="m", copy_root=str(decoy))
    ledger.record("path", host=target.name, member="m", copy_root=str(tmp_path / "elsewhere"),
                  path=str(tmp_path / "elsewhere" / "x"))
    ledger.record("process", host=target.name, member="m", copy_root=str(tmp_path / "elsewhere"),
                  pidfile=str(tmp_path / "elsewhere" / "p.pid"), **identity)
    ledger.record("process", host=target.name, member="m", copy_root=str(root), pidfile=f"{root}/.patchdrill/m.pid",
                  **identity)
    ledger.record("namespace", host=target.name, member="m", name=victim)

    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))

    assert not report.ok and not report.closed
    by_seq = {item.seq: item for item in report.items}
    assert "outside the copy root" in by_seq[1].action
    assert "no drill marker of this run" in by_seq[2].action
    assert "is not a copy root this drill's ledger recorded" in by_seq[3].action
    assert "is not a copy root this drill's ledger recorded" in by_seq[4].action
    assert f"refusing to signal pid {bystander.pid}" in by_seq[5].action
    assert f"namespace {victim} is not the one this run makes" in by_seq[6].action
    for seq in range(1, 7):
        assert by_seq[seq].action.startswith("refused:") and not by_seq[seq].verified, by_seq[seq]
    assert by_seq[0].verified  # the drill's own root went, its link with it, not what the link named
    assert (decoy / "keep.txt").read_text() == "precious"
    assert bystander.poll() is None and inside_victim.poll() is None
    assert victim in namespaces()
    assert not Ledger(store, run_id).is_closed()


def test_a_reused_pid_is_left_alone_and_counts_as_ours_gone(store: LocalBlobStore, run_id: str, guard: Guard,
                                                            tmp_path: Path, ssh_host_config: HostConfig) -> None:
    """The recorded pid now belongs to another process (its start time differs): cleanup must
    not signal it, and may call ours gone."""
    other = subprocess.Popen(["sleep", "300"])
    guard.keep_pid(other.pid)
    root = tmp_path / "reused"
    with SshConnector(ssh_host_config) as target:
        ledger = Ledger(store, run_id)
        claim_copy_root(target, ledger, member="m", root=str(root))
    ledger.record("process", host=target.name, member="m", copy_root=str(root), pidfile=f"{root}/.patchdrill/m.pid",
                  pid=other.pid, start_time=proc_start_time(other.pid) - 1,  # type: ignore[operator]
                  boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))
    assert report.ok, report.summary()
    process = report.items[0]
    assert f"pid {other.pid} now belongs to another process" in process.action
    assert "ours is gone" in process.evidence
    assert other.poll() is None


# -- the worst bug: a cleanup that reports success having done nothing ------------------------


def copy_with_a_disk(store: LocalBlobStore, run_id: str, config: HostConfig, root: Path) -> Path:
    """A claimed copy root on the sshd host holding one recorded, restored disk image."""
    with SshConnector(config) as target:
        ledger = Ledger(store, run_id)
        claim_copy_root(target, ledger, member="m", root=str(root))
        record_path(target, ledger, member="m", root=str(root), path=f"{root}/disk.img")
    (root / "disk.img").write_bytes(b"data")
    return root


def test_an_immutable_file_that_survives_removal_fails_the_cleanup(store: LocalBlobStore, run_id: str, guard: Guard,
                                                                   tmp_path: Path, ssh_host_config: HostConfig) -> None:
    root = copy_with_a_disk(store, run_id, ssh_host_config, tmp_path / "immutable")
    guard.paths.append(root)
    if subprocess.run(["chattr", "+i", str(root / "disk.img")], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support the immutable attribute")
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))
    assert not report.ok and not report.closed
    path, copy_root = report.items
    assert (path.kind, path.verified) == ("path", False)
    assert "removal failed: Operation not permitted" in path.action
    assert path.evidence == f"NOT gone: {root}/disk.img: present (file)"
    assert (copy_root.kind, copy_root.verified) == ("copy-root", False)
    assert "NOT gone" in report.summary()
    assert not Ledger(store, run_id).is_closed()


def test_a_process_that_survives_a_kill_that_claimed_success_fails_the_cleanup(
        store: LocalBlobStore, run_id: str, guard: Guard, tmp_path: Path, ssh_host_config: HostConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The process is real and ignores SIGTERM. SIGKILL cannot be blocked by any process on
    Linux, so "KILL is prevented" is simulated: the host script's stop step is replaced by one
    that signals nothing and reports the process stopped. Verification, which reads /proc on the
    target itself, must see it alive and fail both the process and its namespace."""
    target = SshConnector(ssh_host_config)
    ledger = Ledger(store, run_id)
    root = str(tmp_path / "stubborn")
    claim_copy_root(target, ledger, member="m", root=root)
    namespace = create_namespace(target, ledger, member="m")
    port = free_port("127.0.0.1")
    stubborn = ("python3 -c 'import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "s = socket.create_server((\"127.0.0.1\", {port})); time.sleep(600)'")
    started = start_copy(target, ledger, ControlSpec("process", stubborn),
                         CopyContext(member="m", root=root, port=port, namespace=namespace.name))
    assert wait_listening(target, port, namespace=namespace.name, timeout=30)
    target.close()
    pid = started.entry.pid  # type: ignore[union-attr]

    real = control.host_script

    def lying_stop(connector, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Reports every process stopped and signals none; deletes the namespace for real."""
        if args[0] == "stop":
            request = json.loads(args[2])
            return {"processes": [{**p, "was": "running", "signals": ["TERM", "KILL"], "alive_after": False}
                                  for p in request["processes"]], "pidfile": {"found": False}}
        if args[0] == "netns-remove":
            pids = [int(pid) for pid in connector.run(f"ip netns pids {args[1]}").stdout.split()]
            connector.run(f"ip netns del {args[1]}", check=True)
            return {"existed": True, "deleted": True, "error": None,
                    "stopped": [{"pid": pid, "start_time": proc_start_time(pid), "was": "running",
                                 "signals": ["TERM", "KILL"], "alive_after": False} for pid in pids]}
        return real(connector, *args, **kwargs)

    monkeypatch.setattr(control, "host_script", lying_stop)
    monkeypatch.setattr(isolation, "host_script", lying_stop)
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config), grace=1)

    assert not report.ok and not report.closed
    by_kind = {item.kind: item for item in report.items}
    assert not by_kind["process"].verified
    assert f"NOT gone: pid {pid}" in by_kind["process"].evidence
    assert not by_kind["namespace"].verified
    assert f"NOT gone: pid {pid}" in by_kind["namespace"].evidence
    assert proc_start_time(pid) is not None
    assert not Ledger(store, run_id).is_closed()


def test_a_path_recreated_after_its_removal_fails_the_cleanup(store: LocalBlobStore, run_id: str, guard: Guard,
                                                              tmp_path: Path, ssh_host_config: HostConfig,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Something on the target (simulated here: a wrapper around the removal that writes the
    file again, as a supervisor restoring it would) puts a removed path back before verification.
    The removal honestly said "removed"; the verification must still fail."""
    from tasks.drill import cleanup as cleanup_module

    root = copy_with_a_disk(store, run_id, ssh_host_config, tmp_path / "phoenix")
    real_remove = cleanup_module.remove_path

    def remove_then_restore(connector, entry, run):  # type: ignore[no-untyped-def]
        action = real_remove(connector, entry, run)
        root.mkdir(exist_ok=True)
        (root / "disk.img").write_bytes(b"back again")
        return action

    monkeypatch.setattr(cleanup_module, "remove_path", remove_then_restore)
    report = cleanup_run(store, run_id, lambda host: SshConnector(ssh_host_config))
    assert not report.ok
    assert [(item.kind, item.action, item.verified) for item in report.items] == [
        ("path", "removed", False), ("copy-root", "removed", False)]
    assert report.items[0].evidence == f"NOT gone: {root}/disk.img: present (file)"
    assert not Ledger(store, run_id).is_closed()


def test_an_unreachable_target_fails_the_cleanup_and_keeps_the_ledger_open(
        store: LocalBlobStore, run_id: str, tmp_path: Path, ssh_host_config: HostConfig) -> None:
    Ledger(store, run_id).record("namespace", host="dr-gone", member="m", name=namespace_name(run_id, "m"))

    def connect(host: str) -> SshConnector:
        raise KeyError(f"no host {host!r} in the inventory")

    report = cleanup_run(store, run_id, connect)
    assert not report.ok and not report.closed
    [item] = report.items
    assert "cannot open a connection to dr-gone" in item.action and item.evidence.startswith("NOT verified")


# -- the controller itself as the DR target (connectors/local.py) ----------------------------


@pytest.fixture
def controller() -> LocalConnector:
    return LocalConnector(HostConfig(name="controller-lab", transport="local"))


def test_the_controller_as_target_isolates_starts_and_cleans_up(controller: LocalConnector, store: LocalBlobStore,
                                                                 run_id: str, guard: Guard, tmp_path: Path) -> None:
    ledger = Ledger(store, run_id)
    # A copy root whose name a shell would trip over if anything forgot to quote it.
    root = str(tmp_path / "it's a copy; $(touch pwned) `x`")
    claim_copy_root(controller, ledger, member="app", root=root)
    namespace = create_namespace(controller, ledger, member="app")
    port = free_port("127.0.0.1")
    started = start_copy(controller, ledger, ControlSpec("process", HTTP_SERVER),
                         CopyContext(member="app", root=root, port=port, namespace=namespace.name))
    assert wait_listening(controller, port, namespace=namespace.name, timeout=30)
    production = Listener("127.0.0.1")
    try:
        # The copy's own port on loopback inside is the copy; production's loopback port is not there.
        proof = prove_isolation(controller, namespace, [("127.0.0.1", production.port)], copy_port=port)
    finally:
        production.close()
    assert proof.ok, proof.evidence
    report = cleanup_run(store, run_id, lambda host: controller, grace=5)
    assert report.ok, report.summary()
    assert [item.kind for item in report.items] == ["process", "namespace", "copy-root"]
    assert f"pid {started.entry.pid} (from the ledger)" in report.items[0].evidence  # type: ignore[union-attr]
    assert namespace.name not in namespaces() and not Path(root).exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store"]
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def test_a_copy_that_nothing_can_check_is_a_failure_not_a_success(controller: LocalConnector, store: LocalBlobStore,
                                                                  run_id: str, tmp_path: Path) -> None:
    """A free command with neither a verify command nor a port: its stop command ran and
    exited 0, yet nothing proves the copy stopped, so cleanup must not call it done."""
    ledger = Ledger(store, run_id)
    marker = tmp_path / "started"
    start_copy(controller, ledger, ControlSpec("command", f"touch {marker}", stop="true"),
               CopyContext(member="free", root=str(tmp_path)))
    assert marker.exists()
    report = cleanup_run(store, run_id, lambda host: controller)
    [item] = report.items
    assert item.action == "ran the stop command: exit 0"
    assert not item.verified and item.evidence == "NOT verified: nothing could be checked for this item"
    assert not report.ok and not report.closed


def test_a_command_copy_proven_stopped_by_its_verify_command(controller: LocalConnector, store: LocalBlobStore,
                                                             run_id: str, tmp_path: Path) -> None:
    ledger = Ledger(store, run_id)
    flag = tmp_path / "running"
    spec = ControlSpec("command", "touch {root}/running", stop="rm -f {root}/running", verify="test ! -e {root}/running")
    start_copy(controller, ledger, spec, CopyContext(member="free", root=str(tmp_path)))
    assert flag.exists()
    report = cleanup_run(store, run_id, lambda host: controller)
    assert report.ok and report.closed, report.summary()
    assert "the verify command says the copy is stopped" in report.items[0].evidence
    assert not flag.exists()
