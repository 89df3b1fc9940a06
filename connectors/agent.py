"""A script agent: one Python interpreter left running on a Linux host (inside a network
namespace when asked) that runs the project's own host scripts on request.

A host script normally costs a new interpreter per call (`python3 - ARGS`, tens of
milliseconds, more inside `ip netns exec`). Where one place takes many calls in a row and each
is on a clock (a drill's start, wait and probes count against its RTO), the agent answers each
in about a millisecond, with the same CommandResult a fresh interpreter would give.

Only the project's host scripts (standard library only, no stdin) run in it; a user's script
still gets its own interpreter. An agent that cannot start, or whose connection broke before a
request went out, hands the request to a fresh interpreter instead; one that broke or timed out
while a request ran raises as a command would (a request is never sent twice: it may not be
idempotent).
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path

import structlog

from connectors.base import (
    HOST_PYTHON, CommandResult, CommandStream, Connector, ConnectorError, HostTimeout, HostUnreachable,
    is_own_host_script, script_source,
)

log = structlog.stdlib.get_logger("patchdrill.connectors")

AGENT_SCRIPT = Path(__file__).parent / "host_scripts" / "script_agent.py"
#: The interpreter flags of HOST_PYTHON, without its "-" (the agent comes with -c).
_FLAGS = [flag for flag in HOST_PYTHON[1:] if flag != "-"]


def run_afresh(connector: Connector, script: Path, args: list[str], *, prefix: str = "", timeout: float,
               interpreter: list[str] = HOST_PYTHON) -> CommandResult:
    """script ARGS in an interpreter of its own on the connector's host, behind prefix (e.g.
    `ip netns exec NAME`), the script's text on its standard input: what an agent's call
    answers as, started afresh."""
    command = " ".join(filter(None, [prefix, shlex.join([*interpreter, *map(str, args)])]))
    return connector.run(command, timeout=timeout, stdin=script_source(script)[1].encode("utf-8"))


class ScriptAgent:
    """Runs own host scripts on one host, behind `prefix` (e.g. `ip netns exec NAME`)."""

    def __init__(self, connector: Connector, prefix: str = "") -> None:
        self.connector = connector
        self.prefix = prefix
        self._stream: CommandStream | None = None
        self._sent: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def start(cls, connector: Connector, prefix: str = "") -> "ScriptAgent":
        """An agent on the connector's host; one that could not start runs each script afresh."""
        agent = cls(connector, prefix)
        if connector.os_family != "linux":
            return agent
        command = " ".join(filter(None, [prefix, shlex.join([HOST_PYTHON[0], *_FLAGS, "-c", AGENT_SCRIPT.read_text()]),
                                         "2>/dev/null"]))
        try:
            agent._stream = connector.open_stream(command)
        except (NotImplementedError, ConnectorError) as exc:
            log.info("agent.unavailable", host=connector.name, reason=str(exc))
        return agent

    @property
    def running(self) -> bool:
        return self._stream is not None

    def load(self, *scripts: Path, timeout: float = 60.0) -> None:
        """Load scripts ahead of their calls (their imports run now, off a timed path)."""
        for script in scripts:
            self._call(script, None, timeout)

    def run_script(self, script: Path, args: list[str], *, timeout: float) -> CommandResult:
        """script ARGS as `python3 - ARGS` behind the prefix would run them."""
        return self._call(script, [str(arg) for arg in args], timeout)

    def _call(self, script: Path, args: list[str] | None, timeout: float) -> CommandResult:
        if not is_own_host_script(script):
            raise ValueError(f"{script}: only the project's own host scripts run in a script agent")
        label = f"{script.name} {args[0] if args else 'load'}"
        with self._lock:
            answer = self._ask(script, args, timeout, label) if self._stream is not None else None
        if answer is None:  # no agent, or it was gone before the request went out
            return self._afresh(script, args, timeout)
        exit_code, stdout, stderr, seconds = answer
        return CommandResult(host=self.connector.name, command=f"{script.name} {' '.join(args or [])}",
                             exit_code=exit_code, stdout=stdout, stderr=stderr, seconds=seconds)

    def _ask(self, script: Path, args: list[str] | None, timeout: float,
             label: str) -> tuple[int, str, str, float] | None:
        assert self._stream is not None
        request: dict[str, object] = {"name": script.name, "argv": args}
        if script.name not in self._sent:
            request["source"] = script_source(script)[1]
        started = time.monotonic()
        try:
            self._stream.send(json.dumps(request).encode() + b"\n")
        except HostUnreachable:
            self._drop()
            return None
        self._sent.add(script.name)
        try:
            answer = json.loads(self._stream.read_line(timeout))
        except HostTimeout:
            self._drop()
            raise HostTimeout(self.connector.name, f"{label} did not answer within {timeout:g}s; not re-run") from None
        except (HostUnreachable, ValueError) as exc:
            self._drop()
            raise HostUnreachable(self.connector.name,
                                  f"the script agent stopped while running {label}: {exc}; not re-run") from None
        return int(answer["exit"]), str(answer["stdout"]), str(answer["stderr"]), time.monotonic() - started

    def _afresh(self, script: Path, args: list[str] | None, timeout: float) -> CommandResult:
        if args is None:  # loading ahead is only for an agent
            return CommandResult(host=self.connector.name, command=f"load {script.name}", exit_code=0,
                                 stdout="", stderr="", seconds=0.0)
        return run_afresh(self.connector, script, args, prefix=self.prefix, timeout=timeout)

    def _drop(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close(grace=0.5)

    def close(self) -> None:
        """Ends the agent (it exits when its input closes); later calls run afresh."""
        with self._lock:
            if self._stream is not None:
                stream, self._stream = self._stream, None
                stream.close()

    def __enter__(self) -> "ScriptAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
