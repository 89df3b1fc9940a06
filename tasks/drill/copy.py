"""What a drill takes from the backup pipeline, in one place: the repository, the recovery
point a member's selector picks, a delta-aware restore onto the DR target, and a read-only
digest of a primary's disk.

No repository lock is taken: a restore only reads points and chunks, so the primary's backups
go on beside a drill (docs/repository.md: only prune excludes others, and points are written
last, so a point listed here is complete).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from configs.models import PatchdrillConfig
from configs.plans import PointSelector
from connectors.base import Connector
from tasks.backup.repo.blockmap import TreeMap
from tasks.backup.policy import policy_from_config
from tasks.backup.repo.repository import RecoveryPoint, Repository, parse_stamp
from tasks.backup.disk import open_repository

DIGEST_SCRIPT = Path(__file__).parent / "host_scripts" / "digest.py"


class PointMissing(Exception):
    """No recovery point matches a member's selector."""


def repository(config: PatchdrillConfig, base_dir: Path, policy: str | None) -> Repository:
    """The repository holding the plan's points, opened with its backup policy's key."""
    chosen = policy_from_config(config.backup_policies, policy, source="recovery plan")
    return open_repository(config.storage, base_dir, chosen)


def choose_point(repo: Repository, host: str, disk: str, selector: PointSelector) -> RecoveryPoint:
    """The newest point of host/disk the selector accepts; reads point manifests newest first
    and only as many as it needs."""
    keys = repo.point_keys(host, disk)
    cutoff = selector.cutoff
    for key in reversed(keys):
        if cutoff is not None and parse_stamp(key.rsplit("/", 1)[1].removesuffix(".json")) > cutoff:
            continue
        point = repo.read_point(key)
        if selector.select == "latest-application-consistent" and point.consistency != "application-consistent":
            continue
        return point
    why = {"latest": "no recovery point", "latest-application-consistent": "no application-consistent point",
           "before": f"no point taken before {cutoff.isoformat() if cutoff else ''}"}[selector.select]
    raise PointMissing(f"{why} of {host}/{disk} in {repo.name}" + (f" (it has {len(keys)} other points)" if keys else ""))


@dataclass(frozen=True)
class Digest:
    kind: str
    digest: str
    entries: int
    bytes: int


def disk_digest(connector: Connector, path: str) -> Digest:
    """A read-only digest of a disk on its host (tree for a directory, content for an image)."""
    result = connector.run_script(DIGEST_SCRIPT, [path], timeout=3600)
    if not result.ok:
        tail = (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
        raise OSError(f"{connector.name}: cannot read {path} for its checksum: {tail}")
    return Digest(**json.loads(result.stdout.strip().splitlines()[-1]))


def point_file_digests(repo: Repository, point: RecoveryPoint, paths: Iterable[str]) -> dict[str, str | None]:
    """sha256 of files as a directory point holds them (None for a path it lacks), read from
    their verified chunks: what a checksum probe compares the restored copy with."""
    if point.kind != "directory":
        raise PointMissing(f"{point.key} is a block image: checksum probes read files of directory points")
    tree = TreeMap.from_json(repo.get_map(point.map.id, point=point.key), point=point.key)
    entries = {e.path: e for e in tree.entries if e.type == "file"}
    found: dict[str, str | None] = {}
    for path in paths:
        entry = entries.get(path.strip("/"))
        if entry is None:
            found[path] = None
            continue
        digest = hashlib.sha256()
        for chunk_id in entry.chunks:
            digest.update(repo.get_chunk(chunk_id, point=point.key))
        found[path] = digest.hexdigest()
    return found
