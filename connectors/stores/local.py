"""The local-directory BlobStore: the embedded default, one file per key, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, Iterator

import structlog

from connectors.stores.base import (
    CHUNK_SIZE,
    TEMP_PREFIX,
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    StoreError,
    UploadUrlUnsupported,
    validate_key,
    validate_prefix,
)

log = structlog.stdlib.get_logger("patchdrill.storage")


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
                return tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
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
        # One read into one buffer sized from the file: joining 1 MiB pieces would copy every
        # chunk a second time, which a restore pays on each of its blocks.
        with self._open_file(key) as handle:
            try:
                return handle.read()
            except OSError as exc:
                raise self._fail(key, "read", exc) from exc

    def open(self, key: str) -> Iterator[bytes]:
        # Opened here rather than inside the generator so a missing key fails at the call.
        return _read_chunks(self._open_file(key))

    def _open_file(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"{self.name}: no blob {key!r}") from None
        except OSError as exc:
            raise self._fail(key, "read", exc) from exc

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
            if entry.name.startswith(TEMP_PREFIX):
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
