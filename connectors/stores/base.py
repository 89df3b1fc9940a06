"""The BlobStore contract: where recovery points, chunks, evidence and history live.

Keys are '/'-separated relative paths such as 'chunks/ab/abcdef…'; every store checks them the
same way (`validate_key`) and raises the same errors, so the repository never knows which store
it writes to.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO, Iterator

#: pieces handed out by open() and copied by streaming puts
CHUNK_SIZE = 1024 * 1024

# Temp files live beside their final name (so the rename is atomic); keys may not look like one,
# which is what lets list() skip them without ever hiding a real blob.
TEMP_PREFIX = ".patchdrill-tmp-"


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
    problem = key_problem(key)
    if problem:
        raise InvalidKey(f"{store}: invalid key {key!r}: {problem}")
    return key


def validate_prefix(prefix: str, store: str = "store") -> str:
    """Return a list() prefix if it cannot climb out of the store, else raise InvalidKey."""
    if "\\" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
        raise InvalidKey(f"{store}: invalid prefix {prefix!r}: use a relative '/'-separated prefix")
    return prefix


def key_problem(key: str) -> str | None:
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
        if segment.startswith(TEMP_PREFIX):
            return f"segments starting with {TEMP_PREFIX!r} are reserved for temporary files"
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
