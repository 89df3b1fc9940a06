"""SSH transport for Linux hosts, built on paramiko's SSHClient.

One connector holds one connection (connected lazily, kept alive, reused for every command and
for one SFTP session). It reads the OpenSSH client config (connectors/ssh_route.py), reaches
hosts behind bastions over ProxyJump (a direct-tcpip channel through each jump host), and
verifies every server on the way against known_hosts before it authenticates
(connectors/known_hosts.py holds the host-key policies).
Connecting is retried with the connector's RetryPolicy; a command that was started is never
re-run by this module, since it may not be idempotent.
"""

from __future__ import annotations

import errno
import os
import re
import select
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TypeVar

import paramiko
import structlog
from paramiko.auth_strategy import AuthFailure, AuthResult, AuthSource, AuthStrategy, InMemoryPrivateKey, Password
from tenacity import RetryCallState

from configs.secrets import SecretError, redact
from connectors.base import (
    AuthenticationFailed,
    BootIdentity,
    CommandFailed,
    CommandResult,
    CommandStream,
    Connector,
    ConnectorError,
    HostKeyRejected,
    HostTimeout,
    HostUnreachable,
    RetryPolicy,
    Script,
    SecretReference,
    posix_interpreter,
    script_source,
)
from connectors.known_hosts import HostKeyCheck, KnownHosts, host_key_policy, read_known_hosts
from connectors.ssh_route import Endpoint, Route, RouteError, load_ssh_config, resolve_route

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


@dataclass(frozen=True, kw_only=True)
class SshSettings:
    """What the SSH transport needs to reach and log in to one host, and nothing else.

    Paths are as they will be opened (relative ones already resolved against the config's
    directory); credentials are references, read when connecting.
    """

    transport = "ssh"

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    password: SecretReference | None = None
    key_file: Path | None = None
    key_passphrase: SecretReference | None = None
    agent: bool = True
    #: None: ~/.ssh/known_hosts.
    known_hosts: Path | None = None
    accept_unknown_host_key: bool = False
    #: None: ~/.ssh/config.
    ssh_config: Path | None = None
    connect_timeout: float = 15.0


@dataclass(frozen=True)
class _Credential:
    """One way in: a private key (file or agent) or a password. `label` is safe to log."""

    label: str
    key: paramiko.PKey | None = None
    password: str | None = field(default=None, repr=False)


class _CredentialOrder(AuthStrategy):
    """paramiko's AuthStrategy over our credentials, in our order; `labels` (safe to log) say
    what was tried when all are refused."""

    def __init__(self, user: str, credentials: list[_Credential]) -> None:
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.labels = [c.label for c in credentials]
        self._sources: list[AuthSource] = [
            InMemoryPrivateKey(user, c.key) if c.key is not None else Password(user, partial(str, c.password or ""))
            for c in credentials
        ]

    def get_sources(self) -> Iterator[AuthSource]:
        yield from self._sources


class SshConnector(Connector):
    """Run commands and move files on a Linux host over SSH."""

    os_family = "linux"

    def __init__(self, settings: SshSettings, *, retry: RetryPolicy | None = None) -> None:
        if not isinstance(settings, SshSettings):
            raise ValueError(f"host {getattr(settings, 'name', '?')!r}: SshConnector takes SshSettings (connectors.settings_for), not {type(settings).__name__}")
        self.settings = settings
        self.name = settings.name
        self.retry = retry or RetryPolicy()
        self._lock = threading.RLock()
        self._transport: paramiko.Transport | None = None
        # Jump hosts first, the target last: each carries the next one's connection.
        self._clients: list[paramiko.SSHClient] = []
        self._endpoint: Endpoint | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connection -----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        if self._endpoint is not None:
            return self._endpoint.where
        return f"{self.settings.address}:{self.settings.port or 22}"

    @property
    def known_hosts_path(self) -> Path:
        return self.settings.known_hosts or Path.home() / ".ssh" / "known_hosts"

    def _route(self) -> Route:
        """The target and its jump hosts, from the host's fields over the ssh client config."""
        settings = self.settings
        try:
            return resolve_route(load_ssh_config(settings.ssh_config), settings.address,
                                 port=settings.port, user=settings.user)
        except RouteError as exc:
            raise ConnectorError(self.name, str(exc)) from None

    @staticmethod
    def _prefixed(label: str, message: str) -> str:
        return f"{label}: {message}" if label else message

    def _open_socket(self, endpoint: Endpoint, label: str) -> socket.socket:
        timeout = self.settings.connect_timeout
        try:
            return socket.create_connection((endpoint.hostname, endpoint.port), timeout=timeout)
        except socket.gaierror as exc:
            raise HostUnreachable(self.name, self._prefixed(
                label, f"cannot resolve address {endpoint.hostname!r}: {exc.strerror}")) from None
        except TimeoutError:
            raise HostTimeout(self.name, self._prefixed(
                label, f"no answer from {endpoint.where} within {timeout:g}s")) from None
        except OSError as exc:
            raise HostUnreachable(self.name, self._prefixed(
                label, f"cannot connect to {endpoint.where}: {exc.strerror or exc}")) from None

    def _connect_once(self) -> list[paramiko.SSHClient]:
        """Open, verify and authenticate the clients of one route, jump hosts first (no retry here)."""
        # Configuration faults (bad ssh config, missing key file, unset secret) surface before
        # any network wait.
        route = self._route()
        self._endpoint = route.target
        hops = [(hop, f"jump host {hop.alias}", self._hop_credentials(hop)) for hop in route.jumps]
        steps = [*hops, (route.target, "", self._credentials(route.target))]
        for endpoint, label, credentials in steps:
            if not credentials:
                raise AuthenticationFailed(self.name, self._prefixed(label, self._no_credentials(endpoint, label)))
        known = self._load_known_hosts()
        clients: list[paramiko.SSHClient] = []
        try:
            sock: socket.socket | paramiko.Channel = self._open_socket(steps[0][0], steps[0][1])
            for number, (endpoint, label, credentials) in enumerate(steps):
                clients.append(self._open_client(endpoint, sock, known, credentials, label))
                if number + 1 < len(steps):
                    sock = self._tunnel(clients[-1], endpoint, steps[number + 1][0], label)
        except BaseException:
            for client in reversed(clients):
                client.close()
            raise
        log.info("ssh.connected", host=self.name, address=route.target.where, user=route.target.user,
                 via=[hop.where for hop in route.jumps] or None)
        return clients

    def _open_client(self, endpoint: Endpoint, sock: socket.socket | paramiko.Channel, known: KnownHosts,
                     credentials: list[_Credential], label: str) -> paramiko.SSHClient:
        """SSHClient.connect over `sock`: handshake, host key through the policy, then credentials in order."""
        check = HostKeyCheck(self.name, known, endpoint.hostname, endpoint.port, label)
        client = paramiko.SSHClient()
        known.install_trusted(client.get_host_keys())
        client.set_missing_host_key_policy(host_key_policy(check, self.settings.accept_unknown_host_key))
        strategy = _CredentialOrder(endpoint.user or "", credentials)
        timeout = self.settings.connect_timeout
        try:
            client.connect(endpoint.hostname, port=endpoint.port, username=endpoint.user or "", sock=sock,
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           channel_timeout=timeout, auth_strategy=strategy)
            transport = client.get_transport()
            if transport is None or not transport.is_authenticated():
                raise AuthenticationFailed(self.name, self._prefixed(
                    label, f"user {endpoint.user!r} was only partly authenticated by {endpoint.where}: "
                    "the server asks for a further method patchdrill does not offer"))
        except BaseException as exc:
            try:
                if isinstance(exc, ConnectorError) or not isinstance(exc, Exception):
                    raise
                # Judged before closing: whether the connection was still up tells a refusal
                # from a drop.
                raise self._connect_error(exc, client.get_transport(), endpoint, label, check, strategy) from None
            finally:
                client.close()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_SECONDS)
        return client

    def _connect_error(self, exc: Exception, transport: paramiko.Transport | None, endpoint: Endpoint,
                       label: str, check: HostKeyCheck, strategy: _CredentialOrder) -> Exception:
        """Name what failed: the host key, the credentials, or the network during the handshake."""
        where = endpoint.where
        if isinstance(exc, paramiko.BadHostKeyException):
            # SSHClient found a recorded key of another value: the check words it as OpenSSH does.
            check.refuse_revoked_or_changed(exc.key)
            return HostKeyRejected(self.name, self._prefixed(label, f"host key of {where} does not match known_hosts"))
        if isinstance(exc, AuthFailure):
            return self._auth_error(exc.result, transport, endpoint, label, strategy)
        # start_client returns quietly when its timeout runs out mid-negotiation; SSHClient then
        # finds no session to read a key from.
        if transport is not None and transport.is_active() and not transport.initial_kex_done:
            return HostTimeout(self.name, self._prefixed(label, self._handshake_timeout_message(where)))
        if isinstance(exc, paramiko.SSHException):
            # paramiko wraps the banner read's socket.timeout in a plain SSHException.
            if isinstance(exc.__context__, TimeoutError):
                return HostTimeout(self.name, self._prefixed(label, self._handshake_timeout_message(where)))
            return HostUnreachable(self.name, self._prefixed(label, f"SSH handshake with {where} failed: {redact(str(exc))}"))
        if isinstance(exc, (EOFError, OSError)):
            return HostUnreachable(self.name, self._prefixed(
                label, f"connection to {where} dropped during the handshake: {exc}"))
        return exc

    def _handshake_timeout_message(self, where: str) -> str:
        return (f"{where} accepted the connection but did not complete the SSH handshake "
                f"within {self.settings.connect_timeout:g}s")

    def _tunnel(self, client: paramiko.SSHClient, hop: Endpoint, onward: Endpoint, label: str) -> paramiko.Channel:
        """A direct-tcpip channel from the jump host to the next server: the next hop's socket."""
        transport = client.get_transport()
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (onward.hostname, onward.port), ("", 0),
                                          timeout=self.settings.connect_timeout)
        except paramiko.ChannelException as exc:
            raise HostUnreachable(self.name, f"{label} ({hop.where}) cannot reach {onward.where}: {exc.text}") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            error = HostTimeout if "timeout" in str(exc).lower() else HostUnreachable
            raise error(self.name, f"{label} ({hop.where}) did not open a tunnel to {onward.where}: "
                                   f"{exc or type(exc).__name__}") from None

    def _ensure_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            self._drop()
            self._clients = self._connect_once()
            self._transport = self._clients[-1].get_transport()
            assert self._transport is not None
            return self._transport

    def _open_channel(self) -> paramiko.Channel:
        transport = self._ensure_transport()
        try:
            return transport.open_session(timeout=self.settings.connect_timeout)
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
        sftp, clients = self._sftp, self._clients
        self._sftp, self._transport, self._clients = None, None, []
        if sftp is not None:
            try:
                sftp.close()
            except Exception:  # noqa: BLE001 - closing a dead session must not mask the real error
                pass
        # The target first, then each jump host whose channel carried it.
        for client in reversed(clients):
            client.close()

    def _load_known_hosts(self) -> KnownHosts:
        path = self.known_hosts_path
        try:
            return read_known_hosts(path)
        except OSError as exc:
            raise HostKeyRejected(self.name, f"cannot read known_hosts file {str(path)!r}: {exc.strerror or exc}") from None

    # -- authentication ---------------------------------------------------------------------

    def _credentials(self, target: Endpoint) -> list[_Credential]:
        """Explicit credentials first, the agent last: sshd counts every refused key against
        MaxAuthTries, and a full agent must not use up the tries before the configured ones."""
        settings = self.settings
        found: list[_Credential] = []
        if settings.key_file:
            found.append(self._key_file_credential(settings.key_file))
        found.extend(self._config_identities(target, found))
        if settings.password:
            found.append(_Credential(label=f"password from {settings.password}",
                                     password=self._secret(settings.password, "password")))
        if settings.agent and not target.identities_only:
            found.extend(self._agent_credentials())
        return found

    def _hop_credentials(self, hop: Endpoint) -> list[_Credential]:
        """A jump host gets keys only: its IdentityFile, the host's ssh_key, the agent. The host's
        password is meant for the target and is never sent to a machine on the way."""
        found = self._config_identities(hop, [])
        if self.settings.key_file:
            key = self._key_file_credential(self.settings.key_file)
            if all(c.key != key.key for c in found):
                found.append(key)
        if self.settings.agent and not hop.identities_only:
            found.extend(self._agent_credentials())
        return found

    def _no_credentials(self, endpoint: Endpoint, label: str) -> str:
        if label:
            return (f"no credentials for user {endpoint.user!r}: give the jump host an IdentityFile in the "
                    "ssh config, set ssh_key, or load a key into the SSH agent")
        return f"no credentials for user {endpoint.user!r}: set ssh_key, password, or load a key into the SSH agent"

    @staticmethod
    def _agent_credentials() -> list[_Credential]:
        try:
            agent_keys = paramiko.Agent().get_keys()
        except paramiko.SSHException:
            agent_keys = ()
        return [_Credential(label=f"agent key {k.get_name()} {k.fingerprint}", key=k) for k in agent_keys]

    def _config_identities(self, endpoint: Endpoint, already: list[_Credential]) -> list[_Credential]:
        """IdentityFile keys from the ssh config. As with OpenSSH, one that is missing or cannot
        be opened without a prompt is skipped, not fatal: other credentials may still get in."""
        found: list[_Credential] = []
        for path in endpoint.identity_files:
            try:
                key = paramiko.PKey.from_path(path)
            except FileNotFoundError:
                log.debug("ssh.identity_file.missing", host=self.name, path=str(path))
                continue
            except (paramiko.SSHException, ValueError, TypeError, OSError) as exc:
                log.warning("ssh.identity_file.skipped", host=self.name, path=str(path),
                            reason=redact(str(exc)) or type(exc).__name__)
                continue
            if all(c.key != key for c in [*already, *found]):
                found.append(_Credential(label=f"IdentityFile {path} ({key.get_name()})", key=key))
        return found

    def _secret(self, reference: SecretReference, field_name: str) -> str:
        try:
            return reference.value()
        except SecretError as exc:
            raise AuthenticationFailed(self.name, f"field {field_name}: {exc}") from None

    def _key_file_credential(self, path: Path) -> _Credential:
        passphrase = (self._secret(self.settings.key_passphrase, "ssh_key_passphrase")
                      if self.settings.key_passphrase else None)
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

    def _auth_error(self, result: AuthResult, transport: paramiko.Transport | None, endpoint: Endpoint,
                    label: str, strategy: _CredentialOrder) -> ConnectorError:
        where = endpoint.where
        server_accepts: list[str] | None = None
        for attempt in result:
            outcome = attempt.result
            if isinstance(outcome, paramiko.BadAuthenticationType):
                server_accepts = list(outcome.allowed_types)
            elif not isinstance(outcome, paramiko.AuthenticationException) and isinstance(
                    outcome, (paramiko.SSHException, EOFError, OSError)):
                return HostUnreachable(self.name, self._prefixed(
                    label, f"connection to {where} dropped during authentication: {redact(str(outcome))}"))
        if transport is None or not transport.is_active():
            # paramiko reports a connection dropped mid-authentication (a host going down for a
            # reboot) as a refusal; it is a transient fault, not bad credentials.
            return HostUnreachable(self.name, self._prefixed(label, f"connection to {where} dropped during authentication"))
        tried = "; ".join(strategy.labels[:len(result)])
        accepts = f"; the server accepts: {', '.join(server_accepts)}" if server_accepts else ""
        return AuthenticationFailed(self.name, self._prefixed(
            label, redact(f"user {endpoint.user!r} was refused by {where}; tried: {tried}{accepts}")))

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

    def open_stream(self, command: str) -> CommandStream:
        channel = self._with_retry("open session", self._open_channel)
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            raise HostUnreachable(self.name, f"cannot start {redact(command)[:80]!r}: {exc or type(exc).__name__}") from None
        return _SshStream(self.name, channel)

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
        result = self._run(_BOOT_IDENTITY_COMMAND, timeout=self.settings.connect_timeout, check=False,
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


__all__ = ["KEEPALIVE_SECONDS", "SshConnector", "SshSettings"]


class _SshStream(CommandStream):
    def __init__(self, host: str, channel: paramiko.Channel) -> None:
        super().__init__(host)
        self.channel = channel

    def send(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(self.host, f"a running command's channel closed: {exc or type(exc).__name__}") from None

    def _receive(self, timeout: float) -> bytes | None:
        if not self.channel.recv_ready():
            if self.channel.eof_received or self.channel.closed:
                return b""
            select.select([self.channel.fileno()], [], [], timeout)
            if not self.channel.recv_ready():
                return b"" if self.channel.eof_received or self.channel.closed else None
        return self.channel.recv(_READ_CHUNK)

    def close(self, grace: float = 2.0) -> None:
        try:
            self.channel.shutdown_write()
            self.channel.status_event.wait(grace)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            # Closing the channel hangs up the command: sshd signals it when it has not ended.
            self.channel.close()
