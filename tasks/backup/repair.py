"""`patchdrill repair`: rewrite the chunks verify found damaged, from the live disks that still
hold their data, and say which recovery points stay damaged.

A chunk is content-addressed, so any block anywhere that hashes to its id is its content: repair
reads, for each disk whose points name a damaged chunk, the blocks (or files) those points had
at that chunk, and rewrites every chunk a block hashes back to. Data the disks no longer hold
cannot come back; the points naming it are listed so they can be forgotten or restored around.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable

import structlog

from connectors.base import ConnectorError
from connectors.stores import StoreError
from tasks.backup.engine import BackupRequest, rewrite_damaged
from tasks.backup.scheduling import default_workers
from tasks.backup.errors import BackupError
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.sources.base import BlockSource, TreeSource
from tasks.backup.repo.verify import readable_points, referenced_chunks

log = structlog.stdlib.get_logger("patchdrill.backup")

SourceOpener = Callable[[str, str], AbstractContextManager[BlockSource | TreeSource]]


@dataclass
class IndexSummary:
    """The index check repair starts with (docs/repository.md, *Index*)."""

    stored: int = 0
    #: entries naming chunks the store lacks
    stale: int = 0
    #: stored chunks no index file named
    unindexed: int = 0
    #: index files that were torn or altered
    unreadable: int = 0
    #: whether the index was replaced by one built from a listing
    rebuilt: bool = False
    #: index files folded into one (the index was right, but spread over them)
    folded: int = 0


@dataclass
class RepairReport:
    index: IndexSummary = field(default_factory=IndexSummary)
    #: damaged chunks recorded (by verify, or by the index check) when the rewrite started
    recorded: int = 0
    repaired: list[str] = field(default_factory=list)
    #: chunk id -> points that still name it, damaged
    remaining: dict[str, list[str]] = field(default_factory=dict)
    #: "host/disk" -> why its live data could not be read
    unreadable_disks: dict[str, str] = field(default_factory=dict)
    #: points whose own file or map cannot be read (not repairable from a disk)
    broken_points: dict[str, str] = field(default_factory=dict)

    @property
    def damaged_points(self) -> list[str]:
        return sorted({p for names in self.remaining.values() for p in names} | set(self.broken_points))

    @property
    def ok(self) -> bool:
        return not self.damaged_points


def repair(repo: Repository, open_source: SourceOpener, *, workers: int | None = None) -> RepairReport:
    # A backup's lock: repair writes chunks the way a backup does, beside backups, never beside prune.
    with repo.lock("backup"):
        index = chunk_index.check_and_rebuild(repo)
        report = RepairReport(index=IndexSummary(stored=index.stored, stale=len(index.stale),
                                                 unindexed=index.unindexed, unreadable=len(index.unreadable),
                                                 rebuilt=index.rebuilt, folded=index.folded))
        points: list[RecoveryPoint] | None = None
        users: dict[bytes, list[str]] = {}
        if index.stale:
            # Chunks deleted behind the index's back: the points naming them are damaged, as if
            # verify had found them missing, and their data is looked for on the live disks.
            points = readable_points(repo, report.broken_points)
            users = referenced_chunks(repo, points, report.broken_points)
            for chunk_id in index.stale & set(users):
                repo.record_damage(chunk_id.hex(), "missing", sorted(users[chunk_id]))
        damaged = repo.damaged_chunks()
        report.recorded = len(damaged)
        if not damaged:
            return report
        if points is None:
            points = readable_points(repo, report.broken_points)
            users = referenced_chunks(repo, points, report.broken_points)
        by_disk: dict[tuple[str, str], list[RecoveryPoint]] = {}
        named = {key for chunk_id in damaged for key in users.get(chunk_id, [])}
        for point in points:
            if point.key in named:
                by_disk.setdefault((point.host, point.disk), []).append(point)
        repaired: set[bytes] = set()
        for (host, disk), disk_points in sorted(by_disk.items()):
            request = BackupRequest(host=host, disk=disk, block_size=disk_points[-1].block_size,
                                    workers=workers or default_workers())
            try:
                with open_source(host, disk) as source:
                    repaired |= rewrite_damaged(repo, source, request, disk_points, set(damaged) - repaired)
            except (BackupError, ConnectorError, StoreError, OSError) as exc:
                report.unreadable_disks[f"{host}/{disk}"] = str(exc)
        for chunk_id in damaged:
            if chunk_id in repaired:
                continue
            if chunk_id not in users:
                repo.clear_damage(chunk_id.hex())  # no point names it any more: prune removes it
                continue
            report.remaining[chunk_id.hex()] = sorted(users[chunk_id])
    report.repaired = sorted(c.hex() for c in repaired)
    log.info("repair.done", recorded=report.recorded, repaired=len(report.repaired), remaining=len(report.remaining),
             damaged_points=len(report.damaged_points))
    return report
