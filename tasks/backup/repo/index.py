"""What the store holds, from its index files instead of a listing of chunks/ (restic's index).

A backup reads the index files (one listing of index/, one read per file) to learn which chunks
are stored, and writes one file of its own naming the chunks it stored; a backup that finds more
than FOLD_AT files folds those it read into one, prune consolidates them into one under its
exclusive lock, and repair rebuilds them from a listing when they are missing or stale (and
folds them otherwise). docs/repository.md, *Index*, says why a backup stays safe when the index
is wrong, and why a fold loses nothing to a crash or to a backup reading beside it.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterator

import structlog

from connectors.stores import BlobNotFound, StoreError
from tasks.backup.errors import ChunkCorrupt
from tasks.backup.repo.repository import Repository

log = structlog.stdlib.get_logger("patchdrill.backup")
#: index files past which a backup folds them into one: each backup reads every file, so their
#: number, which grows by one per backup between prunes, is what a backup's start costs
FOLD_AT = 32
#: listings of index/ a reader takes when files it listed were folded away before it read them
_RELISTS = 3


class SortedIds:
    """The ids of one index file, searched in place: building a set of every id would cost each
    backup time in proportion to the repository, a lookup here costs ~17 comparisons."""

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def __len__(self) -> int:
        return len(self._packed) // 32

    def __getitem__(self, position: int) -> bytes:
        return self._packed[position * 32:position * 32 + 32]

    def __contains__(self, chunk_id: object) -> bool:
        position = bisect_left(self, chunk_id)  # type: ignore[call-overload]
        return position < len(self) and self[position] == chunk_id

    def __iter__(self) -> Iterator[bytes]:
        return (self[i] for i in range(len(self)))


@dataclass
class ChunkIndex:
    #: the index files listed
    files: list[str] = field(default_factory=list)
    #: those whose ids are in `parts` (the others were unreadable, or folded away meanwhile)
    read: list[str] = field(default_factory=list)
    #: index file -> why it could not be read (torn, altered): its chunks count as not indexed
    unreadable: dict[str, str] = field(default_factory=dict)
    #: what a listing of chunks/ found, when no index file existed beside stored chunks
    #: (None when there was an index): a backup then writes all of it into its own file
    listing: set[bytes] | None = None
    parts: list[SortedIds] = field(default_factory=list)

    def __contains__(self, chunk_id: object) -> bool:
        """Whether an index file names chunk_id (a listing that stood in for one does not count)."""
        return any(chunk_id in part for part in self.parts)

    @property
    def listed(self) -> bool:
        return self.listing is not None

    @property
    def ids(self) -> set[bytes]:
        """Every id known, as one set: for repair and prune, which list the store anyway."""
        return set(self.listing or ()).union(*self.parts)


def load(repo: Repository) -> ChunkIndex:
    """The chunks the index names; a repository with chunks but no index file at all (made before
    the index, or its index deleted) is listed once instead, and `listing` holds what was found."""
    index = ChunkIndex(files=repo.index_keys())
    if not index.files:
        if repo.has_chunks():
            index.listing = repo.chunk_ids()
            # Chunks with no point yet are a new repository's first backups under way (each
            # writes its index file when it ends), not an index that went missing.
            report = log.warning if repo.point_keys() else log.info
            report("index.missing", repository=repo.name, chunks=len(index.listing))
        return index
    pending = list(index.files)
    for _ in range(_RELISTS):
        if not _read(repo, index, pending):
            break
        # Folded (by a backup, prune or repair) after the listing: the file that took their ids
        # was written before they were deleted, so a new listing shows it.
        pending = [key for key in repo.index_keys() if key not in index.files]
        index.files += pending
    return index


def _read(repo: Repository, index: ChunkIndex, keys: list[str]) -> bool:
    """Read keys into index; whether any had gone since it was listed."""
    gone = False
    for key in keys:
        try:
            index.parts.append(SortedIds(repo.read_index(key)))
            index.read.append(key)
        except BlobNotFound:
            gone = True
        except ChunkCorrupt as exc:
            index.unreadable[key] = str(exc)
            log.warning("index.unreadable", repository=repo.name, file=key, error=str(exc))
    return gone


def fold_if_many(repo: Repository, index: ChunkIndex, own: str | None) -> str | None:
    """When the files a backup read (`index`) and its own file (`own`) are more than FOLD_AT,
    replace them by one naming all their ids; returns its key (None: nothing folded). Call under
    a backup lock. A failure costs the fold, not the backup: it is logged and the files stay."""
    folded = index.read + ([own] if own and own not in index.read else [])
    if index.listed or len(folded) <= FOLD_AT:
        return None
    try:
        ids = set().union(*index.parts)
        if own and own not in index.read:
            ids.update(SortedIds(repo.read_index(own)))
        new = replace(repo, ids, folded)
    except (StoreError, ChunkCorrupt) as exc:
        log.warning("index.fold_failed", repository=repo.name, files=len(folded), error=str(exc))
        return None
    log.info("index.folded", repository=repo.name, files=len(folded), chunks=len(ids))
    return new


@dataclass
class IndexCheck:
    """What repair found comparing the index with a listing of the store."""

    indexed: int = 0
    stored: int = 0
    #: chunk ids the index names that the store lacks (deleted behind its back)
    stale: set[bytes] = field(default_factory=set)
    #: stored chunks no index file names (a backup killed before writing its index file)
    unindexed: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)
    rebuilt: bool = False
    #: index files folded into one (0: none, or the index was rebuilt instead)
    folded: int = 0


def check_and_rebuild(repo: Repository) -> IndexCheck:
    """Compare the index with the store and, when they differ, replace it by one file naming what
    the store holds. Safe beside backups (call under a backup lock): only the files read before
    the listing are removed, so a backup's file written meanwhile stays, and the new file is
    complete before any old one goes."""
    index = load(repo)
    stored = repo.chunk_ids()
    indexed = set() if index.listed else index.ids  # a listing stood in for a missing index
    check = IndexCheck(indexed=len(indexed), stored=len(stored), stale=indexed - stored,
                       unindexed=len(stored - indexed), unreadable=index.unreadable)
    if check.stale or check.unindexed or check.unreadable:
        replace(repo, stored, index.files)
        check.rebuilt = True
        log.warning("index.rebuilt", repository=repo.name, stale=len(check.stale), unindexed=check.unindexed,
                    unreadable=len(check.unreadable))
    elif len(index.read) > 1:
        # Right, but in many files: folded into one, as a backup past FOLD_AT would.
        replace(repo, indexed, index.read)
        check.folded = len(index.read)
    return check


def replace(repo: Repository, ids: set[bytes], old_files: list[str]) -> str | None:
    """Write one index file naming ids, then remove old_files (all but the new one, should the
    content be the same); returns the new file's key. A crash between the two leaves both,
    which name the same chunks twice: a reader loses nothing, and the next fold removes them."""
    new = repo.write_index(ids)
    for key in old_files:
        if key != new:
            repo.delete_index(key)
    return new
