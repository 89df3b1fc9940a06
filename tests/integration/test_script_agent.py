"""The script agent (connectors/agent.py) on real hosts: the controller itself through the local
connector and a real OpenSSH server (tests/hosts/sshd.py, root on this machine), plainly and
inside a real network namespace. Its answers must be the ones a fresh interpreter gives, it must
act inside its namespace, and it must not outlive its caller.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from configs.models import HostConfig
from connectors import connect
from connectors.agent import AGENT_SCRIPT, ScriptAgent
from connectors.base import Connector, HostUnreachable
from connectors.local import LocalConnector, LocalSettings
from tasks.drill.target import HOST_SCRIPT, Refused, host_script, in_namespace

pytestmark = pytest.mark.integration
#: A line of the agent's source, which is its command line: how its processes are found.
MARKER = AGENT_SCRIPT.read_text().splitlines()[0].strip('"')
HANG_GUARD = 30.0


@pytest.fixture(params=["local", "ssh"])
def host(request: pytest.FixtureRequest, ssh_host_config: HostConfig) -> Iterator[Connector]:
    connector = LocalConnector(LocalSettings(name="controller")) if request.param == "local" \
        else connect(ssh_host_config)
    yield connector
    connector.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"pd-agent-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    yield name
    for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], check=True)


def agent_pids() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if MARKER.encode() in handle.read():
                        found.add(int(entry))
            except OSError:
                continue
    return found


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def without_timing(answer: dict[str, object]) -> str:
    return json.dumps(answer, sort_keys=True, default=str).replace("seconds", "").translate(str.maketrans("", "", "0123456789."))


def test_answers_are_those_of_a_fresh_interpreter_refusals_and_failures_included(host: Connector) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    calls = [("connect", "1", f"127.0.0.1:{port}", "127.0.0.1:1"), ("checks", json.dumps([{"kind": "boot"}]))]
    before = agent_pids()
    try:
        with ScriptAgent.start(host) as agent:
            for call in calls:
                assert without_timing(host_script(host, *call, agent=agent)) == without_timing(host_script(host, *call))
            assert agent.running and len(agent_pids() - before) == 1, "one agent answered every call"
            answer = host_script(host, "connect", "1", f"127.0.0.1:{port}", agent=agent)["results"][0]
            assert answer["connected"] is True
            # Exit statuses and messages come through as a fresh interpreter's would.
            direct = agent.run_script(HOST_SCRIPT, ["nonsense"], timeout=30)
            assert direct.exit_code == 2 and "unknown subcommand 'nonsense'" in direct.stderr
            with pytest.raises(Refused, match="outside the copy root"):
                host_script(host, "remove", "/nonexistent-root", "run-x", "/etc/hostname", agent=agent)
            assert agent.running, "a script's failure must not end the agent"
    finally:
        listener.close()
    wait_until(lambda: not (agent_pids() - before), "the agent outlived close()")


def test_inside_a_namespace_the_agent_sees_only_the_namespace_and_starts_processes_there(
        host: Connector, namespace: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    outside_port = listener.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        with ScriptAgent.start(host, in_namespace(namespace, "").strip()) as agent:
            seen = host_script(host, "connect", "1", f"127.0.0.1:{outside_port}", agent=agent)["results"][0]
            assert seen["connected"] is False and seen["errno"] == "ECONNREFUSED"
            root = f"/tmp/pd-agent-{uuid.uuid4().hex[:8]}"
            started = host_script(host, "start", f"{root}/app.pid", f"{root}/app.log", "/",
                                  f"python3 -m http.server {port} --bind 127.0.0.1", f"127.0.0.1:{port}", "30",
                                  agent=agent)
            try:
                assert started["wait"]["connected"] is True and started["wait"]["exited"] is None
                assert os.stat(f"/proc/{started['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
                # Outside the namespace nothing listens on that port.
                with socket.socket() as outside:
                    assert outside.connect_ex(("127.0.0.1", port)) != 0
            finally:
                os.kill(started["pid"], signal.SIGKILL)
                subprocess.run(["rm", "-rf", root], check=False)
    finally:
        listener.close()


@pytest.mark.parametrize("through_agent", [True, False], ids=["agent", "fresh"])
def test_a_copy_that_exits_ends_its_ready_wait_at_once_with_its_status(host: Connector, namespace: str,
                                                                       through_agent: bool) -> None:
    root = f"/tmp/pd-agent-{uuid.uuid4().hex[:8]}"
    agent = ScriptAgent.start(host, in_namespace(namespace, "").strip()) if through_agent else None
    try:
        started = time.monotonic()
        answer = host_script(host, "start", f"{root}/app.pid", f"{root}/app.log", "/", "sh -c 'exit 7'",
                             "127.0.0.1:9", "600", namespace=namespace, agent=agent)
        assert answer["wait"] == {**answer["wait"], "connected": False, "exited": 7}
        assert time.monotonic() - started < 600, "the wait ran to its timeout"
    finally:
        if agent is not None:
            agent.close()
        subprocess.run(["rm", "-rf", root], check=False)


def test_a_dropped_ssh_connection_ends_the_agent(ssh_host_config: HostConfig) -> None:
    before = agent_pids()
    connector = connect(ssh_host_config)
    agent = ScriptAgent.start(connector)
    assert host_script(connector, "checks", json.dumps([{"kind": "boot"}]), agent=agent)["results"][0]["boot_id"]
    assert len(agent_pids() - before) == 1
    connector.close()  # the controller's side goes away without closing the agent
    wait_until(lambda: not (agent_pids() - before), "the agent outlived its SSH connection")


def test_a_killed_agent_fails_the_call_it_ran_and_later_calls_run_afresh(host: Connector) -> None:
    before = agent_pids()
    with ScriptAgent.start(host) as agent:
        assert host_script(host, "checks", json.dumps([{"kind": "boot"}]), agent=agent)
        (pid,) = agent_pids() - before
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pid not in agent_pids(), "the killed agent is still there")
        # The request may have reached it before it died: it is reported, never sent again.
        try:
            host_script(host, "checks", json.dumps([{"kind": "boot"}]), agent=agent)
        except HostUnreachable as exc:
            assert "not re-run" in str(exc)
        assert not agent.running
        assert host_script(host, "checks", json.dumps([{"kind": "boot"}]), agent=agent)["results"][0]["boot_id"]
