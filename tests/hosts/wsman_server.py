"""A WS-Management test host that pywinrm talks to for real.

Real: HTTP/1.1 with keep-alive, HTTPS with a certificate from a throwaway CA, WS-Management
SOAP envelopes as pywinrm builds and parses them, HTTP Basic and NTLM authentication (pyspnego
acceptor, channel binding checked over HTTPS), NTLM message encryption over plain HTTP, the
remote shell lifecycle (Create, Command, Send, Receive, Signal, Delete), output streamed in
envelopes under MaxEnvelopeSize, the OperationTimeout fault (w:TimedOut, 2150858793) when a
Receive waits longer than the client asked, "shell not found" after a restart, and a host that
goes down (connections refused) and comes back.

Simulated: PowerShell and Windows itself; see tests/hosts/wsman_sim.py for what exactly.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable
from xml.sax.saxutils import escape, quoteattr

from configs.models import HostConfig
from tests.hosts.wsman_auth import (
    AuthRejected,
    ConnectionAuth,
    NtlmUserStore,
    channel_bindings,
    check_basic,
    decrypt_body,
    encrypt_body,
    ntlm_step,
)
from tests.hosts.wsman_sim import CommandStreams, Handler, SimulatedWindows
from tests.hosts.wsman_tls import ServerTls

log = logging.getLogger("patchdrill.tests.wsman")

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "x": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "f": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
}
SHELL = NS["rsp"]
ACTION_CREATE = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create"
ACTION_DELETE = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete"
ACTION_COMMAND = f"{SHELL}/Command"
ACTION_RECEIVE = f"{SHELL}/Receive"
ACTION_SEND = f"{SHELL}/Send"
ACTION_SIGNAL = f"{SHELL}/Signal"
FAULT_ACTION = "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"
CODE_TIMED_OUT = 2150858793
CODE_SHELL_NOT_FOUND = 2150858843
CODE_BAD_REQUEST = 2150858817
#: raw output bytes per Receive: base64 of this stays under pywinrm's 153600-byte MaxEnvelopeSize
RECEIVE_CHUNK = 96 * 1024


class WsmanFault(Exception):
    def __init__(self, code: int, subcode: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.subcode, self.reason = code, subcode, reason


@dataclass
class Shell:
    id: str
    codepage: int
    env: dict[str, str]
    commands: dict[str, CommandStreams] = field(default_factory=dict)


def _seconds(duration: str | None, default: float) -> float:
    """An xs:duration such as PT20S, PT1M30.5S."""
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", (duration or "").strip())
    if not match or not any(match.groups()):
        return default
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class WsmanService:
    """The shell plug-in: SOAP in, SOAP out."""

    def __init__(self, windows: SimulatedWindows) -> None:
        self.windows = windows
        self.shells: dict[str, Shell] = {}
        self._lock = threading.Lock()
        self.operation_timeouts = 0

    def handle(self, body: bytes) -> tuple[int, bytes]:
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            return 400, self._fault("", WsmanFault(CODE_BAD_REQUEST, "w:SchemaValidationError", f"bad XML: {exc}"))
        header = root.find("s:Header", NS)
        message_id = (header.findtext("a:MessageID", "", NS) if header is not None else "") or ""
        action = (header.findtext("a:Action", "", NS) if header is not None else "") or ""
        try:
            handler = {
                ACTION_CREATE: self._create, ACTION_DELETE: self._delete, ACTION_COMMAND: self._command,
                ACTION_RECEIVE: self._receive, ACTION_SEND: self._send, ACTION_SIGNAL: self._signal,
            }.get(action)
            if handler is None:
                raise WsmanFault(CODE_BAD_REQUEST, "a:ActionNotSupported", f"action {action!r} is not supported")
            reply = handler(root)
        except WsmanFault as fault:
            return 500, self._fault(message_id, fault)
        return 200, self._envelope(action + "Response", message_id, reply)

    # envelopes ------------------------------------------------------------------------------
    @staticmethod
    def _envelope(action: str, relates_to: str, body: str) -> bytes:
        namespaces = " ".join(f'xmlns:{prefix}="{uri}"' for prefix, uri in NS.items())
        return (
            f"<s:Envelope xml:lang=\"en-US\" {namespaces}><s:Header>"
            f"<a:Action>{escape(action)}</a:Action><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
            "<a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>"
            f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"
        ).encode("utf-8")

    def _fault(self, relates_to: str, fault: WsmanFault) -> bytes:
        body = (
            f"<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>{escape(fault.subcode)}</s:Value>"
            f"</s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en-US\">{escape(fault.reason)}</s:Text></s:Reason>"
            f"<s:Detail><f:WSManFault Code=\"{fault.code}\" Machine={quoteattr(self.windows.computer_name)}>"
            f"<f:Message>{escape(fault.reason)}</f:Message></f:WSManFault></s:Detail></s:Fault>"
        )
        return self._envelope(FAULT_ACTION, relates_to, body)

    # shell plumbing -------------------------------------------------------------------------
    def _shell(self, root: ET.Element) -> Shell:
        shell_id = ""
        for selector in root.iterfind("s:Header/w:SelectorSet/w:Selector", NS):
            if selector.get("Name") == "ShellId":
                shell_id = selector.text or ""
        with self._lock:
            shell = self.shells.get(shell_id)
        if shell is None:
            raise WsmanFault(CODE_SHELL_NOT_FOUND, "w:InvalidSelectors",
                             f"The request for the Windows Remote Shell with ShellId {shell_id} failed because "
                             "the shell was not found on the server. Possible causes are: the specified ShellId "
                             "is incorrect or the shell no longer exists on the server.")
        return shell

    @staticmethod
    def _command_of(shell: Shell, command_id: str | None) -> CommandStreams:
        streams = shell.commands.get(command_id or "")
        if streams is None:
            raise WsmanFault(CODE_SHELL_NOT_FOUND, "w:InvalidParameter", f"no command {command_id} in shell {shell.id}")
        return streams

    @staticmethod
    def _options(root: ET.Element) -> dict[str, str]:
        return {o.get("Name", ""): o.text or "" for o in root.iterfind("s:Header/w:OptionSet/w:Option", NS)}

    def _create(self, root: ET.Element) -> str:
        options = self._options(root)
        env = {v.get("Name", ""): v.text or "" for v in root.iterfind("s:Body/rsp:Shell/rsp:Environment/rsp:Variable", NS)}
        shell = Shell(id=str(uuid.uuid4()).upper(), codepage=int(options.get("WINRS_CODEPAGE", "437")), env=env)
        with self._lock:
            self.shells[shell.id] = shell
        return (
            "<x:ResourceCreated><a:Address>http://windows-host/wsman</a:Address><a:ReferenceParameters>"
            "<w:ResourceURI>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>"
            f"<w:SelectorSet><w:Selector Name=\"ShellId\">{shell.id}</w:Selector></w:SelectorSet>"
            f"</a:ReferenceParameters></x:ResourceCreated><rsp:Shell><rsp:ShellId>{shell.id}</rsp:ShellId></rsp:Shell>"
        )

    def _delete(self, root: ET.Element) -> str:
        shell = self._shell(root)
        with self._lock:
            self.shells.pop(shell.id, None)
        for streams in shell.commands.values():
            streams.terminate()
        return ""

    def _command(self, root: ET.Element) -> str:
        shell = self._shell(root)
        line = root.find("s:Body/rsp:CommandLine", NS)
        if line is None:
            raise WsmanFault(CODE_BAD_REQUEST, "w:SchemaValidationError", "Command without rsp:CommandLine")
        parts = [line.findtext("rsp:Command", "", NS) or ""]
        parts += [arg.text or "" for arg in line.iterfind("rsp:Arguments", NS)]
        command_id = str(uuid.uuid4()).upper()
        streams = CommandStreams()
        shell.commands[command_id] = streams
        threading.Thread(
            target=self.windows.execute, args=(" ".join(p for p in parts if p), streams),
            kwargs={"codepage": shell.codepage, "env": shell.env}, name=f"wsman-command-{command_id[:8]}", daemon=True,
        ).start()
        return f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId></rsp:CommandResponse>"

    def _receive(self, root: ET.Element) -> str:
        shell = self._shell(root)
        desired = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
        command_id = desired.get("CommandId") if desired is not None else None
        streams = self._command_of(shell, command_id)
        header = root.find("s:Header", NS)
        wait = _seconds(header.findtext("w:OperationTimeout", None, NS) if header is not None else None, 60.0)
        taken = streams.take(RECEIVE_CHUNK, wait)
        if taken is None:
            with self._lock:
                self.operation_timeouts += 1
            raise WsmanFault(CODE_TIMED_OUT, "w:TimedOut",
                             "The WS-Management service cannot complete the operation within the time specified in OperationTimeout.")
        out, err, exit_code = taken
        if exit_code is None and streams.terminated:
            exit_code = 1
        parts = [
            f'<rsp:Stream Name="{name}" CommandId="{command_id}">{b64encode(data).decode("ascii")}</rsp:Stream>'
            for name, data in (("stdout", out), ("stderr", err)) if data
        ]
        if exit_code is None:
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{SHELL}/CommandState/Running"/>')
        else:
            parts += [f'<rsp:Stream Name="{name}" CommandId="{command_id}" End="true"/>' for name in ("stdout", "stderr")]
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{SHELL}/CommandState/Done">'
                         f"<rsp:ExitCode>{exit_code}</rsp:ExitCode></rsp:CommandState>")
        return f"<rsp:ReceiveResponse>{''.join(parts)}</rsp:ReceiveResponse>"

    def _send(self, root: ET.Element) -> str:
        shell = self._shell(root)
        for stream in root.iterfind("s:Body/rsp:Send/rsp:Stream", NS):
            streams = self._command_of(shell, stream.get("CommandId"))
            streams.feed_stdin(b64decode(stream.text or ""), end=stream.get("End", "false").lower() == "true")
        return "<rsp:SendResponse/>"

    def _signal(self, root: ET.Element) -> str:
        shell = self._shell(root)
        signal = root.find("s:Body/rsp:Signal", NS)
        command_id = signal.get("CommandId") if signal is not None else None
        code = (signal.findtext("rsp:Code", "", NS) if signal is not None else "") or ""
        streams = self._command_of(shell, command_id)
        if code.endswith(("/terminate", "/ctrl_c", "/ctrl_break")):
            streams.terminate()
            shell.commands.pop(command_id or "", None)
        return "<rsp:SignalResponse/>"

    def drop_all(self) -> None:
        """What a restart does to shells: every one is gone, every command killed."""
        with self._lock:
            shells, self.shells = list(self.shells.values()), {}
        for shell in shells:
            for streams in shell.commands.values():
                streams.terminate()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], host: "WsmanTestHost") -> None:
        self.host = host
        self.tls_context: ssl.SSLContext | None = None
        if host.tls is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(host.tls.cert, host.tls.key)
        self.connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def forget(self, request: socket.socket) -> None:
        with self._connections_lock:
            self.connections.discard(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections, self.connections = list(self.connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that reject our certificate or hang up mid-request are part of the tests.
        log.debug("wsman connection from %s ended with an error", client_address, exc_info=True)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def setup(self) -> None:
        self.raw_connection = self.request
        # Headers and body go out as two writes; without NODELAY each reply waits on a delayed ACK.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.server.tls_context is not None:
            self.request = self.server.tls_context.wrap_socket(self.request, server_side=True)
        super().setup()
        self.auth = ConnectionAuth()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.forget(self.raw_connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("wsman %s", format % args)

    def _reply(self, status: int, body: bytes = b"", content_type: str = "application/soap+xml;charset=UTF-8",
               headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _challenge(self, token: bytes | None = None, scheme: str = "Negotiate") -> None:
        host = self.server.host
        if token is not None:
            headers = [("WWW-Authenticate", f"{scheme} {b64encode(token).decode('ascii')}")]
        else:
            headers = [("WWW-Authenticate", "Negotiate")] if "ntlm" in host.auth else []
            headers += [("WWW-Authenticate", 'Basic realm="WSMAN"')] if "basic" in host.auth else []
        self._reply(401, headers=headers)

    def _authenticate(self) -> str | None:
        """The authenticated user, or None after answering 401."""
        host = self.server.host
        header = self.headers.get("Authorization")
        if header is None:
            if self.auth.user is not None:
                return self.auth.user
            self._challenge()
            return None
        scheme = header.split(" ", 1)[0]
        try:
            if scheme.lower() == "basic" and "basic" in host.auth:
                user = check_basic(header, {host.user: host.password})
            elif scheme.lower() in ("negotiate", "ntlm") and "ntlm" in host.auth:
                challenge = ntlm_step(self.auth, header, host.bindings)
                if challenge is not None:
                    self._challenge(challenge, scheme)
                    return None
                user = (self.auth.user or "").rsplit("\\", 1)[-1]
                if user.lower() != host.user.lower():
                    self.auth = ConnectionAuth()
                    raise AuthRejected(f"{user!r} may not log on to this host")
            else:
                raise AuthRejected(f"authentication scheme {scheme!r} is not enabled")
        except AuthRejected as exc:
            host.rejections.append(str(exc))
            self._challenge()
            return None
        return user

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/").lower() != "/wsman":
            self._reply(404)
            return
        if self._authenticate() is None:
            return
        host = self.server.host
        encrypted = self.headers.get("Content-Type", "").startswith("multipart/encrypted")
        try:
            plain = decrypt_body(self.auth, body) if encrypted else body
        except (AuthRejected, ValueError) as exc:
            host.rejections.append(f"cannot decrypt: {exc}")
            self._challenge()
            return
        if not plain:
            # An empty POST only authenticates the connection (pywinrm's step before encrypting).
            self._reply(200)
            return
        if not encrypted and host.scheme == "http" and not host.allow_unencrypted:
            host.rejections.append("unencrypted message over http")
            self._reply(400, host.service._fault("", WsmanFault(
                CODE_BAD_REQUEST, "w:AccessDenied", "Unencrypted traffic is disabled on this host (AllowUnencrypted=false).")))
            return
        host.requests += 1
        status, reply = host.service.handle(plain)
        if encrypted:
            reply, content_type = encrypt_body(self.auth, reply)
            self._reply(status, reply, content_type)
        else:
            self._reply(status, reply)


class WsmanTestHost:
    """One simulated Windows host behind a real WS-Management endpoint.

    `handlers` and `boot_time` are the simulated machine's (see SimulatedWindows); `reboot()`
    takes the endpoint down (connections refused), then brings it back with a new boot time.
    """

    def __init__(self, *, scheme: str = "https", auth: Iterable[str] = ("ntlm",), user: str = "patchdrill",
                 password: str, password_env: str, tls: ServerTls | None = None, ca_bundle: Path | None = None,
                 ntlm_store: NtlmUserStore | None = None, allow_unencrypted: bool | None = None,
                 address: str = "127.0.0.1", windows: SimulatedWindows | None = None) -> None:
        self.scheme, self.auth, self.user, self.password = scheme, frozenset(auth), user, password
        self.password_env = password_env
        self.tls, self.ca_bundle, self.address = tls, ca_bundle, address
        if scheme == "https" and tls is None:
            raise ValueError("an https test host needs TLS material (tests.hosts.wsman_tls)")
        if "ntlm" in self.auth:
            if ntlm_store is None:
                raise ValueError("an NTLM test host needs an NtlmUserStore")
            ntlm_store.add(user, password)
        if allow_unencrypted is None:
            # Like a lab WinRM listener: Basic over http only works with AllowUnencrypted on.
            allow_unencrypted = scheme == "https" or "basic" in self.auth
        self.allow_unencrypted = allow_unencrypted
        self.bindings = channel_bindings(tls.der) if tls is not None and scheme == "https" else None
        self.windows = windows or SimulatedWindows()
        self.service = WsmanService(self.windows)
        self.port = 0
        self.requests = 0
        self.rejections: list[str] = []
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._coming_back: threading.Timer | None = None
        self.outages: list[tuple[float, float]] = []

    # the simulated machine --------------------------------------------------------------------
    @property
    def handlers(self) -> list[Handler]:
        return self.windows.handlers

    @property
    def boot_time(self) -> dt.datetime:
        return self.windows.boot_time

    @boot_time.setter
    def boot_time(self, value: dt.datetime) -> None:
        self.windows.boot_time = value

    @property
    def operation_timeouts(self) -> int:
        """How many OperationTimeout faults the server has answered Receives with."""
        return self.service.operation_timeouts

    # lifecycle --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.address}:{self.port}/wsman"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> "WsmanTestHost":
        with self._lifecycle:
            if self._server is not None:
                return self
            server = _HttpServer((self.address, self.port), self)
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name=f"wsman-{self.port}", daemon=True)
            self._thread.start()
        return self

    def go_down(self) -> None:
        """Stop answering: the port refuses connections, open ones are cut, shells are lost."""
        with self._lifecycle:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if thread is not None:
            thread.join()
        self.service.drop_all()

    def reboot(self, down_for: float = 1.0) -> None:
        """Go down now; come back after `down_for` seconds with a new LastBootUpTime. The
        outage, from going down to listening again, is kept in `outages` (monotonic seconds)."""
        went_down = time.monotonic()
        self.go_down()

        def come_back() -> None:
            self.boot_time = dt.datetime.now(dt.timezone.utc)
            self.start()
            self.outages.append((went_down, time.monotonic()))

        self._coming_back = threading.Timer(down_for, come_back)
        self._coming_back.daemon = True
        self._coming_back.start()

    def stop(self) -> None:
        if self._coming_back is not None:
            self._coming_back.cancel()
            self._coming_back.join()
        self.go_down()

    def host_config(self, name: str = "win-test", **overrides: Any) -> HostConfig:
        """A HostConfig that reaches this host (the password by `env:` reference)."""
        fields: dict[str, Any] = {
            "name": name, "address": self.address, "port": self.port, "transport": "winrm", "os_family": "windows",
            "user": self.user, "password": f"env:{self.password_env}", "winrm_scheme": self.scheme,
            "winrm_auth": "ntlm" if "ntlm" in self.auth else "basic",
            "winrm_ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
            "allow_insecure_transport": self.scheme == "http" and "ntlm" not in self.auth,
        }
        fields.update(overrides)
        return HostConfig(**fields)
