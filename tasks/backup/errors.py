"""Errors of the backup pipeline. Each message names what is at fault: chunk, point, key, path."""

from __future__ import annotations


class BackupError(Exception):
    """Base of every backup, restore, verify and prune failure."""


class RepositoryError(BackupError):
    """The repository is missing, malformed or of another format."""


class WrongKey(RepositoryError):
    """The credential given does not unwrap the repository's master key."""


class WeakKey(RepositoryError):
    """A passphrase too weak to protect a new encrypted repository."""


class PointTampered(RepositoryError):
    """A recovery point of an encrypted repository fails authentication."""


class KeyRequired(RepositoryError):
    """The repository is encrypted and no key reference was given (or the reverse)."""


class ChunkError(BackupError):
    """A chunk a point needs is missing or does not match its id."""

    def __init__(self, chunk_id: str, point: str | None, problem: str) -> None:
        self.chunk_id = chunk_id
        self.point = point
        where = f" (needed by point {point})" if point else ""
        super().__init__(f"chunk {chunk_id}{where}: {problem}")


class ChunkMissing(ChunkError):
    """The store has no blob for a chunk a point names."""


class ChunkCorrupt(ChunkError):
    """A chunk does not decrypt, decompress or hash back to its id."""


class PointNotFound(BackupError):
    """No recovery point matches what was asked for."""


class RepositoryBusy(BackupError):
    """Another process holds a lock that excludes this operation."""


class TargetExists(BackupError):
    """A restore target exists and force was not given."""


class RestoreFailed(BackupError):
    """A restore target cannot be written (read-only, no space, no permission) or must not be
    (a symbolic link, the wrong kind of file); the message names the target."""


class SourceError(BackupError):
    """The disk to back up cannot be read (missing path, unsupported kind, scanner failure)."""
