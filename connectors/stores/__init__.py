"""Where backups, evidence and history are kept: the BlobStore contract and its two stores.

    from connectors.stores import BlobNotFound, BlobStore, LocalBlobStore, open_store

`base` holds the contract, its errors and key rules; `local` a directory (the embedded default);
`azure` Azure Blob Storage. The Azure module (and its SDK) loads only when an Azure store is
opened or `AzureBlobStore` is named, so local-only runs never import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.models import AzureStorage, LocalStorage
from connectors.stores.base import (
    CHUNK_SIZE,
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    StoreError,
    StoreUnavailable,
    UploadUrlUnsupported,
    validate_key,
    validate_prefix,
)
from connectors.stores.local import LocalBlobStore

if TYPE_CHECKING:
    from connectors.stores.azure import AzureBlobStore


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
        from connectors.stores.azure import AzureBlobStore

        return AzureBlobStore.from_config(cfg, base_dir)
    raise TypeError(f"unknown storage configuration {type(cfg).__name__}")


def __getattr__(name: str) -> Any:
    if name == "AzureBlobStore":
        from connectors.stores.azure import AzureBlobStore

        return AzureBlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHUNK_SIZE", "AzureBlobStore", "BlobExists", "BlobInfo", "BlobNotFound", "BlobStore", "InvalidKey",
    "LocalBlobStore", "StoreError", "StoreUnavailable", "UploadUrlUnsupported", "open_store", "validate_key",
    "validate_prefix",
]
