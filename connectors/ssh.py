"""SSH transport for Linux hosts, built on paramiko.

One connector holds one Transport (connected lazily, kept alive, reused for every command and
for one SFTP session) and verifies the server against known_hosts before it authenticates.
Connecting is retried with the connector's RetryPolicy; a command that was started is never
re-run by this module, since it may not be idempotent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import paramiko
import structlog
from tenacity import RetryCallState

from configs.models import HostConfig
from configs.secrets import SecretError, redact, resolve
from connectors.base import (
    AuthenticationFailed,
    BootIdentity,
    CommandFailed,
    CommandResult,
    Connector,
    ConnectorError,
    HostKeyRejected,
    HostTimeout,
    HostUnreachable,
    RetryPolicy,
    Script,
    posix_interpreter,
    script_source,
)
from connectors.known_hosts import KnownHosts, read_known_hosts

T = TypeVar("T")

log = structlog.stdlib.get_logger("patchdrill.connectors.ssh")

KEEPALIVE_SECONDS = 30
_READ_CHUNK = 1 << 16
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET,
    errno.ECONNABORTED, errno.EHOSTDOWN, errno.ENETDOWN, errno.EPIPE,
}
_BOOT_IDENTITY_COMMAND = (
    "cat /proc/sys/kernel/random/boot_id; "
    "(. /etc/os-release 2>/dev/null; echo \"${PRETTY_NAME:-}\"); "
    "uname -r"
)


@dataclass(frozen=True)
class _Credential:
    """One way in: a private key (file or agent) or a password. `label` is safe to log."""

    label: str
    key: paramiko.PKey | None = None
    password: str | None = None


class SshConnector(Connector):
    """Run commands and move files on a Linux host over SSH."""

    os_family = "linux"

    def __init__(self, host: HostConfig, *, retry: RetryPolicy | None = None,
                 base_dir: Path | None = None) -> None:
        if host.transport != "ssh":
            raise ValueError(f"host {host.name!r}: SshConnector needs transport 'ssh', not {host.transport!r}")
        self.host = host
        self.name = host.name
        self.retry = retry or RetryPolicy()
        # Relative key and known_hosts paths are relative to the config file that named them.
        self.base_dir = base_dir
        self._lock = threading.RLock()
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection -----------------------------------------------------------------------

    @property
    def _port(self) -> int:
        return self.host.effective_port

    @property
    def _where(self) -> str:
        return f"{self.host.address}:{self._port}"

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path

    @property
    def known_hosts_path(self) -> Path:
        return self._path(self.host.known_hosts) if self.host.known_hosts else Path.home() / ".ssh" / "known_hosts"

    @property
    def _known_hosts_name(self) -> str:
        # OpenSSH records a non-default port as "[address]:port"; mirror it so files are shared.
        return self.host.address if self._port == 22 else f"[{self.host.address}]:{self._port}"

    def _open_socket(self) -> socket.socket:
        try:
            return socket.create_connection((self.host.address, self._port), timeout=self.host.connect_timeout)
        except socket.gaierror as exc:
            raise HostUnreachable(self.name, f"cannot resolve address {self.host.address!r}: {exc.strerror}") from None
        except TimeoutError:
            raise HostTimeout(self.name, f"no answer from {self._where} within {self.host.connect_timeout:g}s") from None
        except OSError as exc:
            raise HostUnreachable(self.name, f"cannot connect to {self._where}: {exc.strerror or exc}") from None

    def _connect_once(self) -> paramiko.Transport:
        """Open, verify and authenticate one Transport (no retry here)."""
        # Configuration faults (missing key file, unset secret) surface before any network wait.
        credentials = self._credentials()
        known = self._load_known_hosts()
        sock = self._open_socket()
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = self.host.connect_timeout
            transport.handshake_timeout = self.host.connect_timeout
            self._prefer_known_key_type(transport, known)
            try:
                transport.start_client(timeout=self.host.connect_timeout)
            except paramiko.SSHException as exc:
                raise self._negotiation_error(exc) from None
            except (EOFError, OSError) as exc:
                raise HostUnreachable(self.name, f"connection to {self._where} dropped during the handshake: {exc}") from None
            # start_client returns quietly when its timeout runs out mid-negotiation.
            if not transport.initial_kex_done:
                raise HostTimeout(self.name, self._handshake_timeout_message)
            self._verify_host_key(transport.get_remote_server_key(), known)
            self._authenticate(transport, credentials)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(KEEPALIVE_SECONDS)
        log.info("ssh.connected", host=self.name, address=self._where, user=self.host.user)
        return transport

    @property
    def _handshake_timeout_message(self) -> str:
        return f"{self._where} accepted the connection but did not complete the SSH handshake within {self.host.connect_timeout:g}s"

    def _negotiation_error(self, exc: paramiko.SSHException) -> ConnectorError:
        text = str(exc)
        # paramiko wraps the banner read's socket.timeout in a plain SSHException.
        if isinstance(exc.__context__, TimeoutError):
            return HostTimeout(self.name, self._handshake_timeout_message)
        return HostUnreachable(self.name, f"SSH handshake with {self._where} failed: {redact(text)}")

    def _ensure_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            self._drop()
            self._transport = self._connect_once()
            return self._transport

    def _open_channel(self) -> paramiko.Channel:
        transport = self._ensure_transport()
        try:
            return transport.open_session(timeout=self.host.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # A transport that died under us (host rebooted, network cut) is transient: drop it
            # so the next attempt reconnects.
            self._drop()
            raise HostUnreachable(self.name, f"lost the connection to {self._where}: {exc or type(exc).__name__}") from None

    def _with_retry(self, action: str, fn: Callable[[], T]) -> T:
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return fn()

        def on_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("ssh.retry", host=self.name, action=action, attempt=state.attempt_number,
                error=redact(getattr(error, "message", str(error))),
                wait_seconds=round(state.next_action.sleep, 2) if state.next_action else None,
            )

        try:
            return self.retry.call(attempt, on_retry=on_retry)
        except (HostUnreachable, HostTimeout) as exc:
            if attempts > 1:
                raise type(exc)(self.name, f"{exc.message} (gave up after {attempts} attempts)") from None
            raise

    def connect(self) -> None:
        """Connect now (with retries) instead of on first use."""
        self._with_retry("connect", self._ensure_transport)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        sftp, transport = self._sftp, self._transport
        self._sftp, self._transport = None, None
        if sftp is not None:
            try:
                sftp.close()
            except Exception:  # noqa: BLE001 - closing a dead session must not mask the real error
                pass
        if transport is not None:
            transport.close()

    # -- host key ---------------------------------------------------------------------------

    def _load_known_hosts(self) -> KnownHosts:
        path = self.known_hosts_path
        try:
            return read_known_hosts(path)
        except OSError as exc:
            raise HostKeyRejected(self.name, f"cannot read known_hosts file {str(path)!r}: {exc.strerror or exc}") from None

    def _prefer_known_key_type(self, transport: paramiko.Transport, known: KnownHosts) -> None:
        # Ask for the key type we already know, so a host with several keys is checked
        # against the one on record rather than looking "unknown".
        entry = known.keys.lookup(self._known_hosts_name)
        if not entry:
            return
        options = transport.get_security_options()
        wanted = [t for t in entry.keys() if t in options.key_types]
        if wanted:
            options.key_types = wanted + [t for t in options.key_types if t not in wanted]

    def _verify_host_key(self, key: paramiko.PKey, known: KnownHosts) -> None:
        name = self._known_hosts_name
        path = self.known_hosts_path
        revoked_at = known.revoked_line(key)
        if revoked_at is not None:
            # Checked before anything else: a revoked key stays refused even where a plain line
            # also records it, and is never recorded.
            raise HostKeyRejected(
                self.name,
                f"REVOKED HOST KEY DETECTED for {name}: the server offered {key.get_name()} {key.fingerprint}, "
                f"which {str(path)!r} marks @revoked at line {revoked_at}; it may be a stolen key used to "
                "impersonate this host. Not connecting.",
            )
        entry = known.keys.lookup(name)
        recorded = entry.get(key.get_name()) if entry else None
        if recorded is not None and recorded == key:
            return
        if recorded is not None or entry:
            have = ", ".join(f"{t} {k.fingerprint}" for t, k in entry.items()) if entry else ""
            raise HostKeyRejected(
                self.name,
                f"WARNING: HOST KEY FOR {name} HAS CHANGED - POSSIBLE MAN-IN-THE-MIDDLE ATTACK. "
                f"The server offered {key.get_name()} {key.fingerprint} but {str(path)!r} records {have}. "
                "Verify the new key out of band; if the change is legitimate, remove the old line with "
                f"'ssh-keygen -R \"{name}\" -f {path}' and add the new one. "
                "accept_unknown_host_key never accepts a changed key.",
            )
        if not self.host.accept_unknown_host_key:
            keyscan = f"ssh-keyscan{'' if self._port == 22 else f' -p {self._port}'} {self.host.address} >> {path}"
            raise HostKeyRejected(
                self.name,
                f"unknown host key for {name} ({key.get_name()} {key.fingerprint}), not in {str(path)!r}. "
                f"Check the fingerprint, then add it with '{keyscan}', or set accept_unknown_host_key: true "
                f"on this host to record it on first connect.{known.unused_lines_note()}",
            )
        self._record_host_key(name, key, path)

    def _record_host_key(self, name: str, key: paramiko.PKey, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with path.open("a+", encoding="ascii") as handle:
            # Several connectors may meet the same new host at once: decide under a lock,
            # against the file as it is now, so a key is recorded once and a rival key is
            # never written beside it.
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            current = handle.read()
            fresh = read_known_hosts(path)
            if fresh.keys.lookup(name) or fresh.revoked_line(key) is not None:
                self._verify_host_key(key, fresh)
                return
            separator = "\n" if current and not current.endswith("\n") else ""
            # Append rather than rewrite: other lines, comments and hashed entries stay as they are.
            handle.write(f"{separator}{name} {key.get_name()} {key.get_base64()}\n")
        log.warning("ssh.host_key.recorded", host=self.name, known_hosts_name=name, key_type=key.get_name(),
                    fingerprint=key.fingerprint, known_hosts=str(path))

    # -- authentication ---------------------------------------------------------------------

    def _credentials(self) -> list[_Credential]:
        """Explicit credentials first, the agent last: sshd counts every refused key against
        MaxAuthTries, and a full agent must not use up the tries before the configured ones."""
        host = self.host
        found: list[_Credential] = []
        if host.ssh_key:
            found.append(self._key_file_credential(host.ssh_key))
        if host.password:
            found.append(_Credential(label=f"password from {host.password}", password=self._secret(host.password, "password")))
        if host.ssh_agent:
            try:
                agent_keys = paramiko.Agent().get_keys()
            except paramiko.SSHException:
                agent_keys = ()
            found.extend(_Credential(label=f"agent key {k.get_name()} {k.fingerprint}", key=k) for k in agent_keys)
        return found

    def _secret(self, reference: str, field_name: str) -> str:
        try:
            return resolve(reference, base_dir=self.base_dir)
        except SecretError as exc:
            raise AuthenticationFailed(self.name, f"field {field_name}: {exc}") from None

    def _key_file_credential(self, value: str) -> _Credential:
        path = self._path(value)
        passphrase = (self._secret(self.host.ssh_key_passphrase, "ssh_key_passphrase")
                      if self.host.ssh_key_passphrase else None)
        try:
            key = paramiko.PKey.from_path(path, passphrase.encode("utf-8") if passphrase else None)
        except FileNotFoundError:
            raise AuthenticationFailed(self.name, f"field ssh_key: key file {str(path)!r} does not exist") from None
        except (paramiko.PasswordRequiredException, TypeError):
            # cryptography raises TypeError for an encrypted key loaded without a passphrase.
            raise AuthenticationFailed(
                self.name, f"field ssh_key: key file {str(path)!r} is encrypted; set ssh_key_passphrase to a reference") from None
        except (paramiko.SSHException, ValueError, OSError) as exc:
            hint = " (wrong ssh_key_passphrase?)" if passphrase else ""
            raise AuthenticationFailed(
                self.name, f"field ssh_key: cannot load key file {str(path)!r}{hint}: {redact(str(exc))}") from None
        return _Credential(label=f"key file {path} ({key.get_name()})", key=key)

    def _authenticate(self, transport: paramiko.Transport, credentials: list[_Credential]) -> None:
        user = self.host.user or ""
        if not credentials:
            raise AuthenticationFailed(
                self.name, f"no credentials for user {user!r}: set ssh_key, password, or load a key into the SSH agent")
        tried: list[str] = []
        server_accepts: list[str] | None = None
        for credential in credentials:
            tried.append(credential.label)
            try:
                if credential.key is not None:
                    transport.auth_publickey(user, credential.key)
                else:
                    transport.auth_password(user, credential.password or "")
            except paramiko.BadAuthenticationType as exc:
                server_accepts = list(exc.allowed_types)
                continue
            except paramiko.AuthenticationException:
                if not transport.is_active():
                    # paramiko reports a connection dropped mid-authentication (a host going
                    # down for a reboot) as a refusal; it is a transient fault, not bad credentials.
                    raise HostUnreachable(
                        self.name, f"connection to {self._where} dropped during authentication") from None
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise HostUnreachable(
                    self.name, f"connection to {self._where} dropped during authentication: {redact(str(exc))}") from None
            if transport.is_authenticated():
                return
        accepts = f"; the server accepts: {', '.join(server_accepts)}" if server_accepts else ""
        raise AuthenticationFailed(
            self.name, redact(f"user {user!r} was refused by {self._where}; tried: {'; '.join(tried)}{accepts}"))

    # -- commands ---------------------------------------------------------------------------

    def _wrap_env(self, command: str, env: dict[str, str] | None) -> str:
        """Put env on the command line rather than in SSH 'env' requests.

        sshd drops 'env' requests unless AcceptEnv lists each name, which most hosts do not,
        and it does so silently. `env NAME=value sh -c '<command>'` works on every host and
        applies to the whole command, not just its first word.
        """
        if not env:
            return command
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"host {self.name!r}: invalid environment variable name {name!r}")
        assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        return f"env {assignments} sh -c {shlex.quote(command)}"

    def run(self, command: str, *, timeout: float | None = None, check: bool = False,
            env: dict[str, str] | None = None, stdin: bytes | None = None) -> CommandResult:
        return self._run(command, timeout=timeout, check=check, env=env, stdin=stdin, retry=True)

    def _run(self, command: str, *, timeout: float | None, check: bool, env: dict[str, str] | None,
             stdin: bytes | None, retry: bool) -> CommandResult:
        wire = self._wrap_env(command, env)
        shown = redact(command)
        channel = self._with_retry("open session", self._open_channel) if retry else self._open_channel()
        log.debug("ssh.run", host=self.name, command=shown, env=sorted(env) if env else None, timeout=timeout)
        started = time.monotonic()
        try:
            channel.exec_command(wire)
            stdout, stderr, exit_code = self._collect(channel, stdin, timeout, shown)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._drop()
            raise HostUnreachable(
                self.name, f"connection lost while running {shown!r}: {exc or type(exc).__name__}; not re-run") from None
        finally:
            channel.close()
        result = CommandResult(
            host=self.name, command=command, exit_code=exit_code,
            stdout=stdout.decode("utf-8", errors="replace"), stderr=stderr.decode("utf-8", errors="replace"),
            seconds=time.monotonic() - started,
        )
        log.debug("ssh.done", host=self.name, command=shown, exit_code=exit_code, seconds=round(result.seconds, 3))
        if check and not result.ok:
            raise CommandFailed(self.name, shown, exit_code, redact(result.stderr))
        return result

    def _collect(self, channel: paramiko.Channel, stdin: bytes | None, timeout: float | None,
                 shown: str) -> tuple[bytes, bytes, int]:
        """Read stdout and stderr as they arrive, so neither pipe can fill and stall the command."""
        deadline = None if timeout is None else time.monotonic() + timeout
        writer_error: list[BaseException] = []
        writer = None
        if stdin:
            writer = threading.Thread(target=self._feed, args=(channel, stdin, writer_error),
                                      name=f"ssh-stdin-{self.name}", daemon=True)
            writer.start()
        else:
            channel.shutdown_write()
        out, err = bytearray(), bytearray()
        ready_fd = channel.fileno()
        while True:
            while channel.recv_ready():
                out += channel.recv(_READ_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(_READ_CHUNK)
            if channel.eof_received and not channel.recv_ready() and not channel.recv_stderr_ready():
                break
            if channel.closed:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise HostTimeout(
                    self.name, f"command {shown!r} did not finish within {timeout:g}s; it was abandoned, "
                    "not re-run (it may not be idempotent)")
            select.select([ready_fd], [], [], 1.0 if remaining is None else min(remaining, 1.0))
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not channel.status_event.wait(remaining):
            raise HostTimeout(self.name, f"command {shown!r} sent no exit status within {timeout:g}s; not re-run")
        if writer is not None:
            # Closing first wakes a writer still blocked on a command that never read its stdin.
            channel.close()
            writer.join()
        if writer_error and not isinstance(writer_error[0], OSError):
            raise writer_error[0]
        if channel.exit_status == -1 and not channel.get_transport().is_active():
            raise EOFError("the connection closed before the command reported an exit status")
        # -1 with a live connection: the command died by a signal (sshd sends exit-signal,
        # which carries no exit status).
        return bytes(out), bytes(err), channel.exit_status

    @staticmethod
    def _feed(channel: paramiko.Channel, data: bytes, errors: list[BaseException]) -> None:
        try:
            channel.sendall(data)
            channel.shutdown_write()
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            # A command that exits without reading all of stdin closes the channel under us;
            # its exit code tells the caller what happened.
            errors.append(exc)

    def run_script(self, script: Script, args: list[str] | None = None, *,
                   timeout: float | None = None, check: bool = False) -> CommandResult:
        """Feed a script on stdin to sh or python3, so nothing is left on the host."""
        try:
            runner = posix_interpreter(script)
        except ValueError as exc:
            raise ValueError(f"host {self.name!r}: {exc}") from None
        _, text = script_source(script)
        command = " ".join([*runner, *(shlex.quote(a) for a in args or [])])
        return self.run(command, timeout=timeout, check=check, stdin=text.encode("utf-8"))

    # -- files ------------------------------------------------------------------------------

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once, reused): for ranged reads of large files,
        which SFTP pipelines (readv) where a command's stdout would need base64."""
        return self._sftp_session()

    def _sftp_session(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is not None and self._transport is not None and self._transport.is_active():
                return self._sftp
            channel = self._with_retry("open sftp", self._open_channel)
            try:
                channel.invoke_subsystem("sftp")
                self._sftp = paramiko.SFTPClient(channel)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                channel.close()
                raise ConnectorError(self.name, f"{self._where} offers no SFTP subsystem: {exc}") from None
            return self._sftp

    def put(self, local: Path, remote: str) -> None:
        """Upload to a temporary name beside the target, then rename it into place."""
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"cannot copy {str(local)!r} to host {self.name!r}: no such local file")
        sftp = self._sftp_session()
        target = PurePosixPath(remote)
        temp = str(target.with_name(f".{target.name}.patchdrill-{uuid.uuid4().hex[:12]}"))
        try:
            sftp.put(str(local), temp, confirm=True)
            sftp.chmod(temp, local.stat().st_mode & 0o7777)
            sftp.posix_rename(temp, remote)
        except BaseException as exc:
            self._discard(sftp, temp)
            raise self._file_error("put", remote, exc) from None
        log.debug("ssh.put", host=self.name, local=str(local), remote=remote, bytes=local.stat().st_size)

    def get(self, remote: str, local: Path) -> None:
        """Download to a temporary name beside the target, then rename it into place."""
        local = Path(local)
        if not local.parent.is_dir():
            raise FileNotFoundError(f"cannot copy {remote!r} from host {self.name!r}: no local directory {str(local.parent)!r}")
        sftp = self._sftp_session()
        temp = local.with_name(f".{local.name}.patchdrill-{uuid.uuid4().hex[:12]}")
        try:
            sftp.get(remote, str(temp))
            os.replace(temp, local)
        except BaseException as exc:
            temp.unlink(missing_ok=True)
            raise self._file_error("get", remote, exc) from None
        log.debug("ssh.get", host=self.name, remote=remote, local=str(local), bytes=local.stat().st_size)

    @staticmethod
    def _discard(sftp: paramiko.SFTPClient, path: str) -> None:
        try:
            sftp.remove(path)
        except (OSError, paramiko.SSHException, EOFError):
            pass

    def _file_error(self, action: str, remote: str, exc: BaseException) -> BaseException:
        if isinstance(exc, (EOFError, paramiko.SSHException)) or (
                isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS):
            self._drop()
            return HostUnreachable(self.name, f"connection lost during {action} of {remote!r}: {exc or type(exc).__name__}")
        if isinstance(exc, OSError):
            return ConnectorError(self.name, f"{action} {remote!r} failed: {exc.strerror or exc}")
        return exc

    # -- identity ---------------------------------------------------------------------------

    def boot_identity(self) -> BootIdentity:
        """One command, one connection attempt: reboot gates poll this and decide themselves."""
        result = self._run(_BOOT_IDENTITY_COMMAND, timeout=self.host.connect_timeout, check=False,
                           env=None, stdin=None, retry=False)
        lines = result.stdout.splitlines()
        boot_id = lines[0].strip() if lines else ""
        if result.exit_code != 0 or not boot_id:
            raise ConnectorError(self.name, f"cannot read /proc/sys/kernel/random/boot_id: {result.stderr.strip() or 'no output'}")
        return BootIdentity(
            host=self.name, os_family=self.os_family, boot_id=boot_id,
            os_name=lines[1].strip() if len(lines) > 1 else "",
            rtt_seconds=result.seconds,
            extra={"kernel": lines[2].strip()} if len(lines) > 2 else {},
        )


__all__ = ["KEEPALIVE_SECONDS", "SshConnector"]
