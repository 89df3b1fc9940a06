"""Running the drill's host script and plain commands on a DR target, inside a namespace or not.

The one place that knows how a drill step reaches a Linux target: the shell quoting, the
`ip netns exec` prefix and the JSON the host script answers with, so isolation, control and
cleanup speak to a target the same way over the local and the SSH connector.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from connectors.agent import ScriptAgent, run_afresh
from connectors.base import CommandFailed, CommandResult, Connector

HOST_SCRIPT = Path(__file__).parent / "host_scripts" / "drill_host.py"
#: How long one host-script call may take: `stop` waits for its grace period plus five seconds.
DEFAULT_TIMEOUT = 120.0


class TargetError(Exception):
    """A drill step on a target failed; the message names the host and what failed."""


class Refused(TargetError):
    """The target refused a step for safety (a path outside its copy root, no drill marker)."""


#: drill_host.py's exit status for a refusal
REFUSED_EXIT = 3


def namespace_prefix(namespace: str | None) -> str:
    """What runs a command inside network namespace `namespace` ("" when None)."""
    return "" if namespace is None else f"ip netns exec {shlex.quote(namespace)}"


def in_namespace(namespace: str | None, command: str) -> str:
    """`command` as run inside network namespace `namespace` (unchanged when None)."""
    return " ".join(filter(None, [namespace_prefix(namespace), command]))


def host_script(connector: Connector, *args: str | int | float, namespace: str | None = None,
                timeout: float = DEFAULT_TIMEOUT, agent: ScriptAgent | None = None) -> dict[str, Any]:
    """Run one subcommand of host_scripts/drill_host.py on the target and return its JSON;
    through agent when given (it runs where the call belongs: inside `namespace`)."""
    argv = [str(arg) for arg in args]
    result = agent.run_script(HOST_SCRIPT, argv, timeout=timeout) if agent is not None else \
        run_afresh(connector, HOST_SCRIPT, argv, prefix=namespace_prefix(namespace), timeout=timeout)
    if result.exit_code == REFUSED_EXIT:
        raise Refused(f"{connector.name}: {_tail(result)}")
    if not result.ok:
        raise TargetError(f"{connector.name}: drill_host.py {args[0]} exited {result.exit_code}: "
                          f"{_tail(result)}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TargetError(f"{connector.name}: drill_host.py {args[0]} answered no JSON: {_tail(result)}") from None


def shell(connector: Connector, command: str, *, timeout: float = DEFAULT_TIMEOUT,
          check: bool = True) -> CommandResult:
    """Run a shell command on the target; with check, a non-zero exit is a TargetError."""
    try:
        return connector.run(command, timeout=timeout, check=check)
    except CommandFailed as exc:
        raise TargetError(f"{connector.name}: {exc.message}") from None


def _tail(result: CommandResult) -> str:
    text = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return " | ".join(text[-3:]) or "(no output)"

