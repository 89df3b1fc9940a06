"""The local transport: the controller itself is the host (the embedded lab default)."""

from __future__ import annotations

import os
import platform
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from connectors.base import (
    BootIdentity,
    CommandResult,
    CommandStream,
    Connector,
    HostTimeout,
    HostUnreachable,
    Script,
    posix_interpreter,
    script_source,
)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class LocalSettings:
    """All the local transport needs: the name the host goes by in results and errors."""

    name: str
    transport = "local"


class LocalConnector(Connector):
    """Runs commands with `sh -c` through subprocess; put/get are file copies."""

    def __init__(self, settings: LocalSettings) -> None:
        if not isinstance(settings, LocalSettings):
            raise ValueError(f"host {getattr(settings, 'name', '?')!r}: LocalConnector takes LocalSettings (connectors.settings_for), not {type(settings).__name__}")
        self.settings = settings
        self.name = settings.name
        self.os_family = "linux"

    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        return self._exec(["sh", "-c", command], command, timeout=timeout, check=check, env=env, stdin=stdin)

    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        interpreter = posix_interpreter(script)
        name, text = script_source(script)
        label = " ".join([name, *(args or [])])
        return self._exec([*interpreter, *(args or [])], label, timeout=timeout, check=check, stdin=text.encode("utf-8"))

    def _exec(self, argv: list[str], label: str, *, timeout: float | None, check: bool,
              env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout,
                env={**os.environ, **env} if env else None,
            )
        except subprocess.TimeoutExpired:
            raise HostTimeout(self.name, f"command {label!r} ran past {timeout}s") from None
        result = CommandResult(
            host=self.name, command=label, exit_code=proc.returncode,
            stdout=proc.stdout.decode("utf-8", errors="replace"),
            stderr=proc.stderr.decode("utf-8", errors="replace"),
            seconds=time.monotonic() - started,
        )
        return result.check() if check else result

    def open_stream(self, command: str) -> CommandStream:
        return _LocalStream(self.name, subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))

    def put(self, local: Path, remote: str) -> None:
        target = Path(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(local, partial)
        os.replace(partial, target)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote, local)

    def boot_identity(self) -> BootIdentity:
        started = time.monotonic()
        boot_id = BOOT_ID_PATH.read_text().strip()
        return BootIdentity(
            host=self.name, os_family="linux", boot_id=boot_id,
            os_name=_os_pretty_name(), rtt_seconds=time.monotonic() - started,
        )

    def close(self) -> None:
        """Nothing to release: every call is its own process."""


def _os_pretty_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.platform())
    except OSError:
        return platform.platform()


class _LocalStream(CommandStream):
    def __init__(self, host: str, process: subprocess.Popen[bytes]) -> None:
        super().__init__(host)
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin, self._stdout = process.stdin, process.stdout.fileno()

    def send(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (BrokenPipeError, ValueError):
            raise HostUnreachable(self.host, "a running command ended before it took its input") from None

    def _receive(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self._stdout], [], [], timeout)
        return os.read(self._stdout, 1 << 16) if ready else None

    def close(self, grace: float = 2.0) -> None:
        try:
            self._stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
