"""The Connector protocol every transport implements, and the errors it raises.

Connectors know nothing of patching or backups: they run commands, move files and tell
whether a host is up. Transient faults (unreachable, timeout) are retried here with tenacity;
authentication and host-key failures are not, since retrying cannot fix them.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from configs.secrets import resolve

T = TypeVar("T")


class ConnectorError(Exception):
    """Base of every connector failure; always names the host."""

    transient: bool = False

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        self.message = message
        super().__init__(f"{host}: {message}")


class HostUnreachable(ConnectorError):
    """The host did not answer (refused, no route, DNS). Retried."""

    transient = True


class HostTimeout(ConnectorError):
    """A connection or command ran past its time limit. Retried."""

    transient = True


class AuthenticationFailed(ConnectorError):
    """Credentials were refused. Never retried: the message says what to fix."""


class HostKeyRejected(ConnectorError):
    """The host's key is unknown or changed. Never retried."""


class CommandFailed(ConnectorError):
    """A command ran and exited non-zero (raised only when the caller asks with check=True)."""

    def __init__(self, host: str, command: str, exit_code: int, stderr: str) -> None:
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr
        tail = last_lines(stderr, 5)
        detail = f"; stderr: {tail}" if tail else ""
        super().__init__(host, f"command {_short(command)!r} exited {exit_code}{detail}")


def last_lines(text: str, lines: int) -> str:
    """The last `lines` lines of text as one line (joined by " | "), for an error message."""
    return " | ".join(text.strip().splitlines()[-lines:])


def _short(command: str, limit: int = 120) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"


@dataclass(frozen=True)
class CommandResult:
    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, lines: int = 5) -> str:
        """What a message quotes of a failed command: the last lines of stderr, or of stdout when
        stderr is empty, as one line; empty when the command printed nothing."""
        return last_lines(self.stderr if self.stderr.strip() else self.stdout, lines)

    def check(self) -> "CommandResult":
        if not self.ok:
            raise CommandFailed(self.host, self.command, self.exit_code, self.stderr)
        return self


@dataclass(frozen=True)
class BootIdentity:
    """Who the host is since its last boot: changes on every reboot."""

    host: str
    os_family: str  # "linux" | "windows"
    boot_id: str
    os_name: str = ""
    rtt_seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SecretReference:
    """A credential as the config names it (env:NAME, file:PATH, prefect-secret:BLOCK), read
    only when a connection needs it. A transport's settings hold this, never the value, so a
    settings object can be logged, compared or shown in a traceback without exposing it."""

    reference: str
    #: The config file's directory, which a relative `file:` reference is read from.
    base_dir: Path | None = None

    def value(self) -> str:
        """The secret itself (SecretError names the reference when it cannot be read); every
        value read this way is masked wherever patchdrill logs or reports text."""
        return resolve(self.reference, base_dir=self.base_dir)

    def __str__(self) -> str:
        return self.reference


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter for transient faults."""

    attempts: int = 4
    initial: float = 0.5
    maximum: float = 8.0
    deadline: float = 60.0

    def call(self, fn: Callable[[], T], on_retry: Callable[[RetryCallState], None] | None = None) -> T:
        retrying = Retrying(
            retry=retry_if_exception_type((HostUnreachable, HostTimeout)),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
            wait=wait_exponential_jitter(initial=self.initial, max=self.maximum),
            before_sleep=on_retry,
            reraise=True,
        )
        return retrying(fn)


#: What run_script runs: a script file (its name labels the result, its suffix picks the
#: interpreter on a POSIX host) or a script's text. A connector runs what it is handed: the
#: scripts themselves live beside the tasks that send them.
Script = Path | str


class CommandStream(abc.ABC):
    """A command left running with its stdin and stdout open: requests go in, answers come
    back as lines (see connectors/agent.py). Its stderr is not read: redirect it."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._pending = bytearray()

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Write data to the command's stdin; HostUnreachable when the command is gone."""

    @abc.abstractmethod
    def _receive(self, timeout: float) -> bytes | None:
        """Some of stdout: b"" once it has ended, None when nothing came within timeout."""

    @abc.abstractmethod
    def close(self, grace: float = 2.0) -> None:
        """End of input; the command is waited for up to grace seconds, then killed."""

    def read_line(self, timeout: float) -> bytes:
        """The next line of stdout, without its newline: HostTimeout when none comes within
        timeout, HostUnreachable when the command ended first."""
        deadline = time.monotonic() + timeout
        while (end := self._pending.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostTimeout(self.host, f"a running command sent no answer within {timeout:g}s")
            data = self._receive(remaining)
            if data == b"":
                raise HostUnreachable(self.host, "a running command ended before it answered")
            self._pending += data or b""
        line = bytes(self._pending[:end])
        del self._pending[:end + 1]
        return line


class Connector(abc.ABC):
    """One host, one transport. Reuses its connection within a run; close() releases it."""

    name: str
    os_family: str

    @abc.abstractmethod
    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        """Run a shell command (sh on Linux, PowerShell on Windows)."""

    @abc.abstractmethod
    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run the script handed over (a file's path or the script's text) with arguments,
        without leaving it on the host."""

    @abc.abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to the host."""

    @abc.abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Copy a file from the host."""

    @abc.abstractmethod
    def boot_identity(self) -> BootIdentity:
        """Read the host's boot identity once (no retry)."""

    def wait_until_up(self, timeout: float, *, interval: float = 1.0,
                      not_boot_id: str | None = None) -> BootIdentity:
        """Poll until the host answers (and, if given, with a boot id other than `not_boot_id`).

        Reboot gates pass the pre-reboot boot id as `not_boot_id`, so a host that has not yet
        gone down is not mistaken for one that came back.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                self.close()
                identity = self.boot_identity()
                if not_boot_id is None or identity.boot_id != not_boot_id:
                    return identity
                last = None
            except (HostUnreachable, HostTimeout) as exc:
                last = exc
            if time.monotonic() >= deadline:
                if last is not None:
                    raise HostTimeout(self.name, f"not up after {timeout:.0f}s (last error: {last.message})")
                raise HostTimeout(self.name, f"still on boot {not_boot_id} after {timeout:.0f}s: it did not reboot")
            time.sleep(interval)

    def open_stream(self, command: str) -> CommandStream:
        """Start command with its stdin and stdout left open (POSIX shells only)."""
        raise NotImplementedError(f"host {self.name!r}: this transport cannot keep a command's input open")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the next call reconnects."""

    def __enter__(self) -> "Connector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def script_source(script: Script) -> tuple[str, str]:
    """The label (a file's name, else "script") and the text of a script handed to run_script."""
    if isinstance(script, Path):
        try:
            return script.name, script.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no script {str(script)!r}") from None
    return "script", script


def posix_interpreter(script: Script) -> list[str]:
    """How a POSIX host runs a script fed on standard input: python3 for a .py file or a text
    whose first line names python, sh for a .sh file or any other text. The project's own
    Python host scripts run as HOST_PYTHON; a user's script gets the host's python3 as it is."""
    if isinstance(script, Path):
        runner = _POSIX_RUNNERS.get(script.suffix)
        if runner is None:
            raise ValueError(f"cannot run script {script.name!r} on a POSIX host: expected .sh or .py")
        return HOST_PYTHON if runner is _PYTHON and is_own_host_script(script) else runner
    first = script.lstrip().split("\n", 1)[0]
    return _POSIX_RUNNERS[".py" if first.startswith("#!") and "python" in first else ".sh"]


#: The project's Python host scripts need the standard library only. Isolated (-I: no PYTHON*
#: variables, no user site, no current directory on the path) and without site (-S), a host's
#: site-packages can neither shadow the standard library nor slow every call: a virtualenv's
#: python3 spends about 30 ms of each start reading its .pth files, several times per drill step.
HOST_PYTHON = ["python3", "-I", "-S", "-"]
_PYTHON = ["python3", "-"]
_POSIX_RUNNERS = {".sh": ["sh", "-s", "--"], ".py": _PYTHON}
_PROJECT = Path(__file__).resolve().parents[1]


def is_own_host_script(script: Path) -> bool:
    """A script shipped in one of the project's host_scripts directories."""
    resolved = script.resolve()
    return resolved.parent.name == "host_scripts" and resolved.is_relative_to(_PROJECT)
