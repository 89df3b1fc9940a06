"""The Azure Blob Storage BlobStore (azure-storage-blob; tested on Azurite), with short-lived
upload URLs (SAS) so a Windows host can send data straight to the container."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlsplit

import structlog
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobLeaseClient,
    BlobSasPermissions,
    ContainerClient,
    UserDelegationKey,
    generate_blob_sas,
)

from configs.models import AzureStorage
from configs.secrets import SecretError, redact, remember, resolve
from connectors.stores.base import (
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    StoreError,
    StoreUnavailable,
    UploadUrlUnsupported,
    key_problem,
    validate_key,
    validate_prefix,
)

log = structlog.stdlib.get_logger("patchdrill.storage")


#: delete rounds against a lease someone keeps taking again
_DELETE_ATTEMPTS = 3
_LEASED = frozenset({"LeaseIdMissing", "LeaseIdMismatchWithBlobOperation", "LeaseIdMismatchWithContainerOperation"})
#: Azurite's well-known development account: plain HTTP to it is a lab, never production
_EMULATOR_ACCOUNT = "devstoreaccount1"
_DELEGATION_KEY_LIFETIME = timedelta(hours=1)


def _error_code(exc: AzureError) -> str | None:
    code = getattr(exc, "error_code", None)
    return getattr(code, "value", code)  # the SDK gives an enum member or a plain string


class AzureBlobStore(BlobStore):
    """Blobs in an Azure Storage container, optionally under a key prefix.

    No-overwrite puts send If-None-Match: *, so the service itself refuses a second writer.
    Large blobs move in parallel blocks (`max_concurrency`). Upload URLs are write-only SAS
    URLs signed with the account key, or with a user delegation key when the store holds a
    token credential instead.
    """

    def __init__(self, container: ContainerClient, prefix: str = "", *, account_key: str | None = None,
                 max_concurrency: int = 4, create_container: bool = True) -> None:
        self.container = container
        self.prefix = _normalise_prefix(prefix, container.container_name)
        # A client built from a connection string or account key carries the key on its
        # credential; that is the key SAS URLs are signed with.
        self._account_key = account_key or getattr(container.credential, "account_key", None)
        if self._account_key:
            remember(self._account_key)
        self.max_concurrency = max_concurrency
        self._delegation: tuple[UserDelegationKey, datetime] | None = None
        location = f"{container.account_name}/{container.container_name}"
        self.name = f"azure:{location}/{self.prefix.rstrip('/')}" if self.prefix else f"azure:{location}"
        if create_container:
            self._create_container()

    @classmethod
    def from_config(cls, cfg: AzureStorage, base_dir: Path | None = None, *,
                    max_concurrency: int = 4) -> "AzureBlobStore":
        """Build a store from configuration, resolving its credential references.

        Relative `file:` references are read relative to base_dir (the config file's directory).
        """
        where = f"azure:{cfg.container}"
        if cfg.connection_string:
            text = _resolve_ref(cfg.connection_string, "connection_string", where, base_dir)
            fields = _parse_connection_string(text)
            for secret_field in ("AccountKey", "SharedAccessSignature"):
                if fields.get(secret_field):
                    remember(fields[secret_field])
            # Checked here too: the loader cannot read a Prefect Secret, nor see a config built in code.
            if problem := cfg.connection_string_problem(text):
                raise StoreError(f"{where}: connection_string: {problem}")
            try:
                container = ContainerClient.from_connection_string(text, cfg.container)
            except ValueError:
                raise StoreError(
                    f"{where}: the connection string from {cfg.connection_string!r} is malformed "
                    "(expected AccountName=…;AccountKey=…;BlobEndpoint=… or DefaultEndpointsProtocol=…)"
                ) from None
            return cls(container, cfg.prefix, account_key=fields.get("AccountKey"), max_concurrency=max_concurrency)
        assert cfg.account_url is not None  # AzureStorage requires one of the two
        if cfg.account_key:
            key = _resolve_ref(cfg.account_key, "account_key", where, base_dir)
            credential: object = {"account_name": _account_name(cfg.account_url, where), "account_key": key}
        else:
            key = None
            credential = _default_azure_credential(where)
        container = ContainerClient(cfg.account_url, cfg.container, credential=credential)
        return cls(container, cfg.prefix, account_key=key, max_concurrency=max_concurrency)

    @property
    def supports_upload_url(self) -> bool:  # type: ignore[override]
        # A SAS-scoped client can neither sign nor ask for a delegation key.
        return bool(self._account_key) or hasattr(self.container.credential, "get_token")

    def close(self) -> None:
        self.container.close()

    def _blob_name(self, key: str) -> str:
        return self.prefix + validate_key(key, self.name)

    def _create_container(self) -> None:
        try:
            self.container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise self._error(exc, "create the container for") from None

    def _error(self, exc: AzureError, action: str, key: str | None = None) -> StoreError:
        """A StoreError for exc that names store and key and carries no key, SAS or signature."""
        target = f"{key!r}" if key is not None else "the store"
        code = _error_code(exc)
        status = getattr(exc, "status_code", None)
        if isinstance(exc, ResourceNotFoundError) and code != "ContainerNotFound" and key is not None:
            return BlobNotFound(f"{self.name}: no blob {key!r}")
        if isinstance(exc, ResourceExistsError) and key is not None:
            return BlobExists(f"{self.name}: {key!r} already exists (put with overwrite=False)")
        detail = redact(_first_line(getattr(exc, "reason", None) or exc.message or type(exc).__name__))
        label = f"{status} {code}" if status else code or type(exc).__name__
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return StoreError(f"{self.name}: access denied while trying to {action} {target} ({label}): "
                              "check the account key, connection string, SAS or role assignment")
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)) or status in (408, 429, 500, 502, 503, 504):
            return StoreUnavailable(f"{self.name}: could not {action} {target}: service unavailable ({label}): {detail}")
        return StoreError(f"{self.name}: could not {action} {target} ({label}): {detail}")

    def put(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> None:
        """Upload data; with overwrite=False the service refuses an existing key (If-None-Match: *).

        Errors reading a file object propagate unchanged; a put that fails midway leaves only
        uncommitted blocks, which the service discards, never a visible partial blob.
        """
        name = self._blob_name(key)
        try:
            self.container.upload_blob(name, data, overwrite=overwrite, max_concurrency=self.max_concurrency)
        except AzureError as exc:
            raise self._error(exc, "store", key) from None
        log.debug("blob stored", store=self.name, key=key)

    def get(self, key: str) -> bytes:
        return b"".join(self.open(key))

    def open(self, key: str) -> Iterator[bytes]:
        # download_blob fetches the first range at once, so a missing key fails at the call.
        try:
            downloader = self.container.download_blob(self._blob_name(key), max_concurrency=self.max_concurrency)
        except AzureError as exc:
            raise self._error(exc, "read", key) from None
        return self._stream(key, downloader.chunks())

    def _stream(self, key: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except AzureError as exc:
            raise self._error(exc, "read", key) from None

    def exists(self, key: str) -> bool:
        try:
            return bool(self.container.get_blob_client(self._blob_name(key)).exists())
        except AzureError as exc:
            raise self._error(exc, "look up", key) from None

    def list(self, prefix: str = "", *, uncommitted: bool = False) -> Iterator[BlobInfo]:
        validate_prefix(prefix, self.name)
        return self._list(prefix, ["uncommittedblobs"] if uncommitted else None)

    def _list(self, prefix: str, include: list[str] | None) -> Iterator[BlobInfo]:
        start = len(self.prefix)
        try:
            for blob in self.container.list_blobs(name_starts_with=self.prefix + prefix, include=include):
                yield BlobInfo(key=blob.name[start:], size=blob.size)
        except AzureError as exc:
            raise self._error(exc, f"list prefix {prefix!r} of") from None

    def delete(self, key: str) -> None:
        """Delete the blob with its snapshots, breaking any lease on it.

        The repository never leases or snapshots a blob, but a write SAS lets its holder do both
        (a host with an upload URL can take an infinite lease), and either makes a plain delete
        fail. The blob is the repository's, so the lease is broken and the delete repeated; a
        holder that leases it again at once gets a few rounds, then the error.
        """
        name = self._blob_name(key)
        for attempt in range(_DELETE_ATTEMPTS):
            try:
                self.container.delete_blob(name, delete_snapshots="include")
                break
            except ResourceNotFoundError as exc:
                # A blob of uncommitted blocks only may not exist for Delete Blob; committing an
                # empty block list discards those blocks and leaves an empty blob to delete.
                if attempt == _DELETE_ATTEMPTS - 1 or not self._discard_uncommitted(name, key):
                    raise self._error(exc, "delete", key) from None
            except AzureError as exc:
                if _error_code(exc) not in _LEASED or attempt == _DELETE_ATTEMPTS - 1:
                    raise self._error(exc, "delete", key) from None
                log.warning("blob lease broken", store=self.name, key=key)
                self._break_lease(name, key)
        log.debug("blob deleted", store=self.name, key=key)

    def _discard_uncommitted(self, name: str, key: str) -> bool:
        """Commit an empty block list over uncommitted blocks; False when there are none."""
        blob = self.container.get_blob_client(name)
        try:
            _, uncommitted = blob.get_block_list("uncommitted")
            if not uncommitted:
                return False
            blob.commit_block_list([])
        except ResourceNotFoundError:
            return False
        except AzureError as exc:
            raise self._error(exc, "discard the uncommitted blocks of", key) from None
        return True

    def _break_lease(self, name: str, key: str) -> None:
        try:
            BlobLeaseClient(self.container.get_blob_client(name)).break_lease(lease_break_period=0)
        except AzureError as exc:
            # Someone else broke or released it meanwhile: the next delete attempt will tell.
            if _error_code(exc) != "LeaseNotPresentWithLeaseOperation":
                raise self._error(exc, "break the lease on", key) from None

    def upload_url(self, key: str, *, expires_in: timedelta = timedelta(minutes=30)) -> str:
        """A URL a host can PUT one block blob to (`x-ms-blob-type: BlockBlob`) until it expires.

        The SAS grants create and write on this one blob only: it cannot read, list or delete.
        It is limited to HTTPS (`spr=https`); only an emulator in a lab (plain HTTP on a loopback
        or private address, or Azurite's development account) also gets HTTP. The SAS is not
        added to the redaction list: redact() masks SAS tokens by their shape.
        """
        name = self._blob_name(key)
        now = datetime.now(timezone.utc)
        expiry = now + expires_in
        blob = self.container.get_blob_client(name)
        protocol = self._upload_protocol(blob.url, key)
        signing: dict[str, object]
        if self._account_key:
            signing = {"account_key": self._account_key}
        else:
            signing = {"user_delegation_key": self._delegation_key(key, now, expiry)}
        try:
            sas = generate_blob_sas(
                account_name=self.container.account_name,
                container_name=self.container.container_name,
                blob_name=name,
                permission=BlobSasPermissions(create=True, write=True),
                expiry=expiry,
                protocol=protocol,
                **signing,
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{self.name}: cannot sign an upload URL for {key!r}: {redact(str(exc))}") from None
        return f"{blob.url}?{sas}"

    def _upload_protocol(self, url: str, key: str) -> str:
        if url.startswith("https:"):
            return "https"
        host = urlsplit(url).hostname or ""
        if _is_lab_host(host) or self.container.account_name == _EMULATOR_ACCOUNT:
            return "https,http"
        raise UploadUrlUnsupported(
            f"{self.name}: refusing to sign an upload URL for {key!r} over plain HTTP to {host}: raw disk blocks "
            "would cross the network unencrypted; use the account's https:// endpoint"
        )

    def _delegation_key(self, key: str, start: datetime, expiry: datetime) -> UserDelegationKey:
        """A user delegation key valid until at least expiry, reused while it lasts: asking the
        service for one per URL would cost a round trip per uploaded block."""
        cached = self._delegation
        if cached is not None and cached[1] >= expiry:
            return cached[0]
        if not hasattr(self.container.credential, "get_token"):
            raise UploadUrlUnsupported(
                f"{self.name}: cannot sign an upload URL for {key!r}: the store has neither an account "
                "key nor a token credential (a SAS-scoped client cannot issue further SAS URLs)"
            )
        # Clocks differ between us and the service; backdate the key's start a little. The key
        # outlives this URL so later batches can reuse it; each SAS still ends at its own expiry.
        valid_until = max(expiry, start + _DELEGATION_KEY_LIFETIME)
        try:
            service = self.container._get_blob_service_client()  # the SDK's documented way back to the account
            delegation = service.get_user_delegation_key(start - timedelta(minutes=5), valid_until)
        except AzureError as exc:
            raise self._error(exc, "get a user delegation key to sign an upload URL for", key) from None
        self._delegation = (delegation, valid_until)
        return delegation


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _normalise_prefix(prefix: str, container: str) -> str:
    """'fleet-a', 'fleet-a/' and '/fleet-a/' all mean keys under 'fleet-a/'."""
    cleaned = prefix.strip("/")
    if not cleaned:
        return ""
    problem = key_problem(cleaned)
    if problem:
        raise InvalidKey(f"azure:{container}: invalid prefix {prefix!r}: {problem}")
    return cleaned + "/"


def _resolve_ref(reference: str, field: str, where: str, base_dir: Path | None) -> str:
    try:
        return resolve(reference, base_dir=base_dir)
    except SecretError as exc:
        raise StoreError(f"{where}: {field}: {exc}") from None


def _parse_connection_string(text: str) -> dict[str, str]:
    # Values (account keys are base64) may contain '=', so split each pair on the first one.
    pairs = (part.partition("=") for part in text.strip().split(";") if part.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}


def _account_name(account_url: str, where: str) -> str:
    """ACCOUNT from https://ACCOUNT.blob.core.windows.net, or from an emulator's http://host:port/ACCOUNT."""
    parsed = urlsplit(account_url)
    host = parsed.hostname or ""
    if host and not _is_ip_or_localhost(host) and "." in host:
        return host.split(".", 1)[0]
    segment = parsed.path.strip("/").split("/", 1)[0]
    if not segment:
        raise StoreError(f"{where}: account_url: cannot tell the storage account name from {account_url!r}")
    return segment


def _is_lab_host(host: str) -> bool:
    """Loopback or a private address: where an emulator runs, not a storage account."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def _is_ip_or_localhost(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _default_azure_credential(where: str) -> object:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise StoreError(
            f"{where}: account_url without account_key signs in with DefaultAzureCredential, which needs "
            "the azure-identity package: install it, or set account_key or connection_string"
        ) from None
    return DefaultAzureCredential()
