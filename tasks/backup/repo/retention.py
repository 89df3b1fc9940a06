"""Retention: which points a policy keeps (pure), forgetting the others, and prune.

Selection follows restic's `forget`: keep the newest n points, and the newest point of each of
the newest n days / ISO weeks / months that have one. Prune deletes chunks and maps no point
names, under an exclusive lock (docs/repository.md, *Locks*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Hashable, Literal, Sequence

import structlog

from configs.policies import KeepRules
from connectors.stores import BlobNotFound
from tasks.backup.repo import index as chunk_index
from tasks.backup.repo.repository import LOCK_STALE, RecoveryPoint, Repository
from tasks.backup.repo.staging import remove_staged
from tasks.backup.repo.verify import referenced_chunks

log = structlog.stdlib.get_logger("patchdrill.backup")


_PERIODS: dict[str, Callable[[datetime], Hashable]] = {
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
}


def select_kept(times: Sequence[datetime], rules: KeepRules) -> set[int]:
    """Indexes into times of the points the rules keep."""
    if rules.keeps_everything:
        return set(range(len(times)))
    order = sorted(range(len(times)), key=lambda i: times[i], reverse=True)
    kept = set(order[: rules.last or 0])
    for name, period_of in _PERIODS.items():
        budget = getattr(rules, name) or 0
        seen: set[Hashable] = set()
        for i in order:
            if len(seen) >= budget:
                break
            period = period_of(times[i])
            if period not in seen:
                seen.add(period)
                kept.add(i)
    return kept


@dataclass
class ForgetReport:
    kept: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    points: int = 0
    chunks_kept: int = 0
    chunks_deleted: int = 0
    maps_deleted: int = 0
    staged_deleted: int = 0
    #: staged blobs that could not be deleted (warned about; the next prune tries again)
    staged_left: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    #: locks of dead or silent holders that prune removed, with why each was judged stale
    stale_locks_removed: list[str] = field(default_factory=list)


def forget(repo: Repository, rules: KeepRules, *, hosts: Sequence[str] | None = None, disk: str | None = None,
           dry_run: bool = False, stale: timedelta = LOCK_STALE, lock_wait: timedelta = timedelta(0)) -> ForgetReport:
    """Apply rules per host and disk under the exclusive lock; deletes only point files."""
    with repo.lock("prune", wait=lock_wait, stale=stale):
        return _forget(repo, rules, hosts, disk, dry_run)


def prune(repo: Repository, *, dry_run: bool = False, stale: timedelta = LOCK_STALE,
          lock_wait: timedelta = timedelta(0)) -> PruneReport:
    """Delete every chunk and map that no point names. Raises RepositoryBusy beside a backup."""
    with repo.lock("prune", wait=lock_wait, stale=stale) as held:
        return _prune(repo, dry_run, held.removed_stale)


PruneData = Literal["always", "after-forget", "never"]


def forget_and_prune(repo: Repository, rules: KeepRules, *, hosts: Sequence[str] | None = None,
                     prune_data: PruneData = "always", dry_run: bool = False, stale: timedelta = LOCK_STALE,
                     lock_wait: timedelta = timedelta(0)) -> tuple[ForgetReport, PruneReport | None]:
    """Retention as one step under one exclusive lock, taken first: beside a running backup this
    raises RepositoryBusy having deleted nothing, never after forgetting points."""
    with repo.lock("prune", wait=lock_wait, stale=stale) as held:
        forgotten = _forget(repo, rules, hosts, None, dry_run) if not rules.keeps_everything else ForgetReport()
        if prune_data == "never" or (prune_data == "after-forget" and not forgotten.forgotten):
            return forgotten, None
        # A dry run forgot nothing, so the points it would forget are still there: prune must
        # count as if they were gone, or it reports the data they alone hold as kept.
        return forgotten, _prune(repo, dry_run, held.removed_stale, frozenset(forgotten.forgotten))


def _forget(repo: Repository, rules: KeepRules, hosts: Sequence[str] | None, disk: str | None,
            dry_run: bool) -> ForgetReport:
    report = ForgetReport()
    groups: dict[tuple[str, str], list[RecoveryPoint]] = {}
    for host in (hosts if hosts is not None else [None]):
        for point in repo.points(host, disk):
            groups.setdefault((point.host, point.disk), []).append(point)
    for points in groups.values():
        kept = select_kept([p.time for p in points], rules)
        for i, point in enumerate(points):
            if i in kept:
                report.kept.append(point.key)
                continue
            report.forgotten.append(point.key)
            if not dry_run:
                _delete(repo, point.key)
    log.info("retention.forget", kept=len(report.kept), forgotten=len(report.forgotten), dry_run=dry_run)
    return report


def _prune(repo: Repository, dry_run: bool, stale_removed: list[str], forgotten: frozenset[str] = frozenset()) -> PruneReport:
    """`forgotten`: point keys to treat as gone (a dry run's forget left them in place)."""
    report = PruneReport(dry_run=dry_run, stale_locks_removed=list(stale_removed))
    points = [point for point in repo.points() if point.key not in forgotten]
    report.points = len(points)
    # An unreadable map must stop prune: deleting "unreferenced" chunks without knowing
    # what that point names could destroy it.
    live = referenced_chunks(repo, points)
    live_maps = {p.map.id for p in points}
    old_index = repo.index_keys()
    kept: set[bytes] = set()
    doomed = []
    # Uncommitted too: a chunk upload killed midway (the SDK uploads blocks past 64 MiB).
    for chunk_id, info in list(repo.chunk_blobs(uncommitted=True)):
        if chunk_id in live:
            kept.add(chunk_id)
            continue
        doomed.append(info.key)
        report.bytes_freed += info.size
    report.chunks_kept, report.chunks_deleted = len(kept), len(doomed)
    if not dry_run:
        # The consolidated index is complete before the old files go, and it names no chunk
        # about to be deleted, so a crash anywhere leaves an index that names only stored chunks.
        chunk_index.replace(repo, kept, old_index)
        for key in doomed:
            _delete(repo, key)
    for map_id, info in list(repo.map_blobs()):
        if map_id not in live_maps:
            report.maps_deleted += 1
            report.bytes_freed += info.size
            if not dry_run:
                _delete(repo, info.key)
    # A damage record of a chunk no point names any more has nothing left to repair.
    for chunk_id in repo.damaged_chunks():
        if chunk_id not in live and not dry_run:
            repo.clear_damage(chunk_id.hex())
    # No backup holds a lock now, so staged blocks belong to runs that died. What cannot be
    # deleted is counted, never raised: a leftover costs space, not a backup.
    staging = remove_staged(repo.store, dry_run=dry_run)
    report.staged_deleted, report.staged_left = staging.deleted, len(staging.left)
    report.bytes_freed += staging.bytes
    log.info("retention.prune", points=report.points, kept=report.chunks_kept, deleted=report.chunks_deleted,
             maps_deleted=report.maps_deleted, bytes_freed=report.bytes_freed, dry_run=dry_run)
    return report


def _delete(repo: Repository, key: str) -> None:
    try:
        repo.store.delete(key)
    except BlobNotFound:
        pass  # removed by a concurrent run
