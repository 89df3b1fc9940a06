"""Server side of WinRM authentication for the WS-Management test host: HTTP Basic, NTLM
(pyspnego's acceptor, the same NTLM code clients use) and NTLM message encryption
(MS-WSMV 2.2.9.1.1: multipart/encrypted bodies, "application/HTTP-SPNEGO-session-encrypted").

NTLM authenticates a TCP connection, not a request, as IIS and WinRM do: one
`ConnectionAuth` lives as long as its connection, and its security context seals and unseals
every message on it afterwards.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import spnego
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError

ENCRYPTED_PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
BOUNDARY = b"--Encrypted Boundary"
NTLM_SIGNATURE_LENGTH = 16


class AuthRejected(Exception):
    """The request's credentials were refused; the server answers 401."""


class NtlmUserStore:
    """The flat credential file pyspnego's NTLM acceptor reads (lines `DOMAIN:USER:PASSWORD`).

    pyspnego finds it only through the NTLM_USER_FILE environment variable, read while a
    handshake runs, so the variable stays set for as long as a test host serves NTLM.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._previous: str | None = None
        path.touch(mode=0o600, exist_ok=True)

    def add(self, user: str, password: str, domain: str = "") -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{domain}:{user}:{password}\n")

    def activate(self) -> None:
        self._previous = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = str(self.path)

    def deactivate(self) -> None:
        if self._previous is None:
            os.environ.pop("NTLM_USER_FILE", None)
        else:
            os.environ["NTLM_USER_FILE"] = self._previous


@dataclass
class ConnectionAuth:
    """Authentication state of one TCP connection."""

    user: str | None = None
    ntlm: spnego.ContextProxy | None = None
    handshakes: int = field(default=0)

    @property
    def can_seal(self) -> bool:
        return self.user is not None and self.ntlm is not None and self.ntlm.complete


def channel_bindings(server_cert_der: bytes) -> GssChannelBindings:
    """RFC 5929 tls-server-end-point bindings, as NTLM clients compute them over HTTPS."""
    return GssChannelBindings(application_data=b"tls-server-end-point:" + hashlib.sha256(server_cert_der).digest())


def check_basic(header: str, users: dict[str, str]) -> str:
    """The user a Basic Authorization header proves, or AuthRejected."""
    try:
        user, _, password = base64.b64decode(header.split(" ", 1)[1]).decode("utf-8").partition(":")
    except (IndexError, binascii.Error, UnicodeDecodeError):
        raise AuthRejected("malformed Basic credentials") from None
    if users.get(user) != password:
        raise AuthRejected(f"wrong password for {user!r}")
    return user


def ntlm_step(state: ConnectionAuth, header: str, bindings: GssChannelBindings | None) -> bytes | None:
    """Advance the connection's NTLM handshake with one `Negotiate|NTLM <token>` header.

    Returns the challenge token to send back in a 401, or None once the client is authenticated.
    """
    try:
        token = base64.b64decode(header.split(" ", 1)[1])
    except (IndexError, binascii.Error):
        raise AuthRejected("malformed NTLM token") from None
    if not token.startswith(b"NTLMSSP\x00"):
        raise AuthRejected("only raw NTLM tokens are accepted (no Kerberos here)")
    message_type = struct.unpack("<I", token[8:12])[0]
    if message_type == 1:
        state.ntlm = spnego.server(protocol="ntlm", channel_bindings=bindings)
        state.user = None
        state.handshakes += 1
    elif state.ntlm is None:
        raise AuthRejected("NTLM authenticate message without a negotiate first")
    try:
        reply = state.ntlm.step(token)
    except SpnegoError as exc:
        state.ntlm = None
        raise AuthRejected(f"NTLM rejected: {exc.message}") from None
    if state.ntlm.complete:
        state.user = state.ntlm.client_principal or "unknown"
        return None
    return reply


def decrypt_body(state: ConnectionAuth, body: bytes) -> bytes:
    """Unseal a multipart/encrypted request body with the connection's NTLM context."""
    if not state.can_seal:
        raise AuthRejected("encrypted body on a connection that has not authenticated with NTLM")
    assert state.ntlm is not None
    parts = [p for p in body.split(BOUNDARY + b"\r\n") if p]
    if len(parts) != 2:
        raise ValueError(f"expected one encrypted part, found {len(parts) // 2}")
    header, payload = parts
    expected = int(header.split(b"Length=")[1].split(b"\r\n")[0])
    payload = payload.removesuffix(BOUNDARY + b"--\r\n")
    payload = payload.removeprefix(b"\tContent-Type: application/octet-stream\r\n")
    # NTLM's unwrap takes the 16-byte signature and the sealed data as one buffer, which is
    # exactly what follows the length prefix.
    if struct.unpack("<i", payload[:4])[0] != NTLM_SIGNATURE_LENGTH:
        raise ValueError("NTLM signature length is not 16")
    plain = state.ntlm.unwrap(payload[4:]).data
    if len(plain) != expected:
        raise ValueError(f"decrypted {len(plain)} bytes, header announced {expected}")
    return plain


def encrypt_body(state: ConnectionAuth, plain: bytes) -> tuple[bytes, str]:
    """Seal a response body; returns the body and its Content-Type."""
    assert state.ntlm is not None
    wrapped = state.ntlm.wrap(plain, encrypt=True).data
    signature, sealed = wrapped[:NTLM_SIGNATURE_LENGTH], wrapped[NTLM_SIGNATURE_LENGTH:]
    body = (
        BOUNDARY + b"\r\n"
        b"\tContent-Type: " + ENCRYPTED_PROTOCOL.encode() + b"\r\n"
        b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=" + str(len(plain)).encode() + b"\r\n"
        + BOUNDARY + b"\r\n"
        b"\tContent-Type: application/octet-stream\r\n"
        + struct.pack("<i", len(signature)) + signature + sealed
        + BOUNDARY + b"--\r\n"
    )
    content_type = f'multipart/encrypted;protocol="{ENCRYPTED_PROTOCOL}";boundary="Encrypted Boundary"'
    return body, content_type
