"""Verifying a repository: read chunks back and check each decodes to its id.

What verify finds damaged it records in the repository (`damaged/<id>.json`), so the next backup
that reads the same data writes the chunk again and `patchdrill repair` knows what to look for;
a chunk that checks good again has its record removed."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from tasks.backup import progress as progress_mod
from tasks.backup.repo.blockmap import BlockMap, TreeMap
from tasks.backup.scheduling import default_workers
from tasks.backup.errors import BackupError, ChunkCorrupt, ChunkMissing, RepositoryError
from tasks.backup.progress import ProgressSink
from tasks.backup.repo.repository import RecoveryPoint, Repository

log = structlog.stdlib.get_logger("patchdrill.backup")


@dataclass
class VerifyReport:
    points: int = 0
    chunks_total: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # chunk id -> points naming it
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    broken_points: dict[str, str] = field(default_factory=dict)  # point key -> why its map is unreadable
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.broken_points)

    def summary(self) -> str:
        if self.ok:
            return f"{self.points} points, {self.chunks_checked}/{self.chunks_total} chunks checked: all good"
        return (f"{self.points} points, {self.chunks_checked}/{self.chunks_total} chunks checked: "
                f"{len(self.missing)} missing, {len(self.corrupt)} corrupt, {len(self.broken_points)} unreadable points")


def referenced_chunks(repo: Repository, points: list[RecoveryPoint],
                      broken: dict[str, str] | None = None) -> dict[bytes, list[str]]:
    """Chunk id -> keys of the points that name it. Unreadable maps go to `broken` (or raise)."""
    users: dict[bytes, list[str]] = {}
    for point in points:
        try:
            body = repo.get_map(point.map.id, point=point.key)
            ids = (BlockMap.from_json(body, point=point.key).stored_chunks() if point.kind == "block"
                   else TreeMap.from_json(body, point=point.key).chunk_ids())
        except BackupError as exc:
            if broken is None:
                raise
            broken[point.key] = str(exc)
            continue
        for chunk_id in set(ids):
            users.setdefault(chunk_id, []).append(point.key)
    return users


def readable_points(repo: Repository, broken: dict[str, str], host: str | None = None,
                    disk: str | None = None) -> list[RecoveryPoint]:
    """The selected points; one that cannot be read or fails authentication goes to `broken`."""
    found = []
    for key in repo.point_keys(host, disk):
        try:
            found.append(repo.read_point(key))
        except RepositoryError as exc:
            broken[key] = str(exc)
    return found


def verify(repo: Repository, *, host: str | None = None, disk: str | None = None, sample_percent: float = 100.0,
           seed: int | None = None, workers: int | None = None, progress: ProgressSink | None = None) -> VerifyReport:
    """Check every chunk the selected points name (or a random sample_percent of them)."""
    sink = progress or progress_mod.current()
    started = time.monotonic()
    report = VerifyReport()
    points = readable_points(repo, report.broken_points, host, disk)
    report.points = len(points) + len(report.broken_points)
    users = referenced_chunks(repo, points, report.broken_points)
    recorded = repo.damaged_chunks()
    report.chunks_total = len(users)
    chosen = list(users)
    if sample_percent < 100.0:
        count = max(1, round(len(chosen) * sample_percent / 100.0)) if chosen else 0
        chosen = random.Random(seed).sample(chosen, count)

    def check(chunk_id: bytes) -> int:
        try:
            size = len(repo.get_chunk(chunk_id))
        except ChunkMissing:
            report.missing[chunk_id.hex()] = sorted(users[chunk_id])
            return 0
        except ChunkCorrupt:
            report.corrupt[chunk_id.hex()] = sorted(users[chunk_id])
            return 0
        if chunk_id in recorded:
            repo.clear_damage(chunk_id.hex())
        sink.advance("verified", size)
        return size

    sink.add_total("verified", len(chosen))
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="verify") as pool:
        sizes = list(pool.map(check, chosen))
    for problem, found in (("missing", report.missing), ("corrupt", report.corrupt)):
        for chunk_hex, names in found.items():
            repo.record_damage(chunk_hex, problem, names)
    report.chunks_checked = len(chosen)
    report.bytes_checked = sum(sizes)
    report.seconds = round(time.monotonic() - started, 3)
    log.info("verify.done", points=report.points, checked=report.chunks_checked, missing=len(report.missing),
             corrupt=len(report.corrupt), seconds=report.seconds)
    return report
