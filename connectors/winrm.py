"""WinRM transport: PowerShell over WS-Management, on pywinrm's Protocol.

Security: HTTPS with certificate validation by default. Over plain HTTP only authentication
that encrypts the messages (NTLM, Kerberos, CredSSP with pywinrm's message encryption) is
used; Basic over HTTP is refused unless the host sets `allow_insecure_transport`.

Commands: every command is a PowerShell script, sent as `powershell -EncodedCommand` with a
prologue that makes output UTF-8, in one shell reused for the connector's lifetime. WinRM
starts commands through cmd.exe, whose lines stop at 8191 characters, and the encoded form
costs ~2.7 characters per script character; longer scripts are streamed on standard input to
a small loader (winrm_scripts/stdin_script.ps1) rather than written to a temporary .ps1 and run with
-File: one command instead of one per chunk, nothing left on disk if the run is cut short,
and no dependence on the host's execution policy, which governs -File but not
-EncodedCommand.

Files: put/get move small files (configuration, scripts, reports) in base64 chunks, one
command per chunk, into a partial file that is checked (SHA-256) and then moved into place.
WinRM is slow for bulk data; that goes to Azure Blob through a SAS URL instead, so copies
larger than `max_transfer_bytes` are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import requests
import structlog
import winrm
from tenacity import RetryCallState
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)

from configs.secrets import SecretError, redact
from connectors.base import (
    AuthenticationFailed,
    BootIdentity,
    CommandResult,
    Connector,
    ConnectorError,
    HostKeyRejected,
    HostTimeout,
    HostUnreachable,
    RetryPolicy,
    Script,
    SecretReference,
    script_source,
)
from connectors.powershell import PROLOGUE, clean_clixml, encode_command, invoke_script, ps_quote

log = structlog.stdlib.get_logger("patchdrill.connectors.winrm")
_unverified_lock = threading.Lock()
_unverified_warned: set[str] = set()

#: Below cmd.exe's 8191-character limit, with room for what WinRM adds.
COMMAND_LINE_LIMIT = 8000
#: Raw bytes per Send: their base64 stays under pywinrm's 153600-byte MaxEnvelopeSize.
STDIN_CHUNK = 96 * 1024
UPLOAD_CHUNK = 256 * 1024
DOWNLOAD_CHUNK = 1024 * 1024
DEFAULT_MAX_TRANSFER = 16 * 1024 * 1024
UTF8_CODE_PAGE = 65001
#: The scripts the transport itself runs on the host (file transfer, boot identity, the loader).
SCRIPTS = Path(__file__).with_name("winrm_scripts")
STDIN_LOADER = SCRIPTS / "stdin_script.ps1"
BOOT_IDENTITY = SCRIPTS / "boot_identity.ps1"
FILE_WRITE_CHUNK = SCRIPTS / "file_write_chunk.ps1"
FILE_COMMIT = SCRIPTS / "file_commit.ps1"
FILE_STAT = SCRIPTS / "file_stat.ps1"
FILE_READ_CHUNK = SCRIPTS / "file_read_chunk.ps1"
#: WSManFault code of "the shell was not found on the server" (it restarted or expired the shell).
SHELL_NOT_FOUND = 2150858843
#: Consecutive HTTP read timeouts on Receive before the host counts as gone.
MAX_READ_TIMEOUTS = 3

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _reason(exc: BaseException) -> str:
    """The useful bit of a requests/urllib3 error chain ('[Errno 111] Connection refused')."""
    text = str(exc)
    match = re.search(
        r"\[SSL: [A-Z_]+\][^'\")]*|certificate verify failed[^'\")]*|[Hh]ostname '[^']+' doesn't match[^'\")]*"
        r"|\[Errno -?\d+\][^'\")]*|Name or service not known|Connection (?:refused|reset by peer|aborted)",
        text,
    )
    return (match.group(0) if match else text[-200:]).strip()


@dataclass(frozen=True, kw_only=True)
class WinRmSettings:
    """What the WinRM transport needs to reach and log in to one host, and nothing else.

    The CA bundle's path is as it will be opened (a relative one already resolved against the
    config's directory); the password is a reference, read when a shell opens.
    """

    transport = "winrm"

    name: str
    address: str
    port: int
    user: str | None = None
    password: SecretReference | None = None
    scheme: Literal["https", "http"] = "https"
    auth: Literal["ntlm", "kerberos", "credssp", "basic"] = "ntlm"
    ca_bundle: Path | None = None
    verify_tls: bool = True
    allow_insecure_transport: bool = False
    connect_timeout: float = 15.0


class _Expired(Exception):
    """The command outlived the caller's timeout."""


class WinRmConnector(Connector):
    """PowerShell on a Windows host over WinRM.

    Safe to share between threads: calls are serialised, because one WinRM session (and NTLM
    message sealing, whose sequence numbers must stay in order) carries one exchange at a time.
    """

    os_family = "windows"

    def __init__(self, settings: WinRmSettings, *, retry: RetryPolicy | None = None,
                 operation_timeout: int = 20, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER) -> None:
        """`operation_timeout`: seconds one WS-Man Receive may wait for output (the server answers
        a "still running" fault after it and the connector asks again); `max_transfer_bytes`:
        the largest file put/get will copy."""
        if not isinstance(settings, WinRmSettings):
            raise ValueError(f"host {getattr(settings, 'name', '?')!r}: WinRmConnector takes WinRmSettings (connectors.settings_for), not {type(settings).__name__}")
        if operation_timeout < 1:
            raise ValueError(f"host {settings.name!r}: operation_timeout must be at least 1 second")
        self.settings = settings
        self.name = settings.name
        self._retry = retry or RetryPolicy()
        self._operation_timeout = operation_timeout
        self._max_transfer = max_transfer_bytes
        self._protocol: winrm.Protocol | None = None
        self._shell_id: str | None = None
        self._lock = threading.RLock()
        self._log = log.bind(host=settings.name)
        self._refuse_insecure_transport()
        if settings.auth == "kerberos" and not winrm.transport.HAVE_KERBEROS:
            raise ConnectorError(self.name, "winrm_auth kerberos needs the kerberos extra: pip install 'patchdrill[kerberos]'")

    @property
    def endpoint(self) -> str:
        settings = self.settings
        address = f"[{settings.address}]" if ":" in settings.address else settings.address
        return f"{settings.scheme}://{address}:{settings.port}/wsman"

    def _refuse_insecure_transport(self) -> None:
        settings = self.settings
        if settings.scheme == "http" and settings.auth == "basic" and not settings.allow_insecure_transport:
            raise ConnectorError(
                self.name,
                "winrm basic authentication over plain http would send the password and every command readable: "
                "use winrm_scheme: https, NTLM/Kerberos (encrypted over http), or set allow_insecure_transport: true "
                "for a lab",
            )

    # connection -------------------------------------------------------------------------------
    def _password(self) -> str | None:
        if self.settings.password is None:
            if self.settings.auth == "kerberos":
                return None  # the ticket cache authenticates
            raise ConnectorError(self.name, f"winrm_auth {self.settings.auth} needs a password reference (field password)")
        try:
            return self.settings.password.value()
        except SecretError as exc:
            raise ConnectorError(self.name, f"password: {exc}") from None

    def _ca_bundle(self) -> str | None:
        path = self.settings.ca_bundle
        if path is None:
            return None
        if not path.is_file():
            raise ConnectorError(self.name, f"winrm_ca_bundle {str(path)!r} is not a readable file")
        return str(path)

    def _warn_unverified_tls(self) -> None:
        """pywinrm silences urllib3's warning when validation is off, so say it ourselves, once per
        host per process: every shell re-opened after a reboot would otherwise repeat it."""
        if self.settings.scheme != "https" or self.settings.verify_tls:
            return
        with _unverified_lock:
            if self.name in _unverified_warned:
                return
            _unverified_warned.add(self.name)
        self._log.warning(
            "winrm.tls_unverified", endpoint=self.endpoint,
            detail=f"host {self.name}: winrm_verify_tls is false, so the certificate of {self.endpoint} is not "
                   "checked and anyone on the path can pose as the host and read the password and every command; "
                   "set winrm_ca_bundle to the issuing CA instead",
        )

    def _new_protocol(self) -> winrm.Protocol:
        self._warn_unverified_tls()
        protocol = winrm.Protocol(
            self.endpoint,
            transport=self.settings.auth,
            username=self.settings.user,
            password=self._password(),
            server_cert_validation="validate" if self.settings.verify_tls else "ignore",
            ca_trust_path=self._ca_bundle(),  # type: ignore[arg-type]  # None: certifi's bundle, no env override
            read_timeout_sec=self._operation_timeout + 10,
            operation_timeout_sec=self._operation_timeout,
            message_encryption="auto",
            proxy=None,  # a WinRM listener is reached directly, never through an environment proxy
        )
        self._set_wait(protocol, self._operation_timeout)
        return protocol

    def _set_wait(self, protocol: winrm.Protocol, seconds: int) -> None:
        protocol.operation_timeout_sec = seconds
        # pywinrm hands read_timeout_sec straight to requests, which also takes a
        # (connect, read) pair: that is how the host's connect_timeout applies.
        protocol.transport.read_timeout_sec = (self.settings.connect_timeout, seconds + 10)  # type: ignore[assignment]

    def _ensure_shell(self, *, retry: bool = True) -> tuple[winrm.Protocol, str]:
        if self._protocol is not None and self._shell_id is not None:
            return self._protocol, self._shell_id

        def attempt() -> tuple[winrm.Protocol, str]:
            protocol: winrm.Protocol | None = None
            try:
                protocol = self._new_protocol()
                shell_id = protocol.open_shell(codepage=UTF8_CODE_PAGE, noprofile=True)
            except Exception as exc:  # noqa: BLE001 - translated into the connector's typed errors
                if protocol is not None:
                    protocol.transport.close_session()
                raise self._translate(exc, "open a shell") from None
            self._check_encryption(protocol)
            return protocol, shell_id

        opened = self._retry.call(attempt, on_retry=self._log_retry) if retry else attempt()
        self._protocol, self._shell_id = opened
        return opened

    def _check_encryption(self, protocol: winrm.Protocol) -> None:
        settings = self.settings
        if settings.scheme == "http" and not settings.allow_insecure_transport and protocol.transport.encryption is None:
            protocol.transport.close_session()
            raise ConnectorError(
                self.name,
                f"{self.endpoint}: {settings.auth} did not set up message encryption over plain http; use "
                "winrm_scheme: https or set allow_insecure_transport: true for a lab",
            )

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        self._log.warning("winrm.retry", attempt=state.attempt_number, error=redact(str(error)))

    def _discard(self) -> None:
        """Forget the session without talking to the host (it may be gone)."""
        if self._protocol is not None:
            self._protocol.transport.close_session()
        self._protocol = self._shell_id = None

    def close(self) -> None:
        with self._lock:
            protocol, shell_id = self._protocol, self._shell_id
            self._protocol = self._shell_id = None
        if protocol is None:
            return
        try:
            if shell_id is not None:
                protocol.close_shell(shell_id)
        except Exception as exc:  # noqa: BLE001 - closing is best effort; the host may have gone
            self._log.debug("winrm.close_failed", error=redact(_reason(exc)))
        finally:
            protocol.transport.close_session()

    def _translate(self, exc: BaseException, doing: str) -> ConnectorError:
        settings, endpoint = self.settings, self.endpoint
        if isinstance(exc, ConnectorError):
            return exc
        if isinstance(exc, requests.exceptions.SSLError):
            return HostKeyRejected(self.name, redact(
                f"TLS certificate of {endpoint} not trusted ({_reason(exc)}); set winrm_ca_bundle to the CA that "
                "issued it (winrm_verify_tls: false only in a lab)"))
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return HostTimeout(self.name, f"no connection to {endpoint} within {settings.connect_timeout:g}s")
        if isinstance(exc, (requests.exceptions.Timeout, WinRMOperationTimeoutError)):
            return HostTimeout(self.name, f"{endpoint} did not answer in time while trying to {doing}")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return HostUnreachable(self.name, redact(f"cannot reach {endpoint} to {doing}: {_reason(exc)}"))
        if isinstance(exc, (InvalidCredentialsError, PermissionError)):
            return AuthenticationFailed(
                self.name,
                f"{endpoint} rejected the {settings.auth} credentials of user {settings.user!r} (password from "
                f"{settings.password}); check the user, the password and that {settings.auth} is enabled on the listener",
            )
        if isinstance(exc, WSManFaultError):
            code = exc.wsman_fault_code or exc.fault_subcode
            return ConnectorError(self.name, redact(f"{doing}: WS-Management fault {code}: {exc.reason}"))
        if isinstance(exc, WinRMTransportError):
            if exc.code in (502, 503, 504):
                return HostUnreachable(self.name, f"{endpoint} answered HTTP {exc.code} to {doing}")
            return ConnectorError(self.name, f"{endpoint} answered HTTP {exc.code} to {doing}")
        if isinstance(exc, WinRMError):
            return ConnectorError(self.name, redact(f"{doing}: {exc}"))
        return ConnectorError(self.name, redact(f"{doing}: {type(exc).__name__}: {exc}"))

    # commands ---------------------------------------------------------------------------------
    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        """Run PowerShell. `env` becomes `$env:` variables; `stdin` is the process's standard
        input (read it with [Console]::In)."""
        env_lines = ""
        for key, value in (env or {}).items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"host {self.name!r}: environment variable name {key!r} is not valid")
            env_lines += f"$env:{key} = {ps_quote(value)}\n"
        return self._run_powershell(PROLOGUE + env_lines + command, command, timeout=timeout, check=check, stdin=stdin)

    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a PowerShell script (a .ps1 file's path or the text) with arguments: `-Name` items
        are parameter names, every other item a value (passed as a literal string, never
        interpreted)."""
        args = args or []
        name, text = script_source(script)
        shown = " ".join([name, *(a if len(a) <= 60 else a[:57] + "..." for a in args)])
        return self._run_powershell(PROLOGUE + invoke_script(text, args), shown, timeout=timeout, check=check)

    def _run_powershell(self, script: str, shown: str, *, timeout: float | None, check: bool,
                        stdin: bytes | None = None, retry: bool = True) -> CommandResult:
        started = time.monotonic()
        command_line = encode_command(script)
        if len(command_line) > COMMAND_LINE_LIMIT:
            payload = script.encode("utf-8")
            loader = invoke_script(STDIN_LOADER.read_text(encoding="utf-8"), ["-Length", str(len(payload))])
            command_line = encode_command(PROLOGUE + loader)
            stdin = payload + (stdin or b"")
        with self._lock:
            out, err, exit_code = self._execute(command_line, stdin, timeout, shown, retry=retry)
        result = CommandResult(
            host=self.name, command=shown, exit_code=exit_code,
            stdout=out.decode("utf-8", errors="replace").removeprefix("\ufeff"),
            stderr=clean_clixml(err.decode("utf-8", errors="replace")), seconds=time.monotonic() - started,
        )
        self._log.info("winrm.run", command=redact(shown[:200]), exit_code=exit_code, seconds=round(result.seconds, 3))
        return result.check() if check else result

    def _execute(self, command_line: str, stdin: bytes | None, timeout: float | None, shown: str,
                 *, retry: bool) -> tuple[bytes, bytes, int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        protocol, shell_id = self._ensure_shell(retry=retry)
        try:
            command_id = protocol.run_command(shell_id, command_line)
        except WSManFaultError as exc:
            if exc.wsman_fault_code != SHELL_NOT_FOUND:
                raise self._translate(exc, f"start {shown}") from None
            # The host restarted or expired our shell: a new one is all it takes.
            self._discard()
            protocol, shell_id = self._ensure_shell(retry=retry)
            command_id = self._call(lambda: protocol.run_command(shell_id, command_line), f"start {shown}")
        except Exception as exc:  # noqa: BLE001
            self._discard()
            raise self._translate(exc, f"start {shown}") from None
        try:
            if stdin is not None:
                self._send_stdin(protocol, shell_id, command_id, stdin)
            out, err, exit_code = self._collect(protocol, shell_id, command_id, deadline)
        except _Expired:
            self._stop_command(protocol, shell_id, command_id)
            raise HostTimeout(self.name, redact(f"command {shown[:120]!r} still running after {timeout:g}s; stopped it")) from None
        except ConnectorError:
            self._discard()
            raise
        except Exception as exc:  # noqa: BLE001
            self._discard()
            raise self._translate(exc, f"run {shown}") from None
        self._stop_command(protocol, shell_id, command_id)
        return out, err, exit_code

    def _call(self, fn: Callable[[], str], doing: str) -> str:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            self._discard()
            raise self._translate(exc, doing) from None

    def _send_stdin(self, protocol: winrm.Protocol, shell_id: str, command_id: str, data: bytes) -> None:
        chunks = [data[i:i + STDIN_CHUNK] for i in range(0, len(data), STDIN_CHUNK)] or [b""]
        for index, chunk in enumerate(chunks):
            protocol.send_command_input(shell_id, command_id, chunk, end=index == len(chunks) - 1)

    def _collect(self, protocol: winrm.Protocol, shell_id: str, command_id: str,
                 deadline: float | None) -> tuple[bytes, bytes, int]:
        out: list[bytes] = []
        err: list[bytes] = []
        read_timeouts = 0
        while True:
            wait = self._operation_timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Expired()
                wait = max(1, min(wait, math.ceil(remaining)))
            self._set_wait(protocol, wait)
            try:
                stdout, stderr, exit_code, done = protocol.get_command_output_raw(shell_id, command_id)
            except WinRMOperationTimeoutError:
                continue  # normal for a long command: it printed nothing within the operation timeout
            except requests.exceptions.ReadTimeout:
                read_timeouts += 1
                if read_timeouts >= MAX_READ_TIMEOUTS:
                    raise HostTimeout(self.name, f"{self.endpoint} stopped answering while a command ran") from None
                continue
            read_timeouts = 0
            out.append(stdout)
            err.append(stderr)
            if done:
                return b"".join(out), b"".join(err), exit_code

    def _stop_command(self, protocol: winrm.Protocol, shell_id: str, command_id: str) -> None:
        """Signal terminate: ends the process if it still runs and frees the command on the host."""
        self._set_wait(protocol, self._operation_timeout)
        try:
            protocol.cleanup_command(shell_id, command_id)
        except Exception as exc:  # noqa: BLE001 - the result is already in hand; start afresh next time
            self._log.debug("winrm.cleanup_failed", error=redact(_reason(exc)))
            self._discard()

    # files ------------------------------------------------------------------------------------
    def _check_size(self, size: int, what: str) -> None:
        if size > self._max_transfer:
            raise ConnectorError(
                self.name,
                f"{what} is {size} bytes, over the {self._max_transfer}-byte limit for WinRM copies "
                "(max_transfer_bytes): send bulk data through the blob store's upload URL instead",
            )

    def put(self, local: Path, remote: str) -> None:
        """Copy a small file to the host: chunks into `<remote>.<id>.part`, checked, then moved."""
        local = Path(local)
        self._check_size(local.stat().st_size, str(local))
        partial = f"{remote}.{uuid.uuid4().hex[:12]}.part"
        digest = hashlib.sha256()
        offset = 0
        with self._lock, local.open("rb") as handle:
            while True:  # at least once: an empty file is one empty chunk
                chunk = handle.read(UPLOAD_CHUNK)
                digest.update(chunk)
                self.run_script(FILE_WRITE_CHUNK, ["-Path", partial, "-Offset", str(offset),
                                                         "-Data", base64.b64encode(chunk).decode("ascii")], check=True)
                offset += len(chunk)
                if len(chunk) < UPLOAD_CHUNK:
                    break
        self.run_script(FILE_COMMIT, ["-Partial", partial, "-Path", remote,
                                            "-Sha256", digest.hexdigest().upper()], check=True)
        self._log.info("winrm.put", local=str(local), remote=remote, bytes=offset)

    def get(self, remote: str, local: Path) -> None:
        """Copy a small file from the host, checked against its SHA-256 before it appears locally."""
        local = Path(local)
        stat = self._json_of(FILE_STAT, ["-Path", remote], ("length", "sha256"))
        size = int(stat["length"])
        self._check_size(size, f"{remote} on {self.name}")
        partial = local.with_name(f"{local.name}.{uuid.uuid4().hex[:12]}.part")
        digest = hashlib.sha256()
        try:
            with partial.open("wb") as handle:
                offset = 0
                while offset < size:
                    result = self.run_script(FILE_READ_CHUNK, ["-Path", remote, "-Offset", str(offset),
                                                                     "-Count", str(DOWNLOAD_CHUNK)], check=True)
                    data = base64.b64decode(result.stdout.strip())
                    if not data:
                        raise ConnectorError(self.name, f"{remote} shrank while being copied ({offset} of {size} bytes)")
                    handle.write(data)
                    digest.update(data)
                    offset += len(data)
            if digest.hexdigest().upper() != str(stat["sha256"]).upper():
                raise ConnectorError(self.name, f"{remote} changed while being copied (SHA-256 mismatch)")
            partial.replace(local)
        finally:
            partial.unlink(missing_ok=True)
        self._log.info("winrm.get", remote=remote, local=str(local), bytes=size)

    def _json_of(self, script: Path, args: list[str], keys: tuple[str, ...], *, retry: bool = True,
                 timeout: float | None = None) -> dict[str, object]:
        name, text = script_source(script)
        result = self._run_powershell(PROLOGUE + invoke_script(text, args), name,
                                      timeout=timeout, check=True, retry=retry)
        try:
            data = json.loads(result.stdout)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or any(key not in data for key in keys):
            raise ConnectorError(self.name, redact(f"{name} printed {result.stdout[:200]!r}, not JSON with {', '.join(keys)}"))
        return data

    # identity ---------------------------------------------------------------------------------
    def boot_identity(self) -> BootIdentity:
        started = time.monotonic()
        data = self._json_of(BOOT_IDENTITY, [], ("last_boot_up_time", "caption"), retry=False,
                             timeout=self.settings.connect_timeout + 30)
        extra = {key: str(value) for key, value in data.items() if value is not None}
        return BootIdentity(host=self.name, os_family="windows", boot_id=str(data["last_boot_up_time"]),
                            os_name=str(data["caption"]), rtt_seconds=time.monotonic() - started, extra=extra)
