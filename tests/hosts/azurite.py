"""Azurite, Microsoft's Azure Storage emulator, as the blob test host.

One blob server per test session on a free loopback port with a private workspace; every test
that asks for `azure_store` gets a container of its own. Azurite comes from the repository's
package.json (pinned to a release that runs on this machine's Node); `npm ci` runs once if
node_modules is missing.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import ipaddress
import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import ContainerClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.stores import AzureBlobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"

# Azurite's documented development account: public, identical on every installation.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# Identities inside the test tokens; any GUIDs do.
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OBJECT_ID = "0b1f5d3a-7c2e-4e55-9a61-3f6c2d8e9b10"

# Limits for a server that never comes up, not expectations of how fast it is.
STARTUP_LIMIT = 90.0
STOP_LIMIT = 15.0


class AzuriteUnavailable(RuntimeError):
    """Azurite could not be installed or started; the message says why and where its log is."""


@dataclass(frozen=True)
class AzuriteServer:
    port: int
    workspace: Path
    log: Path
    #: the self-signed certificate of an HTTPS server, None for plain HTTP
    ca_cert: Path | None = None

    @property
    def blob_endpoint(self) -> str:
        scheme = "https" if self.ca_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.blob_endpoint};"
        )

    def container(self, name: str) -> ContainerClient:
        return ContainerClient.from_connection_string(self.connection_string, name)


class ListRequests:
    """A `raw_request_hook` for a ContainerClient: the prefix of every List Blobs request it sends
    (one per page of up to 5,000 names), as the service sees them."""

    def __init__(self) -> None:
        self.prefixes: list[str] = []

    def __call__(self, request: Any) -> None:
        query = request.http_request.query
        if query.get("comp") == "list":
            self.prefixes.append(unquote(query.get("prefix", "")))


def ensure_azurite_installed() -> Path:
    """Install the pinned Azurite with `npm ci` unless it is there; one installer at a time."""
    if AZURITE_BLOB.exists():
        return AZURITE_BLOB
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteUnavailable("Azurite is not installed and npm is not on PATH: install Node 20 and npm, then run `npm ci`")
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"patchdrill-npm-ci-{checkout}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not AZURITE_BLOB.exists():
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not AZURITE_BLOB.exists():
                raise AzuriteUnavailable(f"`npm ci` in {REPO_ROOT} failed ({done.returncode}): {done.stderr[-2000:]}")
    return AZURITE_BLOB


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str, ca_cert: Path | None) -> bool:
    try:
        httpx.get(url, timeout=2.0, verify=str(ca_cert) if ca_cert else True)
    except httpx.TransportError:
        return False
    return True  # any HTTP answer, even an authentication error, means the server is serving


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def start_azurite(workspace: Path, *, oauth: bool = False) -> tuple[subprocess.Popen[bytes], AzuriteServer]:
    """Start azurite-blob and wait until it answers; retries if the free port was taken meanwhile.

    With oauth, the server speaks HTTPS with a fresh self-signed certificate and also accepts
    bearer tokens (Azurite's basic OAuth check, which the SDK only uses over HTTPS).
    """
    binary = ensure_azurite_installed()
    log = workspace / "azurite.log"
    extra: list[str] = []
    ca_cert: Path | None = None
    if oauth:
        ca_cert, key = write_self_signed_certificate(workspace)
        extra = ["--oauth", "basic", "--cert", str(ca_cert), "--key", str(key)]
    for _ in range(3):
        server = AzuriteServer(port=free_port(), workspace=workspace, log=log, ca_cert=ca_cert)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(server.port),
                 "--location", str(workspace / "data"), "--skipApiVersionCheck", "--loose",
                 "--disableTelemetry", "--silent", *extra],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workspace,
            )
        deadline = time.monotonic() + STARTUP_LIMIT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(server.blob_endpoint + "?comp=list", ca_cert):
                return process, server
            time.sleep(0.1)
        stop_process(process)
        if "EADDRINUSE" not in _log_tail(log):
            break
    raise AzuriteUnavailable(f"Azurite did not start on 127.0.0.1 (log {log}):\n{_log_tail(log)}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_LIMIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """A running Azurite blob service for the whole session."""
    process, server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def azurite_oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """A second Azurite over HTTPS that also accepts bearer tokens (see EmulatorTokenCredential)."""
    process, server = start_azurite(tmp_path_factory.mktemp("azurite-oauth"), oauth=True)
    try:
        yield server
    finally:
        stop_process(process)


class EmulatorTokenCredential:
    """A TokenCredential issuing unsigned tokens that Azurite's basic OAuth check accepts.

    There is no Microsoft Entra ID here to issue real tokens; Azurite checks a token's issuer,
    audience and lifetime but not its signature, so these exercise the SDK's real bearer-token
    and user-delegation-key paths against a real server.
    """

    def __init__(self, lifetime: timedelta = timedelta(hours=1)) -> None:
        self.lifetime = lifetime

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        now = int(time.time())
        expires = now + int(self.lifetime.total_seconds())
        claims = {
            "aud": "https://storage.azure.com", "iss": f"https://sts.windows.net/{TENANT_ID}/",
            "iat": now - 60, "nbf": now - 60, "exp": expires, "oid": OBJECT_ID, "tid": TENANT_ID,
        }
        encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()  # noqa: E731
        return AccessToken(f"{encode({'alg': 'none', 'typ': 'JWT'})}.{encode(claims)}.", expires)


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azurite test host")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def azurite_connection_string(azurite: AzuriteServer) -> str:
    return azurite.connection_string


@pytest.fixture
def azure_container_name() -> str:
    return f"t-{uuid.uuid4().hex[:24]}"


@pytest.fixture
def azure_store(azurite: AzuriteServer, azure_container_name: str) -> Iterator[AzureBlobStore]:
    """An AzureBlobStore on a fresh container of its own, removed afterwards."""
    container = azurite.container(azure_container_name)
    store = AzureBlobStore(container)
    try:
        yield store
    finally:
        container.delete_container()
        container.close()
