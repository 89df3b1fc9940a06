"""Ad-hoc commands on patchdrill's background Prefect server (cli/api.py, cli/server_daemon.py).

Everything is real: the installed `patchdrill` command in subprocesses, with no PREFECT_API_URL
and a PREFECT_HOME of the module's own, so the first command starts the background server (a
real Prefect API on SQLite) and later ones reuse it; runs are read back from it through
Prefect's client. The tests share the module's home (its database is made once) and, where
they can, its running server; the kill -9 and idle tests start one more each.
No test measures time: waits have deadlines that only guard against a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anyio
import pytest
import yaml

PATCHDRILL = Path(sys.executable).with_name("patchdrill")
HANG_GUARD = 300.0
MIB = 1024 * 1024
# Big enough to be mid-upload when the signal lands (as in test_stop_signals.py).
IMAGE_MIB = 512
pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Lab:
    root: Path
    home: Path

    @property
    def state_file(self) -> Path:
        return self.home / "patchdrill" / "server" / "server.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "PATCHDRILL_SERVER"))}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PATCHDRILL), *args], cwd=self.root, env=self.env(**extra), capture_output=True,
                              text=True, timeout=HANG_GUARD)

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    @property
    def warm_file(self) -> Path:
        return self.home / "patchdrill" / "server" / "warm.json"

    def warm(self) -> dict[str, Any]:
        """The warm process's state once it serves (cli/warm.py): started after a command's run."""
        _wait_for("the warm process", lambda: self.warm_file.exists() and _alive(json.loads(self.warm_file.read_text())["pid"]))
        return json.loads(self.warm_file.read_text())

    def config(self, name: str, disk: Path, **policy: Any) -> Path:
        cfg = self.root / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({
            "storage": {"kind": "local", "path": f"store-{name}"},
            "hosts": [{"name": "lab-1", "transport": "local", "disks": [
                {"name": "data", "path": str(disk), "kind": "block" if disk.suffix == ".img" else "directory"}]}],
            "backup_policies": {"default": {"snapshot_method": "none", **policy}},
        }))
        return cfg


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never saw {what}")
        time.sleep(0.05)


def _stop_server(lab: Lab) -> None:
    """Whatever background server a test left behind is stopped (and killed if it must be)."""
    with contextlib.suppress(OSError, ValueError):
        pid = lab.state()["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("background")
    (root / "data").mkdir()
    (root / "data" / "hello.txt").write_text("hello\n")
    lab = Lab(root, root / "prefect-home")
    yield lab
    _stop_server(lab)


def _runs(url: str) -> list[tuple[str, Any]]:
    """Every flow run the server at url holds, oldest first: its flow's name and its state."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> list[tuple[str, Any]]:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            async with get_client() as client:
                runs = await client.read_flow_runs()
                names = {f.id: f.name for f in await client.read_flows()}
        return [(names[r.flow_id], r.state) for r in sorted(runs, key=lambda r: r.created)]

    return anyio.run(read)


def _ensure_server(lab: Lab) -> None:
    if not lab.state_file.exists():
        done = lab.run("backup", "-c", str(lab.config("warm-up", lab.root / "data")))
        assert done.returncode == 0, done.stderr


def test_the_first_command_starts_the_server_and_the_next_reuses_it(lab: Lab) -> None:
    """Also: a failed run exits non-zero and is Failed on the server, a completed one Completed."""
    first = lab.run("backup", "-c", str(lab.config("reuse", lab.root / "data")))
    assert first.returncode == 0, first.stderr
    assert "starting patchdrill's background Prefect server" in first.stderr
    started = lab.state()

    second = lab.run("backup", "-c", str(lab.config("missing", lab.root / "no-such-disk")))
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    assert "starting patchdrill's background Prefect server" not in second.stderr
    assert lab.state() == started, "the second command started another server"
    assert _alive(started["pid"])

    runs = _runs(started["url"])
    assert [flow for flow, _ in runs] == ["backup-run", "backup-run"]
    assert runs[0][1].is_completed() and runs[1][1].is_failed()


def test_the_state_file_of_a_killed_server_is_recovered_from(lab: Lab) -> None:
    _ensure_server(lab)
    killed = lab.state()
    os.kill(killed["pid"], signal.SIGKILL)
    _wait_for("the killed server to end", lambda: not _alive(killed["pid"]))
    assert lab.state_file.exists(), "the state file of a killed server is what this test is about"

    done = lab.run("--log-json", "backup", "-c", str(lab.config("after-kill", lab.root / "data")))
    assert done.returncode == 0, done.stderr
    [starting] = [event for event in map(json.loads, done.stderr.splitlines()) if event["event"] == "server.starting"]
    fresh = lab.state()
    assert starting["pid"] == fresh["pid"]
    assert fresh["pid"] != killed["pid"] and _alive(fresh["pid"])
    flow, state = _runs(fresh["url"])[-1]
    assert flow == "backup-run" and state.is_completed()


def _random_image(path: Path) -> Path:
    """An image of IMAGE_MIB that does not compress: a backup of it is still uploading when a test acts."""
    with open(path, "wb") as handle:
        for _ in range(IMAGE_MIB // 4):
            handle.write(os.urandom(4 * MIB))
    return path


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_ctrl_c_cancels_the_run_on_the_background_server_and_keeps_the_server(lab: Lab) -> None:
    """Through the warm process (cli/warm.py), as every command after the first runs: the
    terminal's Ctrl-C reaches the caller, which forwards it to the command's process group."""
    _ensure_server(lab)
    warm = lab.warm()
    image = _random_image(lab.root / "disk.img")
    cfg = lab.config("ctrl-c", image, block_size=MIB, workers=1)
    stderr = lab.root / "ctrl-c.stderr"
    with open(stderr, "wb") as sink:
        command = subprocess.Popen([str(PATCHDRILL), "backup", "-c", str(cfg)], cwd=lab.root, env=lab.env(),
                                   stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    try:
        chunks = lab.root / "store-ctrl-c" / "chunks"
        _wait_for("the upload start", lambda: chunks.exists() and any(p.is_file() for p in chunks.rglob("*")))
        os.killpg(command.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
        code = command.wait(timeout=HANG_GUARD)
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
    err = stderr.read_text()
    assert code == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    server = lab.state()
    assert _alive(server["pid"]), "Ctrl-C at the terminal reached the background server"
    flow, state = _runs(server["url"])[-1]
    assert flow == "backup-run" and state.is_cancelled(), state
    with contextlib.suppress(ProcessLookupError):
        os.killpg(command.pid, 0)
        pytest.fail("something the command started outlived it")
    assert lab.warm()["served"] == warm["served"] + 1, "the command did not run in the warm process"
    _wait_for("the command's process to end", lambda: not _children(warm["pid"]))


def test_server_stop_leaves_nothing_running(lab: Lab) -> None:
    _ensure_server(lab)
    server = lab.state()
    warm = lab.warm()
    status = json.loads(lab.run("server", "status", "--json").stdout)
    assert status["background"]["pid"] == server["pid"] and status["background"]["answers"]
    assert status["warm"]["pid"] == warm["pid"]
    done = lab.run("server", "stop")
    assert done.returncode == 0, done.stderr
    assert f"stopped the background server (pid {server['pid']})" in done.stdout
    assert not _alive(server["pid"]) and not lab.state_file.exists()
    _wait_for("the warm process to stop", lambda: not _alive(warm["pid"]))
    assert not lab.warm_file.exists() and not Path(warm["socket"]).exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server["port"])) != 0, "the server's port still answers"


def test_a_configured_server_that_does_not_answer_is_one_line(lab: Lab) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    done = lab.run("backup", "-c", str(lab.config("down", lab.root / "data")), PREFECT_API_URL=url)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("error:") and url in line and "PREFECT_API_URL" in line
    assert not lab.state_file.exists(), "it fell back to the background server"


def test_an_idle_background_server_stops_by_itself(lab: Lab) -> None:
    """On the module's home, whose database is already made: only the server's start is paid."""
    _stop_server(lab)
    done = lab.run("backup", "-c", str(lab.config("idle", lab.root / "data")), PATCHDRILL_SERVER_IDLE_MINUTES="0.2")
    assert done.returncode == 0, done.stderr
    server = lab.state()
    assert server["idle_minutes"] == 0.2
    _wait_for("the idle server to stop", lambda: not _alive(server["pid"]))
    assert not lab.state_file.exists()
    assert "idle for 0.2 min: stopping" in (lab.home / "patchdrill" / "server" / "server.log").read_text()


# --------------------------------------------------------------------------- the warm process


def test_commands_after_the_first_run_in_the_warm_process_from_the_callers_directory(lab: Lab) -> None:
    """The caller's working directory (a relative config), its standard input (a config read
    from /dev/stdin), output, error and exit codes are the command's, as in a process of its own."""
    _ensure_server(lab)
    served = lab.warm()["served"]
    lab.config("relative", lab.root / "data")
    done = lab.run("backup", "-c", "relative.yaml", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["host"] == "lab-1"
    failed = lab.run("backup", "-c", str(lab.config("warm-missing", lab.root / "no-such-disk")))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "no-such-disk" in failed.stderr
    piped = subprocess.run([str(PATCHDRILL), "config", "check", "/dev/stdin"], cwd=lab.root, env=lab.env(),
                           input=(lab.root / "relative.yaml").read_text(), capture_output=True, text=True,
                           timeout=HANG_GUARD)
    assert piped.returncode == 0 and piped.stdout.startswith("ok /dev/stdin: 1 hosts"), piped.stdout + piped.stderr
    assert lab.warm()["served"] == served + 3
    runs = _runs(lab.state()["url"])
    assert [state.type.value for _, state in runs[-2:]] == ["COMPLETED", "FAILED"]


def test_a_terminal_at_the_callers_stdin_is_fed_through(lab: Lab) -> None:
    """A terminal (a real pseudo-terminal here) is read by the caller and fed to the command:
    what is typed reaches it, and end of input (Ctrl-D) ends it."""
    import pty

    _ensure_server(lab)
    served = lab.warm()["served"]
    master, slave = pty.openpty()
    try:
        command = subprocess.Popen([str(PATCHDRILL), "config", "check", "/dev/stdin"], cwd=lab.root, env=lab.env(),
                                   stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(slave)
        for line in lab.config("typed", lab.root / "data").read_text().splitlines():
            os.write(master, line.encode() + b"\n")
        os.write(master, b"\x04")
        out, err = command.communicate(timeout=HANG_GUARD)
    finally:
        os.close(master)
    assert command.returncode == 0 and out.startswith("ok /dev/stdin: 1 hosts"), out + err
    assert lab.warm()["served"] == served + 1


def test_a_killed_caller_stops_its_command_cleanly(lab: Lab) -> None:
    """kill -9 of `patchdrill` leaves its command without anyone to report to: it stops as on
    SIGTERM (the run Cancelled, no partial point), instead of running on unseen."""
    _ensure_server(lab)
    warm = lab.warm()
    image = _random_image(lab.root / "killed.img")
    cfg = lab.config("killed", image, block_size=MIB, workers=1)
    command = subprocess.Popen([str(PATCHDRILL), "backup", "-c", str(cfg)], cwd=lab.root, env=lab.env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    chunks = lab.root / "store-killed" / "chunks"
    _wait_for("the upload start", lambda: chunks.exists() and any(p.is_file() for p in chunks.rglob("*")))
    [child] = _children(warm["pid"])
    command.kill()
    command.wait(timeout=HANG_GUARD)
    _wait_for("the orphaned command to stop", lambda: not _alive(child))
    flow, state = _runs(lab.state()["url"])[-1]
    assert flow == "backup-run" and state.is_cancelled(), state
    assert not list((lab.root / "store-killed").glob("points/**/*.json")), "a point was written by a stopped backup"


def test_another_environment_runs_in_a_process_of_its_own(lab: Lab) -> None:
    """A PREFECT_*/PATCHDRILL_* variable is read on import: a caller whose differ from the warm
    process's is not served by it, and the command still runs (PATCHDRILL_WARM=0 too). The last
    test of the module: the other environment's command leaves a warm process of its own."""
    _ensure_server(lab)
    lab.warm()
    log = lab.home / "patchdrill" / "server" / "warm.log"
    off = lab.run("backup", "-c", str(lab.config("warm-off", lab.root / "data")), PATCHDRILL_WARM="0")
    assert off.returncode == 0, off.stderr
    done = lab.run("backup", "-c", str(lab.config("other-env", lab.root / "data")), PATCHDRILL_APPROVAL_POLL_SECONDS="3")
    assert done.returncode == 0, done.stderr
    served = log.read_text()
    assert "relative.yaml" in served, "the log names no command the warm process ran"
    assert "warm-off.yaml" not in served and "other-env.yaml" not in served


def test_an_ad_hoc_command_reports_to_the_server_make_server_recorded(
        prefect_server: None, tmp_path: Path, lab: Lab) -> None:
    """`make server` records itself (cli/api.py record_lab_server); a command with no
    PREFECT_API_URL finds the record and runs there, so its run is in that server's UI history.
    The recorded server is the session's real Prefect test server, the recording process this one."""
    from prefect.settings import PREFECT_API_URL

    from cli.server_daemon import write_state

    url = str(PREFECT_API_URL.value())
    home = tmp_path / "home-with-lab-record"
    (home / "patchdrill").mkdir(parents=True)
    write_state(home / "patchdrill" / "lab-server.json", {"url": url, "pid": os.getpid()})
    cfg = lab.config("recorded", lab.root / "data")
    env = {**lab.env(), "PREFECT_HOME": str(home)}
    done = subprocess.run([str(PATCHDRILL), "backup", "-c", str(cfg)], cwd=lab.root, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr
    assert "starting patchdrill's background Prefect server" not in done.stderr
    assert not (home / "patchdrill" / "server" / "server.json").exists(), "it started a background server"

    async def runs_of_this_config() -> list[Any]:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return [r for r in await client.read_flow_runs() if r.parameters.get("config_path") == str(cfg)]

    [run] = anyio.run(runs_of_this_config)
    assert run.state is not None and run.state.is_completed()
