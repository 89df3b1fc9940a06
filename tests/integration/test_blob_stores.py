"""The BlobStore contract, run against a local directory and against Azure Blob on Azurite.

Azure-only behaviour follows: SAS upload URLs used over plain HTTP, prefixes, configuration,
and error messages that never carry the account key or a SAS signature.
"""

from __future__ import annotations

import base64
import io
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from azure.storage.blob import ContainerClient, ContainerSasPermissions, generate_container_sas

from configs.models import AzureStorage, LocalStorage
from configs.secrets import redact
from connectors.stores import (
    AzureBlobStore,
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    LocalBlobStore,
    StoreError,
    StoreUnavailable,
    UploadUrlUnsupported,
    open_store,
)
from tests.hosts.azurite import (
    ACCOUNT_KEY,
    ACCOUNT_NAME,
    OBJECT_ID,
    TENANT_ID,
    AzuriteServer,
    EmulatorTokenCredential,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "azure"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "repo")
    return request.getfixturevalue("azure_store")


def several_megabytes() -> bytes:
    # Incompressible and not block-periodic, so a misplaced block would show.
    return os.urandom(9 * 1024 * 1024 + 123)


# --- the contract -------------------------------------------------------------------------


def test_bytes_round_trip(store: BlobStore) -> None:
    store.put("config.json", b'{"format": 1}')
    assert store.get("config.json") == b'{"format": 1}'
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_put_streams_a_file_object_of_several_megabytes(store: BlobStore) -> None:
    payload = several_megabytes()
    store.put("chunks/ab/abcdef", io.BytesIO(payload))
    assert store.get("chunks/ab/abcdef") == payload
    assert list(store.list("chunks/")) == [BlobInfo("chunks/ab/abcdef", len(payload))]


def test_open_streams_in_pieces(store: BlobStore) -> None:
    payload = several_megabytes()
    store.put("images/disk0", payload)
    pieces = list(store.open("images/disk0"))
    assert len(pieces) > 1
    assert b"".join(pieces) == payload


def test_exists(store: BlobStore) -> None:
    assert not store.exists("points/web1/os/1.json")
    store.put("points/web1/os/1.json", b"{}")
    assert store.exists("points/web1/os/1.json")
    assert not store.exists("points/web1")


def test_list_with_prefix(store: BlobStore) -> None:
    for key in ("points/web1/os/1.json", "points/web1/os/2.json", "points/web10/os/1.json",
                "points/db1/data/1.json", "config.json"):
        store.put(key, key.encode())
    def keys(prefix: str) -> list[str]:
        return sorted(info.key for info in store.list(prefix))

    assert keys("points/web1/") == ["points/web1/os/1.json", "points/web1/os/2.json"]
    assert keys("points/web1") == ["points/web1/os/1.json", "points/web1/os/2.json", "points/web10/os/1.json"]
    assert keys("points/d") == ["points/db1/data/1.json"]
    assert keys("nothing/") == []
    assert len(keys("")) == 5
    sizes = {info.key: info.size for info in store.list()}
    assert sizes["config.json"] == len(b"config.json")


def test_delete(store: BlobStore) -> None:
    store.put("evidence/drill-1.json", b"{}")
    store.put("evidence/drill-2.json", b"{}")
    store.delete("evidence/drill-1.json")
    assert not store.exists("evidence/drill-1.json")
    assert [info.key for info in store.list("evidence/")] == ["evidence/drill-2.json"]


def test_missing_keys_raise_blob_not_found_naming_store_and_key(store: BlobStore) -> None:
    for action in (store.get, store.open, store.delete):
        with pytest.raises(BlobNotFound) as caught:
            action("points/nowhere.json")
        assert "'points/nowhere.json'" in str(caught.value)
        assert store.name in str(caught.value)


def test_no_overwrite_is_honoured(store: BlobStore) -> None:
    store.put("points/web1/os/1.json", b"original", overwrite=False)
    with pytest.raises(BlobExists, match="points/web1/os/1.json"):
        store.put("points/web1/os/1.json", b"intruder", overwrite=False)
    with pytest.raises(BlobExists):
        store.put("points/web1/os/1.json", io.BytesIO(several_megabytes()), overwrite=False)
    assert store.get("points/web1/os/1.json") == b"original"
    store.put("points/web1/os/1.json", b"replaced")
    assert store.get("points/web1/os/1.json") == b"replaced"


@pytest.mark.parametrize("key", ["/abs", "a/../b", "a//b", "trailing/", "", "a\\b"])
def test_invalid_keys_are_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidKey) as caught:
        store.put(key, b"x")
    assert repr(key) in str(caught.value)
    with pytest.raises(InvalidKey):
        store.exists(key)
    assert list(store.list()) == []


def test_a_failing_source_leaves_no_blob(store: BlobStore) -> None:
    class Broken(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self.sent >= 6 * 1024 * 1024:
                raise ConnectionResetError("source went away")
            n = min(len(buffer), 1024 * 1024)
            buffer[:n] = os.urandom(n)
            self.sent += n
            return n

    with pytest.raises(ConnectionResetError):
        store.put("chunks/cd/cdef", io.BufferedReader(Broken()))
    assert not store.exists("chunks/cd/cdef")
    assert list(store.list()) == []


# --- Azure specifics ----------------------------------------------------------------------


def sas_signature(url: str) -> str:
    return parse_qs(urlsplit(url).query)["sig"][0]


def test_sas_url_accepts_a_plain_http_put(azure_store: AzureBlobStore) -> None:
    payload = several_megabytes()
    url = azure_store.upload_url("uploads/web1/disk0.img", expires_in=timedelta(minutes=5))
    answer = requests.put(url, data=payload, headers={"x-ms-blob-type": "BlockBlob"}, timeout=60)
    assert answer.status_code == 201, answer.text
    assert azure_store.get("uploads/web1/disk0.img") == payload


def test_sas_url_is_write_only(azure_store: AzureBlobStore) -> None:
    azure_store.put("config.json", b"secret-ish")
    url = azure_store.upload_url("config.json")
    assert requests.get(url, timeout=30).status_code == 403
    assert requests.delete(url, timeout=30).status_code == 403
    other = url.replace("/config.json?", "/other.json?")
    put_other = requests.put(other, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30)
    assert put_other.status_code == 403
    assert not azure_store.exists("other.json")


def test_expired_sas_url_is_refused(azure_store: AzureBlobStore) -> None:
    url = azure_store.upload_url("late.bin", expires_in=timedelta(minutes=-1))
    answer = requests.put(url, data=b"too late", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30)
    assert answer.status_code == 403
    assert not azure_store.exists("late.bin")
    # The same key and permissions with a future expiry go through: the expiry was the refusal.
    fresh = azure_store.upload_url("late.bin", expires_in=timedelta(minutes=1))
    assert requests.put(fresh, data=b"on time", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30).status_code == 201


def _offline_store(account_url: str) -> AzureBlobStore:
    """A store that only signs: SAS URLs are made locally, so no service need answer."""
    client = ContainerClient(account_url, "c", credential={"account_name": "acct", "account_key": ACCOUNT_KEY})
    return AzureBlobStore(client, create_container=False)


def test_upload_urls_are_https_only_outside_a_lab(azure_store: AzureBlobStore) -> None:
    url = _offline_store("https://acct.blob.core.windows.net").upload_url("staging/h/d/r/0")
    assert parse_qs(urlsplit(url).query)["spr"] == ["https"] and url.startswith("https://")
    # Azurite over plain HTTP on loopback is a lab: the emulator has no TLS to insist on.
    assert parse_qs(urlsplit(azure_store.upload_url("k")).query)["spr"] == ["https,http"]
    with pytest.raises(UploadUrlUnsupported, match="refusing to sign an upload URL for 'k' over plain HTTP to "
                                                   "acct.blob.core.windows.net"):
        _offline_store("http://acct.blob.core.windows.net").upload_url("k")


def test_prefix_scopes_keys_and_upload_urls(azurite: AzuriteServer, azure_container_name: str,
                                            azure_store: AzureBlobStore) -> None:
    scoped = AzureBlobStore(azurite.container(azure_container_name), prefix="fleet-a")
    scoped.put("config.json", b"{}")
    url = scoped.upload_url("chunks/ab/abc")
    assert requests.put(url, data=b"chunk", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30).status_code == 201
    assert sorted(info.key for info in scoped.list()) == ["chunks/ab/abc", "config.json"]
    assert sorted(info.key for info in azure_store.list()) == ["fleet-a/chunks/ab/abc", "fleet-a/config.json"]
    assert scoped.name.endswith(f"{azure_container_name}/fleet-a")


def test_store_creates_its_container(azurite: AzuriteServer, azure_container_name: str,
                                     azure_store: AzureBlobStore) -> None:
    # azure_store already created the container; a second store on it must not fail.
    again = AzureBlobStore(azurite.container(azure_container_name))
    again.put("k", b"v")
    assert azure_store.get("k") == b"v"


def test_from_config_with_a_connection_string_reference(azurite: AzuriteServer, azure_container_name: str,
                                                        azure_store: AzureBlobStore,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDRILL_TEST_BLOB", azurite.connection_string)
    cfg = AzureStorage(container=azure_container_name, connection_string="env:PATCHDRILL_TEST_BLOB")
    store = open_store(cfg)
    assert isinstance(store, AzureBlobStore)
    store.put("via-config", b"ok")
    assert azure_store.get("via-config") == b"ok"
    url = store.upload_url("via-sas")
    assert requests.put(url, data=b"sas", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30).status_code == 201


def test_from_config_with_account_url_and_a_key_file(azurite: AzuriteServer, azure_container_name: str,
                                                     azure_store: AzureBlobStore, tmp_path: Path) -> None:
    (tmp_path / "blob.key").write_text(ACCOUNT_KEY + "\n")
    cfg = AzureStorage(container=azure_container_name, account_url=azurite.blob_endpoint,
                       account_key="file:blob.key", prefix="p", allow_insecure_transport=True)
    store = open_store(cfg, base_dir=tmp_path)
    store.put("k", b"v")
    assert azure_store.get("p/k") == b"v"
    assert store.supports_upload_url
    url = store.upload_url("via-sas")
    assert requests.put(url, data=b"sas", headers={"x-ms-blob-type": "BlockBlob"}, timeout=30).status_code == 201
    assert azure_store.get("p/via-sas") == b"sas"
    assert store.name == f"azure:{ACCOUNT_NAME}/{azure_container_name}/p"


def test_unresolvable_reference_names_the_field(azure_container_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATCHDRILL_TEST_MISSING", raising=False)
    cfg = AzureStorage(container=azure_container_name, connection_string="env:PATCHDRILL_TEST_MISSING")
    with pytest.raises(StoreError, match="connection_string.*PATCHDRILL_TEST_MISSING"):
        open_store(cfg)


def test_malformed_connection_string_is_named_not_shown(azure_container_name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDRILL_TEST_BAD", "AccountKey=c2VjcmV0LXZhbHVl;nonsense")
    cfg = AzureStorage(container=azure_container_name, connection_string="env:PATCHDRILL_TEST_BAD")
    with pytest.raises(StoreError) as caught:
        open_store(cfg)
    assert "env:PATCHDRILL_TEST_BAD" in str(caught.value)
    assert "c2VjcmV0LXZhbHVl" not in str(caught.value)


def test_a_wrong_account_key_is_reported_without_the_key(azurite: AzuriteServer, azure_container_name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_key = base64.b64encode(os.urandom(64)).decode()
    monkeypatch.setenv(
        "PATCHDRILL_TEST_WRONG",
        azurite.connection_string.replace(ACCOUNT_KEY, wrong_key),
    )
    cfg = AzureStorage(container=azure_container_name, connection_string="env:PATCHDRILL_TEST_WRONG")
    with pytest.raises(StoreError) as caught:
        open_store(cfg)
    message = str(caught.value)
    assert "access denied" in message and azure_container_name in message
    assert wrong_key not in message
    assert wrong_key not in repr(caught.value.__cause__) and caught.value.__suppress_context__


def test_sas_signature_never_reaches_an_error_message(azurite: AzuriteServer, azure_store: AzureBlobStore) -> None:
    read_only_sas = generate_container_sas(
        ACCOUNT_NAME, azure_store.container.container_name, account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(minutes=5),
    )
    signature = parse_qs(read_only_sas)["sig"][0]
    client = ContainerClient(azurite.blob_endpoint, azure_store.container.container_name, credential=read_only_sas)
    limited = AzureBlobStore(client, create_container=False)
    assert not limited.supports_upload_url
    with pytest.raises(StoreError) as caught:
        limited.put("k", b"v")
    assert signature not in str(caught.value)
    assert "'k'" in str(caught.value)
    with pytest.raises(StoreError, match="neither an account key nor a token credential") as refused:
        limited.upload_url("k")
    assert signature not in str(refused.value)


def test_upload_url_signature_is_redacted_from_messages(azure_store: AzureBlobStore) -> None:
    url = azure_store.upload_url("k")
    assert sas_signature(url) not in redact(f"uploading to {url} failed")


def test_an_unreachable_endpoint_is_transient(azure_container_name: str) -> None:
    with refusing_port() as port:
        client = ContainerClient.from_connection_string(
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT_NAME};",
            azure_container_name, retry_total=0,
        )
        with pytest.raises(StoreUnavailable) as caught:
            AzureBlobStore(client)
    assert caught.value.transient
    assert ACCOUNT_KEY not in str(caught.value)


def test_an_unreachable_endpoint_error_carries_no_sas_signature(azure_container_name: str) -> None:
    sas = generate_container_sas(
        ACCOUNT_NAME, azure_container_name, account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, write=True, create=True),
        expiry=datetime.now(timezone.utc) + timedelta(minutes=5),
    )
    signature = parse_qs(sas)["sig"][0]
    with refusing_port() as port:
        client = ContainerClient(f"http://127.0.0.1:{port}/{ACCOUNT_NAME}", azure_container_name,
                                 credential=sas, retry_total=0)
        store = AzureBlobStore(client, create_container=False)
        for attempt in (lambda: store.put("k", b"v"), lambda: store.get("k"), lambda: list(store.list())):
            with pytest.raises(StoreUnavailable) as caught:
                attempt()
            assert signature not in str(caught.value)
            assert store.name in str(caught.value)


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port nobody listens on, held bound (not listening) so no one else takes it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_open_store_resolves_a_relative_local_path(tmp_path: Path) -> None:
    store = open_store(LocalStorage(path="repo"), base_dir=tmp_path)
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "repo"
    store.put("k", b"v")
    assert (tmp_path / "repo" / "k").read_bytes() == b"v"


def test_token_credential_store_signs_upload_urls_with_a_user_delegation_key(azurite_oauth: AzuriteServer,
                                                                            azure_container_name: str) -> None:
    """Bearer-token access and the user delegation key are real Azurite calls over HTTPS.

    Not checked here: that the service accepts the delegation-signed URL. azure-storage-blob
    12.31 signs user-delegation SAS in the 2026 string-to-sign layout (with signed request
    headers and query parameters), which Azurite 3.35, the last release for Node 20, does not
    know, so it would refuse a correct URL. Account-key SAS URLs are checked end to end above.
    """
    key_requests: list[str] = []

    def count_key_requests(response: Any) -> None:
        if "comp=userdelegationkey" in response.http_request.url:
            key_requests.append(response.http_request.url)

    client = ContainerClient(azurite_oauth.blob_endpoint, azure_container_name, credential=EmulatorTokenCredential(),
                             connection_verify=str(azurite_oauth.ca_cert), raw_response_hook=count_key_requests)
    store = AzureBlobStore(client)
    try:
        store.put("config.json", b"{}")
        assert store.get("config.json") == b"{}"
        query = parse_qs(urlsplit(store.upload_url("uploads/disk0.img")).query)
        assert query["sp"] == ["cw"] and query["spr"] == ["https"] and query["sr"] == ["b"]
        assert query["skoid"] == [OBJECT_ID] and query["sktid"] == [TENANT_ID]
        # One delegation key serves many URLs: not a round trip to the service per uploaded block.
        for index in range(50):
            store.upload_url(f"uploads/block/{index}", expires_in=timedelta(minutes=5))
        assert len(key_requests) == 1
    finally:
        client.delete_container()
