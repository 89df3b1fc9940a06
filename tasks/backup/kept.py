"""Kept reflink clones: changed-block tracking for image files and the instant-restore tier.

A backup that read an image file from a reflink clone (XFS, Btrfs) keeps that clone on the host
when its policy has `kept_clones`; the point records it (`RecoveryPoint.kept_clone`). The next
backup compares the extent maps of its new clone and the kept one (host_scripts/kept_clones.py)
and reads only the blocks whose extents differ; a restore of a point whose clone is still there
clones it back on the host instead of fetching chunks from the store. Every use checks first
that the clone is the one the point recorded, untouched; anything else falls back (to reading
and hashing, or to the repository) and says why.

LVM thin volumes could do the same with `thin_delta` between two thin snapshots; that needs
device-mapper, which the machines this was built and tested on lack, so LVM disks read and hash.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from configs.models import DiskConfig, HostConfig
from connectors import connect
from configs.policies import KeptClones
from connectors.base import Connector, ConnectorError, RetryPolicy
from tasks.backup.errors import BackupError
from tasks.backup.host_scripts import blockscan, kept_clones as helper
from tasks.backup.restore import RestoreResult, decide
from tasks.backup.repo.repository import KeptClone, RecoveryPoint, Repository, parse_stamp, point_stamp, utcnow
from tasks.backup.snapshot.view import SnapshotRecord
from tasks.backup.sources.base import TrackedChanges

log = structlog.stdlib.get_logger("patchdrill.backup")
SCRIPT = Path(helper.__file__)
_TIMEOUT = 3600.0


class CannotServe(Exception):
    """The kept clone cannot serve this (missing, touched, another file system): fall back."""


class KeptCloneError(BackupError):
    """The host could not keep, list or drop kept clones; names the host and the disk."""


def _call(connector: Connector, action: str, args: list[str], where: str) -> dict[str, Any]:
    result = connector.run_script(SCRIPT, [action, *args], timeout=_TIMEOUT)
    if result.exit_code == helper.NOT_APPLICABLE:
        raise CannotServe(result.tail(1).removeprefix("kept_clones: "))
    if not result.ok:
        raise KeptCloneError(f"{where}: kept clones: {action} failed: {result.tail(1) or f'exit {result.exit_code}'}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise KeptCloneError(f"{where}: kept clones: {action} printed no JSON (is python3 installed on the host?)") from None


def _identity(clone: KeptClone) -> str:
    return json.dumps(clone.model_dump(include={"device", "inode", "ctime_ns", "size"}))


def track(connector: Connector, host: str, disk: str, parent: RecoveryPoint | None, snap: SnapshotRecord,
          block_size: int) -> TrackedChanges | str:
    """What changed since the parent point, from the two clones' extent maps; or why not (a
    note: the disk is then read and hashed)."""
    if snap.method != "reflink":
        return f"read and hash: the disk was not read from a reflink clone (snapshot method {snap.method})"
    if parent is None:
        return "read and hash: no earlier point to compare with"
    if parent.kept_clone is None:
        return f"read and hash: point {parent.key} kept no clone on the host"
    if parent.block_size != block_size:
        return f"read and hash: point {parent.key} was made at another block size ({parent.block_size})"
    where = f"host {host} disk {disk}"
    try:
        found = _call(connector, "changed", [parent.kept_clone.path, snap.read_path, str(block_size),
                                             _identity(parent.kept_clone)], where)
    except CannotServe as why:
        return f"read and hash: {why}"
    changed = frozenset(i for first, count in found["changed"] for i in range(first, first + count))
    return TrackedChanges(parent=parent.key, size=int(found["size"]), changed=changed,
                          how=f"extent map compared with the kept clone of point {parent.key} "
                          f"({parent.kept_clone.file_system})")


def images(disks: list[DiskConfig]) -> list[str]:
    """The paths of disks that may be image files (kept clones live beside them)."""
    return [d.path for d in disks if d.kind != "directory"]


@dataclass
class Kept:
    clone: KeptClone | None = None
    notes: list[str] = field(default_factory=list)
    #: why no clone was kept, when the host cannot hold one (for the disk's report)
    warning: str | None = None
    #: the host's kept clones and the bytes they hold of their own, as the keep step found them
    held: dict[str, Any] | None = None


def keep(connector: Connector, host: str, disk: DiskConfig, snap: SnapshotRecord, rules: KeptClones,
         disks: list[DiskConfig]) -> Kept:
    """Keep the clone the point was read from, where the host's file system has room for the
    kept clones to grow to the limit."""
    where = f"host {host} disk {disk.name}"
    if snap.method != "reflink":
        return Kept()
    out = _call(connector, "keep", [snap.read_path, disk.path, host, disk.name, point_stamp(snap.taken_at),
                                    str(int(rules.space_limit)), *images(disks)], where)
    fs, label = out["fs"], f"{out['fs']['type']} at {out['fs']['mount']}"
    if not out["kept"]:
        warning = (f"{where}: no clone kept: the {fs['type']} file system at {fs['mount']} has {_gib(fs['free'])} "
                   f"free, less than the {_gib(out['room'])} the kept clones of host {host} may still grow to "
                   f"(kept_clones.space_limit {_gib(rules.space_limit)}); free space there or lower the limit. "
                   "The next backup reads and hashes the whole disk")
        log.warning("kept.no_room", host=host, disk=disk.name, fs=fs["mount"], free=fs["free"], room=out["room"])
        return Kept(notes=[warning.removeprefix(f"{where}: ")], warning=warning, held=out)
    clone = KeptClone(**{k: out["identity"][k] for k in ("path", "device", "inode", "ctime_ns", "size")},
                      file_system=label)
    return Kept(clone=clone, notes=[f"clone kept on the host for changed-block tracking and instant restore ({label})"],
                held=out)


def drop_unwanted(repo: Repository, connector: Connector, host: str, disks: list[DiskConfig],
                  rules: KeptClones | None, protect: frozenset[tuple[str, str]] = frozenset(),
                  held: dict[str, Any] | None = None) -> list[str]:
    """Remove the host's kept clones whose point is gone, is not among its disk's newest
    `rules.points` or is older than `rules.days`; then the oldest until the clones hold no more
    than the space limit. Without rules, only those whose point is gone. `protect` ((disk,
    stamp)) is never dropped; `held` is the host's usage listing when the caller has it.
    Returns what went ("disk/stamp")."""
    where = f"host {host}"
    held = held or _call(connector, "usage", [host, *images(disks)], where)
    wanted = _tier(repo, host, rules)
    doomed = [(c["disk"], c["stamp"]) for c in held["clones"]
              if (c["disk"], c["stamp"]) not in wanted and (c["disk"], c["stamp"]) not in protect]
    dropped = _drop(connector, host, disks, doomed, where)
    remaining = sorted(((c["stamp"], c["disk"]) for c in held["clones"] if (c["disk"], c["stamp"]) not in doomed))
    if rules is None:
        return dropped
    own = int(held["own_bytes"]) if not dropped else int(_call(connector, "usage", [host, *images(disks)], where)["own_bytes"])
    for stamp, disk in remaining:
        if own <= rules.space_limit:
            break
        if (disk, stamp) in protect:
            continue
        dropped += _drop(connector, host, disks, [(disk, stamp)], where)
        own = int(_call(connector, "usage", [host, *images(disks)], where)["own_bytes"])
        log.warning("kept.space_limit", host=host, disk=disk, dropped=stamp, own_bytes=own,
                    limit=int(rules.space_limit))
    return dropped


def _tier(repo: Repository, host: str, rules: KeptClones | None) -> set[tuple[str, str]]:
    """(disk, stamp) of the points whose clones the rules keep (every point's, without rules)."""
    wanted = set()
    for key in repo.point_keys(host):
        _, _, disk, name = key.split("/", 3)
        wanted.add((disk, name.removesuffix(".json")))
    if rules is None:
        return wanted
    oldest = utcnow() - timedelta(days=rules.days)
    kept: set[tuple[str, str]] = set()
    for disk in {d for d, _ in wanted}:
        stamps = sorted((s for d, s in wanted if d == disk), reverse=True)[:rules.points]
        kept |= {(disk, s) for s in stamps if parse_stamp(s) >= oldest}
    return kept


def _drop(connector: Connector, host: str, disks: list[DiskConfig], clones: list[tuple[str, str]],
          where: str) -> list[str]:
    by_disk: dict[str, list[str]] = {}
    for disk, stamp in clones:
        by_disk.setdefault(disk, []).append(stamp)
    paths = {d.name: d.path for d in disks}
    dropped = []
    for disk, stamps in by_disk.items():
        if disk not in paths:
            continue  # a disk no longer in the config: its clones are left for the operator
        out = _call(connector, "drop", [host, paths[disk], disk, *stamps], f"{where} disk {disk}")
        dropped += [f"{disk}/{s}" for s in out["dropped"]]
    if dropped:
        log.info("kept.dropped", host=host, clones=dropped)
    return dropped


def drop_clone(connector: Connector, host: str, disk: DiskConfig, stamp: str) -> None:
    """Remove one kept clone (a point that failed to be written); a failure is only logged: the
    next trim removes a clone no point names."""
    try:
        _call(connector, "drop", [host, disk.path, disk.name, stamp], f"host {host} disk {disk.name}")
    except (BackupError, CannotServe, ConnectorError) as exc:
        log.warning("kept.drop_failed", host=host, disk=disk.name, stamp=stamp, error=str(exc))


def instant_copies(connector: Connector, host: str, disks: list[DiskConfig]) -> set[tuple[str, str]]:
    """(disk, point stamp) of every clone kept on the host."""
    held = _call(connector, "usage", [host, *images(disks)], f"host {host}")
    return {(c["disk"], c["stamp"]) for c in held["clones"]}


def instant_points(hosts: list[HostConfig], base_dir: Path, points: list[RecoveryPoint]) -> dict[str, bool | None]:
    """For each block point of a host in `hosts`: whether its clone is kept on the host now
    (None: the host could not be asked). One call per host, none for hosts without block points."""
    found: dict[str, bool | None] = {}
    by_name = {h.name: h for h in hosts}
    for name in sorted({p.host for p in points if p.kind == "block"}):
        host = by_name.get(name)
        if host is None or host.transport == "winrm":
            continue
        disks = [_placed(host, d, base_dir) for d in host.disks]
        try:
            with connect(host, base_dir=base_dir, retry=RetryPolicy(attempts=1)) as connector:
                there: set[tuple[str, str]] | None = instant_copies(connector, name, disks)
        except (BackupError, CannotServe, ConnectorError) as exc:
            log.warning("kept.unknown", host=name, error=str(exc))
            there = None
        for point in points:
            if point.host == name and point.kind == "block":
                stamp = point.key.rsplit("/", 1)[1].removesuffix(".json")
                found[point.key] = None if there is None else (point.disk, stamp) in there
    return found


def _placed(host: HostConfig, disk: DiskConfig, base_dir: Path) -> DiskConfig:
    # The lab's local paths are relative to the config file (tasks/backup/disk.placed_disk).
    if host.transport == "local" and not Path(disk.path).is_absolute():
        return disk.model_copy(update={"path": str(base_dir / disk.path)})
    return disk


def restore_instantly(point: RecoveryPoint, source_host: HostConfig, target_host: HostConfig | None, target: str,
                      base_dir: Path, force: bool) -> RestoreResult | str:
    """Restore a point by cloning its kept clone onto target, on the host that keeps it; or why
    that cannot be done (the caller restores from the repository). Refuses an existing target
    without force exactly as a restore from the repository does."""
    assert point.kept_clone is not None
    onto = target_host or (source_host if source_host.transport == "local" else None)
    if onto is None or onto.name != source_host.name:
        return f"the instant copy of {point.key} is on host {source_host.name}, not where the restore goes"
    if onto.transport == "winrm":
        return f"host {onto.name} keeps no instant copies (Windows)"
    started = time.monotonic()
    where = target if onto.transport != "local" else str(Path(target).absolute())
    with connect(onto, base_dir=base_dir) as connector:
        probed = connector.run_script(Path(blockscan.__file__), ["probe", where, "0"], timeout=_TIMEOUT)
        if not probed.ok:
            return f"cannot look at {where} on host {onto.name}: {probed.tail(1)}"
        in_place = decide(json.loads(probed.stdout), point, force, where)
        try:
            out = _call(connector, "restore", [point.kept_clone.path, where, _identity(point.kept_clone),
                                               "1" if in_place else "0"], f"host {point.host} disk {point.disk}")
        except CannotServe as why:
            return f"instant copy not used: {why}"
    log.info("restore.instant", point=point.key, host=onto.name, target=where, in_place=in_place)
    return RestoreResult(point=point.key, target=where, blocks=point.map.blocks, blocks_written=0,
                         bytes_written=int(out["size"]), files=None, seconds=round(time.monotonic() - started, 3),
                         source="instant copy")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
