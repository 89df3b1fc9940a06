"""Damage a backup must repair as it goes: chunks verify recorded corrupt or missing, or that the
parent point names and the store lacks. A block or file whose chunk is damaged is read again
even when it did not change, so the backup writes the chunk anew."""

from __future__ import annotations

from dataclasses import replace
from typing import Container

from tasks.backup.repo.blockmap import BlockMap, TreeEntry
from tasks.backup.repo.repository import Repository

#: The parent point's block map, or its tree entries by path; None without a comparable parent.
PreviousMap = BlockMap | dict[str, TreeEntry] | None


def damaged_chunks(repo: Repository, previous: PreviousMap, indexed: Container[bytes],
                   found: set[bytes] | None = None) -> set[bytes]:
    """Chunks a backup must write again even for unchanged data: recorded by verify as corrupt
    or missing, or named by the parent's map and absent from the store.

    `indexed` is what the index says is stored, `found` what this run knows is stored besides. A
    parent chunk neither names is looked up in the store (one exists() each; none when the index
    is whole) and, when there, added to `found`."""
    found = found if found is not None else set()
    absent = set()
    for chunk_id in _chunks_of(previous):
        if chunk_id in found or chunk_id in indexed or chunk_id in absent:
            continue
        if repo.has_chunk(chunk_id):
            found.add(chunk_id)
        else:
            absent.add(chunk_id)
    return set(repo.damaged_chunks()) | absent


def damaged_blocks(previous: BlockMap | None, damaged: set[bytes]) -> set[int]:
    """Positions of the parent's map whose chunk is damaged: they must be read again."""
    return {i for i, cid in enumerate(previous.chunks) if cid in damaged} if previous else set()


def _chunks_of(previous: PreviousMap) -> set[bytes]:
    if isinstance(previous, BlockMap):
        return previous.stored_chunks()
    return {cid for entry in (previous or {}).values() for cid in entry.chunks}


def unmatchable(previous: BlockMap | None, forced: set[int]) -> BlockMap | None:
    """The parent map as a source sees it: forced blocks get fingerprints that match nothing,
    so a host that compares fingerprints itself sends those blocks' data again."""
    if previous is None or not forced or previous.fingerprints is None:
        return previous
    fingerprints = [bytes(len(fp)) if i in forced else fp for i, fp in enumerate(previous.fingerprints)]
    return replace(previous, fingerprints=fingerprints)
