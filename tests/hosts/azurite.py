"""Azurite, Microsoft's Azure Storage emulator, as the blob test host.

One blob server per test session on a free loopback port with a private workspace; every test
that asks for `azure_store` gets a container of its own. Azurite comes from the repository's
package.json (pinned to a release that runs on this machine's Node); `npm ci` runs once if
node_modules is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from azure.storage.blob import ContainerClient

from connectors.storage import AzureBlobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BLOB = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"

# Azurite's documented development account: public, identical on every installation.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# Limits for a server that never comes up, not expectations of how fast it is.
STARTUP_LIMIT = 90.0
STOP_LIMIT = 15.0


@dataclass(frozen=True)
class AzuriteServer:
    port: int
    workspace: Path
    log: Path

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};"
            f"AccountKey={ACCOUNT_KEY};BlobEndpoint={self.blob_endpoint};"
        )

    def container(self, name: str) -> ContainerClient:
        return ContainerClient.from_connection_string(self.connection_string, name)


def ensure_azurite_installed() -> Path:
    """Install the pinned Azurite with `npm ci` unless it is there; one installer at a time."""
    if AZURITE_BLOB.exists():
        return AZURITE_BLOB
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("Azurite is not installed and npm is not on PATH: install Node 20 and npm, then run `npm ci`")
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"patchdrill-npm-ci-{checkout}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not AZURITE_BLOB.exists():
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO_ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not AZURITE_BLOB.exists():
                pytest.fail(f"`npm ci` in {REPO_ROOT} failed ({done.returncode}): {done.stderr[-2000:]}")
    return AZURITE_BLOB


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2.0)
    except httpx.TransportError:
        return False
    return True  # any HTTP answer, even an authentication error, means the server is serving


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def start_azurite(workspace: Path) -> tuple[subprocess.Popen[bytes], AzuriteServer]:
    """Start azurite-blob and wait until it answers HTTP; retries if the free port was taken meanwhile."""
    binary = ensure_azurite_installed()
    log = workspace / "azurite.log"
    for _ in range(3):
        server = AzuriteServer(port=free_port(), workspace=workspace, log=log)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(server.port),
                 "--location", str(workspace / "data"), "--skipApiVersionCheck", "--loose",
                 "--disableTelemetry", "--silent"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workspace,
            )
        deadline = time.monotonic() + STARTUP_LIMIT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(server.blob_endpoint + "?comp=list"):
                return process, server
            time.sleep(0.1)
        stop_process(process)
        if "EADDRINUSE" not in _log_tail(log):
            break
    pytest.fail(f"Azurite did not start on 127.0.0.1 (log {log}):\n{_log_tail(log)}")


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
