"""Stopping a backup or a restore part-way, as an operator does: Ctrl-C (SIGINT to the command's
whole process group, as a terminal sends it), SIGTERM (to the command alone, as `kill` does),
a second signal, and a cancellation through a real Prefect server of a run in a served process.

Everything is real: the `patchdrill` command in a subprocess on Prefect's temporary API server,
a 1 GiB random image in a local store (big enough to be mid-upload when the signal lands; the
product is not slowed down), pre/post snapshot scripts that leave a mark when the snapshot is
removed. No test measures time: each waits for an observable state with a deadline that only
guards against a hang.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import anyio
import pytest
import yaml

from cli.temporary_server import APP_FACTORY
from tests.alert_checks import alerts_section
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.hosts.webhook import WebhookReceiver

REPO = Path(__file__).resolve().parents[2]
PATCHDRILL = Path(sys.executable).with_name("patchdrill")
MIB = 1024 * 1024
IMAGE_MIB = 1024
BLOCK = MIB
HANG_GUARD = 300.0
pytestmark = pytest.mark.e2e
Cli = Callable[..., tuple[int, str, str]]


@dataclass(frozen=True)
class Lab:
    root: Path
    image: Path
    prefect_home: Path

    def config(self, name: str, *, image: Path | None = None, alerts: bool = False) -> Path:
        """A config with a store of its own (so each test starts without points) on the shared
        image (or `image`), posting alerts to the test's webhook receiver if asked."""
        cfg = self.root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            **({"alerts": alerts_section()} if alerts else {}),
            "storage": {"kind": "local", "path": f"store-{name}"},
            "hosts": [{"name": "lab-1", "transport": "local",
                       "disks": [{"name": "os", "path": str(image or self.image), "kind": "block"}]}],
            "backup_policies": {"default": {
                "block_size": BLOCK, "workers": 2, "snapshot_method": "none",
                # The post-script runs when the snapshot is removed: its mark proves removal ran.
                "pre_script": "true", "post_script": f"touch {self.root / f'{name}.snapshot-removed'}"}},
        }))
        return cfg

    def store(self, name: str) -> Path:
        return self.root / f"store-{name}"

    def snapshot_removed(self, name: str) -> bool:
        return (self.root / f"{name}.snapshot-removed").exists()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("stop")
    image = root / "disk.img"
    with open(image, "wb") as handle:
        for _ in range(IMAGE_MIB // 4):
            handle.write(os.urandom(4 * MIB))
    return Lab(root, image, root / "prefect-home")


def _env(lab: Lab, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(lab.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # The command's own temporary server, which must end with it; the background server,
           # which must not, is stopped the same way in test_background_server.py.
           "PATCHDRILL_SERVER": "temporary", **extra}
    if "PREFECT_API_URL" not in extra:
        env.pop("PREFECT_API_URL", None)  # no configured server, as on a fresh machine
    return env


#: what the test started, each as (still running and still that process?, kill it)
_launched: list[tuple[Callable[[], bool], Callable[[], None]]] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Whatever a failing test leaves running (the command, its temporary server) is killed."""
    yield
    for still_ours, kill in _launched:
        if still_ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill()
    _launched.clear()


def _launch(process: subprocess.Popen[bytes]) -> None:
    """Track a process started in a session of its own: it and its group are killed after a failure."""
    _launched.append((lambda: process.poll() is None, lambda: os.killpg(process.pid, signal.SIGKILL)))


@dataclass
class Command:
    process: subprocess.Popen[bytes]
    stderr: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")


def _start(lab: Lab, name: str, *args: str) -> Command:
    # A session of its own, so a process-group signal reaches the command and what it started,
    # as Ctrl-C at a terminal does, and nothing of the test's. stderr goes to a file the test
    # can read while the command runs.
    stderr = lab.root / f"{name}.stderr"
    with open(stderr, "wb") as sink:
        process = subprocess.Popen([str(PATCHDRILL), *args], cwd=lab.root, env=_env(lab), stdout=subprocess.DEVNULL,
                                   stderr=sink, start_new_session=True)
    _launch(process)
    return Command(process, stderr)


def _wait_for(what: str, condition: Callable[[], bool], command: Command | None = None) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if command is not None and command.process.poll() is not None:
            pytest.fail(f"exited ({command.process.returncode}) before {what}: {command.err()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"never saw {what}")
        time.sleep(0.02)


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is pid, with their command lines."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _ended(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting for whoever inherited it to reap it)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _is_server(pid: int) -> bool:
    try:
        return not _ended(pid) and APP_FACTORY.encode() in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _server_of(command: Command) -> list[int]:
    servers = [pid for pid, cmdline in _children(command.pid).items() if APP_FACTORY in cmdline]
    assert servers, f"the command runs no temporary Prefect server: {_children(command.pid)}"
    # Not the test's child, so recognised by its command line before it is killed.
    _launched.extend((lambda pid=pid: _is_server(pid), lambda pid=pid: os.kill(pid, signal.SIGKILL))
                     for pid in servers)
    return servers


def _send(command: Command, signum: int) -> None:
    if signum == signal.SIGINT:
        os.killpg(command.pid, signum)  # Ctrl-C: the terminal signals the whole foreground group
    else:
        os.kill(command.pid, signum)  # kill PID


def _finish(command: Command) -> tuple[int, str]:
    code = command.process.wait(timeout=HANG_GUARD)
    return code, command.err()


def _unlocked(cli: Cli, lab: Lab, cfg: Path) -> None:
    """No lock left behind: prune, which waits for no lock and excludes every other, runs now. It
    runs in this process on the test server: the command under test is the one that needs its own."""
    code, _, err = cli("prune", "-c", str(cfg))
    assert code == 0, err
    assert not _files(lab.store(cfg.stem) / "locks")


@pytest.fixture(scope="module")
def restorable(lab: Lab) -> Path:
    """A config whose store holds one point of the image, made without Prefect (it is not what
    these tests are about)."""
    from configs.loader import load_config
    from tasks.backup.policy import policy_from_config
    from tasks.backup.disk import back_up_disk

    cfg = lab.config("restore")
    loaded = load_config(cfg)
    [host] = loaded.config.hosts
    back_up_disk(loaded.config.storage, loaded.base_dir, host, host.disks[0], policy_from_config(loaded.config.backup_policies, None))
    return cfg


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512 if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_a_backup_cleanly(prefect_server: None, cli: Cli, lab: Lab, signum: int,
                                         webhook: WebhookReceiver) -> None:
    name = f"backup-{signal.Signals(signum).name.lower()}"
    cfg = lab.config(name, alerts=True)
    command = _start(lab, name, "backup", "-c", str(cfg))
    chunks = lab.store(name) / "chunks"
    _wait_for("the upload start", lambda: bool(_files(chunks)), command)
    servers = _server_of(command)

    _send(command, signum)
    code, err = _finish(command)

    assert code == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}: stopped cleanly, no recovery point written for lab-1/os" in err
    assert "Traceback" not in err
    assert not _files(lab.store(name) / "points")
    assert len(_files(chunks)) < IMAGE_MIB * MIB // BLOCK, "the upload ran to the end"
    assert lab.snapshot_removed(name)
    assert all(_ended(pid) for pid in servers), "the temporary Prefect server outlived the command"
    _unlocked(cli, lab, cfg)
    # Stopped by its operator, not failed: no alert (the hook would have posted before the exit).
    assert webhook.received() == []


def test_a_failed_cli_run_without_a_prefect_server_alerts_the_webhook(lab: Lab, webhook: WebhookReceiver) -> None:
    """The ad-hoc path: no PREFECT_API_URL, the command's own temporary API; the flow's failure
    hook posts before the command exits."""
    cfg = lab.config("missing-disk", image=lab.root / "no-such.img", alerts=True)
    failed = subprocess.run([str(PATCHDRILL), "backup", "-c", str(cfg)], cwd=lab.root, env=_env(lab),
                            capture_output=True, text=True, timeout=HANG_GUARD)
    assert failed.returncode == 1, failed.stderr
    [post] = webhook.received("patchdrill.run.failed")
    assert post["payload"]["flow"] == "backup-run" and "lab-1/os" in post["payload"]["message"]
    assert webhook.token not in failed.stdout + failed.stderr


@pytest.mark.parametrize("what", ["backup", "restore"])
def test_a_second_signal_exits_at_once(lab: Lab, restorable: Path, what: str) -> None:
    name = f"{what}-twice"
    if what == "backup":
        cfg = lab.config(name)
        command = _start(lab, name, "backup", "-c", str(cfg))
        _wait_for("the upload start", lambda: bool(_files(lab.store(name) / "chunks")), command)
    else:
        target = lab.root / f"{name}.img"
        command = _start(lab, name, "restore", "lab-1", "os", str(target), "-c", str(restorable))
        _wait_for("the restore writing", lambda: any(_allocated(p) for p in lab.root.glob(f".{target.name}.*")),
                  command)
    servers = _server_of(command)

    _send(command, signal.SIGINT)
    _wait_for("the stop to begin", lambda: "stopping cleanly" in command.err(), command)
    _send(command, signal.SIGTERM)
    code, err = _finish(command)

    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM again: exiting at once" in err
    assert "Stopping temporary server" not in err, "exited through the normal teardown, not at once"
    assert all(_ended(pid) for pid in servers), "the temporary Prefect server outlived the command"
    if what == "backup":
        assert not _files(lab.store(name) / "points")


def test_ctrl_c_stops_a_restore_and_leaves_no_target_and_no_temporary_file(prefect_server: None, cli: Cli, lab: Lab,
                                                                           restorable: Path) -> None:
    target = lab.root / "restored-new.img"
    command = _start(lab, "restore-new", "restore", "lab-1", "os", str(target), "-c", str(restorable))
    temporary = lambda: list(lab.root.glob(f".{target.name}.*"))  # noqa: E731
    _wait_for("the restore writing", lambda: any(_allocated(p) for p in temporary()), command)
    servers = _server_of(command)

    _send(command, signal.SIGINT)
    code, err = _finish(command)

    assert code == 130, err
    assert f"stopped; {target} was not created and nothing is left behind" in err
    assert not target.exists() and not temporary()
    assert all(_ended(pid) for pid in servers), "the temporary Prefect server outlived the command"
    _unlocked(cli, lab, restorable)


def test_sigterm_stops_a_forced_restore_in_place_and_says_so(lab: Lab, restorable: Path) -> None:
    target = lab.root / "restored-in-place.img"
    with open(target, "wb") as handle:
        handle.truncate(IMAGE_MIB * MIB)  # sparse: every block differs from the point
    command = _start(lab, "restore-in-place", "restore", "lab-1", "os", str(target), "--force", "-c", str(restorable))
    _wait_for("the restore writing", lambda: _allocated(target) > 0, command)
    servers = _server_of(command)

    _send(command, signal.SIGTERM)
    code, err = _finish(command)

    assert code == 143, err
    assert f"stopped part-way; {target} was being overwritten in place" in err and "run the restore again" in err
    assert _allocated(target) < IMAGE_MIB * MIB, "the restore ran to the end"
    assert not list(lab.root.glob(f".{target.name}.*"))
    assert all(_ended(pid) for pid in servers), "the temporary Prefect server outlived the command"

    again = subprocess.run([str(PATCHDRILL), "restore", "lab-1", "os", str(target), "--force", "-c", str(restorable)],
                           cwd=lab.root, env=_env(lab), capture_output=True, text=True, timeout=HANG_GUARD)
    assert again.returncode == 0, again.stderr
    assert filecmp.cmp(target, lab.image, shallow=False)


def test_a_prefect_cancellation_stops_a_served_backup(prefect_server: None, cli: Cli, lab: Lab) -> None:
    """Cancelled as the UI cancels (the run set to Cancelling on the server), with the run in a
    process started by `serve()`, whose runner then sends that process SIGTERM."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.client.schemas.objects import State
    from prefect.states import Cancelling

    cfg = lab.config("served")
    env = _env(lab, PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(lab.root / "serve.stderr", "wb") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-c", "from flows.backup import backup_run; backup_run.serve(name='stop-test')"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    _launch(serve)
    try:
        async def deployed() -> bool:
            async with get_client() as client:
                return any(d.name == "stop-test" for d in await client.read_deployments())

        _wait_for("the served deployment", lambda: anyio.run(deployed))
        run = run_deployment("backup-run/stop-test", parameters={"config_path": str(cfg)}, timeout=0)
        chunks = lab.store("served") / "chunks"
        _wait_for("the upload start", lambda: bool(_files(chunks)))

        async def cancel() -> None:
            async with get_client() as client:
                await client.set_flow_run_state(run.id, Cancelling())

        async def state() -> State:
            async with get_client() as client:
                found = (await client.read_flow_run(run.id)).state
            assert found is not None
            return found

        anyio.run(cancel)
        _wait_for("the run's final state", lambda: anyio.run(state).is_final())
        final = anyio.run(state)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=HANG_GUARD)

    assert final.is_cancelled(), (final, (lab.root / "serve.stderr").read_text()[-3000:])
    assert not _files(lab.store("served") / "points")
    assert len(_files(chunks)) < IMAGE_MIB * MIB // BLOCK, "the upload ran to the end"
    assert lab.snapshot_removed("served")
    _unlocked(cli, lab, cfg)
