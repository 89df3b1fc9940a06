"""BlobStore: where recovery points, chunks, evidence and history live.

Two implementations: a local directory (the embedded default) and Azure Blob Storage.
Keys are '/'-separated relative paths such as 'chunks/ab/abcdef…'.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO, Iterator


class StoreError(Exception):
    """A store operation failed; names the store and key."""


class BlobExists(StoreError):
    """put(..., overwrite=False) found the key already present."""


class BlobNotFound(StoreError):
    """get/delete of a key that is not there."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int


class BlobStore(abc.ABC):
    """A flat key space of immutable-ish blobs."""

    #: a short human name for messages ("local:/path" or "azure:account/container")
    name: str

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
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every key under prefix, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; missing keys raise BlobNotFound."""

    @abc.abstractmethod
    def upload_url(self, key: str, *, expires_in: timedelta = timedelta(minutes=30)) -> str:
        """A short-lived URL a host can PUT the blob to directly (Azure: a write-only SAS)."""
