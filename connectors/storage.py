"""BlobStore: where recovery points, chunks, evidence and history live.

Two implementations: a local directory (the embedded default) and Azure Blob Storage.
Keys are '/'-separated relative paths such as 'chunks/ab/abcdef…'.
"""

from __future__ import annotations

import abc
import contextlib
import ipaddress
import os
import tempfile
from dataclasses import dataclass
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

from configs.models import AzureStorage, LocalStorage
from configs.secrets import SecretError, redact, remember, resolve

log = structlog.stdlib.get_logger("patchdrill.storage")

#: pieces handed out by open() and copied by streaming puts
CHUNK_SIZE = 1024 * 1024

# Temp files live beside their final name (so the rename is atomic); keys may not look like one,
# which is what lets list() skip them without ever hiding a real blob.
_TEMP_PREFIX = ".patchdrill-tmp-"


class StoreError(Exception):
    """A store operation failed; names the store and key."""

    #: whether trying again later may succeed (the service was unreachable or busy)
    transient: bool = False


class StoreUnavailable(StoreError):
    """The store could not be reached or was busy. Worth retrying."""

    transient = True


class BlobExists(StoreError):
    """put(..., overwrite=False) found the key already present."""


class BlobNotFound(StoreError):
    """get/delete of a key that is not there."""


class InvalidKey(StoreError):
    """A key that is not a clean '/'-separated relative path."""


class UploadUrlUnsupported(StoreError):
    """The store cannot hand out a URL a host could upload to."""


@dataclass(frozen=True, order=True)
class BlobInfo:
    key: str
    size: int


def validate_key(key: str, store: str = "store") -> str:
    """Return key if it is a clean relative '/'-separated path, else raise InvalidKey naming it."""
    problem = _key_problem(key)
    if problem:
        raise InvalidKey(f"{store}: invalid key {key!r}: {problem}")
    return key


def validate_prefix(prefix: str, store: str = "store") -> str:
    """Return a list() prefix if it cannot climb out of the store, else raise InvalidKey."""
    if "\\" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
        raise InvalidKey(f"{store}: invalid prefix {prefix!r}: use a relative '/'-separated prefix")
    return prefix


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    if "\\" in key or "\x00" in key:
        return "backslashes and NUL characters are not allowed; separate segments with '/'"
    if key.startswith("/"):
        return "absolute paths are not allowed"
    for segment in key.split("/"):
        if segment == "":
            return "empty path segment (leading, trailing or doubled '/')"
        if segment in (".", ".."):
            return f"{segment!r} segments are not allowed"
        if segment.startswith(_TEMP_PREFIX):
            return f"segments starting with {_TEMP_PREFIX!r} are reserved for temporary files"
    return None


class BlobStore(abc.ABC):
    """A flat key space of immutable-ish blobs."""

    #: a short human name for messages ("local:/path" or "azure:account/container")
    name: str

    #: whether upload_url() can give a host a URL to send data to directly
    supports_upload_url: bool = False

    @abc.abstractmethod
    def put(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> None:
        """Store data under key. With overwrite=False an existing key raises BlobExists."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Read a whole blob."""

    @abc.abstractmethod
    def open(self, key: str) -> Iterator[bytes]:
        """Stream a blob in pieces."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "", *, uncommitted: bool = False) -> Iterator[BlobInfo]:
        """Every key under prefix, in no particular order.

        uncommitted: also keys that hold only uploaded-but-never-committed data (an Azure block
        upload that was killed, or a host's Put Block); a local store has no such thing.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; missing keys raise BlobNotFound."""

    @abc.abstractmethod
    def upload_url(self, key: str, *, expires_in: timedelta = timedelta(minutes=30)) -> str:
        """A short-lived URL a host can PUT the blob to directly (Azure: a write-only SAS)."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LocalBlobStore(BlobStore):
    """Blobs as files under a root directory.

    Every put is atomic and durable: the data goes to a temp file in the target directory, is
    fsynced, then renamed into place and the directory fsynced, so a crash leaves either the
    old blob, the new blob, or no blob, never a torn one. No-overwrite puts publish with
    os.link, which fails if the name exists, so two writers racing for one key cannot clobber
    each other. Files are created 0600: a repository holds backups.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.name = f"local:{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.name}: cannot create the store directory: {exc.strerror}") from exc

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key, self.name).split("/"))

    def _fail(self, key: str, action: str, exc: OSError) -> StoreError:
        return StoreError(f"{self.name}: cannot {action} {key!r}: {exc.strerror or exc}")

    def put(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> None:
        """Store data atomically; errors reading a file object propagate unchanged."""
        target = self._path(key)
        tmp = self._write_temp(key, target.parent, data)
        try:
            if overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)
        except FileExistsError:
            raise BlobExists(f"{self.name}: {key!r} already exists (put with overwrite=False)") from None
        except OSError as exc:
            raise self._fail(key, "store", exc) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(target.parent)
        log.debug("blob stored", store=self.name, key=key)

    def _write_temp(self, key: str, directory: Path, data: bytes | BinaryIO) -> str:
        fd, tmp = self._make_temp(key, directory)
        try:
            with os.fdopen(fd, "wb") as out:
                for piece in _pieces(data):
                    try:
                        out.write(piece)
                    except OSError as exc:
                        raise self._fail(key, "store", exc) from exc
                try:
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:
                    raise self._fail(key, "store", exc) from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _make_temp(self, key: str, directory: Path) -> tuple[int, str]:
        # A concurrent delete may prune a freshly made directory before the temp file lands
        # in it; making it again is enough.
        attempts_left = 5
        while True:
            try:
                if not directory.is_dir():
                    directory.mkdir(parents=True, exist_ok=True)
                    self._fsync_ancestors(directory)
                return tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX)
            except FileNotFoundError as exc:
                attempts_left -= 1
                if not attempts_left:
                    raise self._fail(key, "store", exc) from exc
            except OSError as exc:
                raise self._fail(key, "store", exc) from exc

    def _fsync_ancestors(self, directory: Path) -> None:
        """New directories are durable only once every parent's entry for them is."""
        while directory != self.root and self.root in directory.parents:
            directory = directory.parent
            _fsync_dir(directory)

    def get(self, key: str) -> bytes:
        return b"".join(self.open(key))

    def open(self, key: str) -> Iterator[bytes]:
        # Opened here rather than inside the generator so a missing key fails at the call.
        path = self._path(key)
        try:
            handle = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"{self.name}: no blob {key!r}") from None
        except OSError as exc:
            raise self._fail(key, "read", exc) from exc
        return _read_chunks(handle)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "", *, uncommitted: bool = False) -> Iterator[BlobInfo]:
        validate_prefix(prefix, self.name)
        # Only the directory the prefix's complete segments name needs walking.
        directory, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        return (info for info in self._walk(start) if info.key.startswith(prefix))

    def _walk(self, directory: Path) -> Iterator[BlobInfo]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(_TEMP_PREFIX):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    key = Path(entry.path).relative_to(self.root).as_posix()
                    yield BlobInfo(key=key, size=entry.stat(follow_symlinks=False).st_size)
            except FileNotFoundError:
                continue  # deleted while listing

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(f"{self.name}: no blob {key!r} to delete") from None
        except IsADirectoryError:
            raise BlobNotFound(f"{self.name}: {key!r} is a prefix, not a blob") from None
        except OSError as exc:
            raise self._fail(key, "delete", exc) from exc
        _fsync_dir(path.parent)
        self._prune(path.parent)
        log.debug("blob deleted", store=self.name, key=key)

    def _prune(self, directory: Path) -> None:
        """Remove directories the delete left empty, up to (not including) the root."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty, or already gone: either way nothing more to prune
            directory = directory.parent

    def upload_url(self, key: str, *, expires_in: timedelta = timedelta(minutes=30)) -> str:
        """Always raises UploadUrlUnsupported.

        A directory has no access-controlled, expiring write endpoint to hand a host; a file://
        URL would only work for a host that shares this filesystem and would bypass the atomic
        put. Hosts send their data through their connector to a local store instead.
        """
        validate_key(key, self.name)
        raise UploadUrlUnsupported(
            f"{self.name}: a local store has no upload URL for {key!r}; "
            "send the data through the host's connector, or use an Azure store for direct uploads"
        )


def _pieces(data: bytes | BinaryIO) -> Iterator[bytes | bytearray | memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield data
        return
    while piece := data.read(CHUNK_SIZE):
        yield piece


def _read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in directory durable (POSIX; Windows cannot open directories)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    try:
        fd = os.open(directory, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def open_store(cfg: LocalStorage | AzureStorage, base_dir: Path | None = None) -> BlobStore:
    """The store a storage configuration describes.

    base_dir is the configuration file's directory: relative local paths and `file:` secret
    references are resolved against it (the working directory when None).
    """
    if isinstance(cfg, LocalStorage):
        root = Path(cfg.path).expanduser()
        if not root.is_absolute() and base_dir is not None:
            root = base_dir / root
        return LocalBlobStore(root)
    if isinstance(cfg, AzureStorage):
        return AzureBlobStore.from_config(cfg, base_dir)
    raise TypeError(f"unknown storage configuration {type(cfg).__name__}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _normalise_prefix(prefix: str, container: str) -> str:
    """'fleet-a', 'fleet-a/' and '/fleet-a/' all mean keys under 'fleet-a/'."""
    cleaned = prefix.strip("/")
    if not cleaned:
        return ""
    problem = _key_problem(cleaned)
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
