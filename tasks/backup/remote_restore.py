"""Restoring a point onto another host, through nothing but the connector's put and run_script.

The host first describes the target (blockscan probe, which also removes what a killed restore
left there), and the same rules as a local restore decide what may be touched (restore.decide).
Images: the host hashes what its target holds (blockscan scan), the controller compares with
the point and sends only the blocks that differ, verified, in patch files that the host applies
in place (blockscan apply). A new target is assembled under a temporary name and renamed when
complete; the directories above it are created first (a fresh DR volume). Directories: the controller verifies every chunk and ships the tree's plan and the
blocks of its files (onto an existing tree only those whose host-side hash differs, blockscan
hashes); the host writes them with the same tree writer a local restore uses (blockscan
place): no symbolic link in the target is followed, an existing directory is restored in place
and a whole point's restore removes what the point lacks.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import shutil
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from connectors.base import CommandResult, Connector
from tasks.backup.host_scripts import blockscan
from tasks.backup import cancel
from tasks.backup.repo.blockmap import BlockMap, TreeMap
from tasks.backup.errors import BackupError, RestoreFailed
from tasks.backup.sources.remote import FINGERPRINT, SCRIPT, RemoteBlockSource, host_fingerprint
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.restore import RestoreResult, decide, select_entries, tree_plan

log = structlog.stdlib.get_logger("patchdrill.backup")

#: bytes of block data per patch file: bounds the controller's and the host's temporary space
PATCH_BYTES = 64 * 1024 * 1024
_APPLY_TIMEOUT = 3600.0


def _last_line(result: CommandResult) -> str:
    return (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1].removeprefix("blockscan: ")


def restore_to_host(repo: Repository, point: RecoveryPoint, connector: Connector, target: str, *,
                    force: bool = False, include: list[str] | None = None) -> RestoreResult:
    """Restore point onto the connector's host at target (refused if it exists, unless force)."""
    where = f"{connector.name}:{target}"
    if point.kind == "block" and include:
        raise BackupError(f"point {point.key} is a block-level image: it has no files to select")
    probed = connector.run_script(SCRIPT, ["probe", target, "0"], timeout=300)
    if not probed.ok:
        raise RestoreFailed(f"host {connector.name}: cannot look at restore target {target!r}: {_last_line(probed)}")
    found = json.loads(probed.stdout)
    if found["removed"]:
        log.warning("restore.leftovers_removed", host=connector.name, target=target, removed=found["removed"])
    in_place = decide(found, point, force, where)
    if not found["exists"]:
        _make_parent(connector, target)
    if point.kind == "directory":
        return _restore_tree(repo, point, connector, target, in_place, include)
    return _restore_image(repo, point, connector, target, in_place)


def _make_parent(connector: Connector, target: str) -> None:
    """Create the directories above a new target (a fresh DR volume's path): the patch, plan and
    data files are sent beside the target before the host assembles it."""
    parent = posixpath.dirname(target.rstrip("/")) or "/"
    made = connector.run(f"mkdir -p -- {shlex.quote(parent)}", timeout=60)
    if not made.ok:
        raise RestoreFailed(f"host {connector.name}: cannot create {parent} for restore target {target!r}: "
                            f"{_last_line(made)}")


class _Patches:
    """Changed blocks gathered into patch files, each shipped and applied when full."""

    def __init__(self, connector: Connector, target: str, work: str, block_map: BlockMap, scratch: Path) -> None:
        self.connector = connector
        self.target = target
        self.work = work
        self.block_map = block_map
        self.scratch = scratch
        self.pending = 0
        self.blocks = 0
        self.bytes = 0
        self._file = open(scratch / "patch", "wb")

    def add(self, index: int, data: bytes) -> None:
        self._file.write(struct.pack(">QI", index, len(data)))
        self._file.write(data)
        self.pending += len(data)
        self.blocks += 1
        self.bytes += len(data)
        if self.pending >= PATCH_BYTES:
            self.ship(finish=False, rename="-")

    def ship(self, *, finish: bool, rename: str) -> None:
        self._file.close()
        # Named like a restore's temporary, so the next restore removes it should this one die.
        remote = f"{blockscan.temp_name(self.target)}.patch"
        self.connector.put(self.scratch / "patch", remote)
        result = self.connector.run_script(SCRIPT, ["apply", remote, self.work, str(self.block_map.block_size),
                                                    str(self.block_map.size), "1" if finish else "0", rename],
                                           timeout=_APPLY_TIMEOUT)
        if not result.ok:
            self.connector.run(f"rm -f {shlex.quote(remote)}", timeout=60)
            raise RestoreFailed(f"host {self.connector.name}: {_last_line(result)}")
        self.pending = 0
        self._file = open(self.scratch / "patch", "wb")

    def close(self) -> None:
        self._file.close()


def _restore_image(repo: Repository, point: RecoveryPoint, connector: Connector, target: str,
                   exists: bool) -> RestoreResult:
    started = time.monotonic()
    block_map = BlockMap.from_json(repo.get_map(point.map.id, point=point.key), point=point.key)
    theirs: list[bytes] = RemoteBlockSource(connector, target).scan(block_map.block_size) if exists else []
    known = block_map.fingerprints if block_map.fingerprint == FINGERPRINT else None
    zero = repo.codec.chunk_id(bytes(block_map.block_size))
    recurring = {c for c, n in Counter(block_map.chunks).items() if n > 1}
    cache: dict[bytes, bytes] = {}
    work = target if exists else blockscan.temp_name(target)
    scratch = Path(tempfile.mkdtemp(prefix="patchdrill-restore-"))
    patches = _Patches(connector, target, work, block_map, scratch)
    try:
        for index, chunk_id in enumerate(block_map.chunks):
            cancel.check()
            if not exists and chunk_id == zero:
                continue  # a fresh file reads as zeros there already
            if exists and known is not None and index < len(theirs) and theirs[index] == known[index]:
                continue  # the host already holds this block: nothing to fetch or send
            data = cache.get(chunk_id) or repo.get_chunk(chunk_id, point=point.key)
            if chunk_id in recurring and len(cache) < 16:
                cache[chunk_id] = data
            if exists and known is None and index < len(theirs) and theirs[index] == host_fingerprint(data):
                continue
            patches.add(index, data)
        patches.ship(finish=True, rename="-" if exists else target)
    except BaseException:
        if not exists:
            connector.run(f"rm -f {shlex.quote(work)}", timeout=60)
        raise
    finally:
        patches.close()
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("restore.done", point=point.key, host=connector.name, target=target, blocks_written=patches.blocks)
    return RestoreResult(point=point.key, target=f"{connector.name}:{target}", blocks=len(block_map.chunks),
                         blocks_written=patches.blocks, bytes_written=patches.bytes, files=None,
                         seconds=round(time.monotonic() - started, 3))


def _host_hashes(connector: Connector, target: str, paths: list[str], block_size: int,
                 scratch: Path) -> dict[str, list[bytes]]:
    """Block hashes of the target's files that would be written in place (blockscan hashes)."""
    remote = f"{blockscan.temp_name(target)}.list"
    (scratch / "list").write_text(json.dumps(paths))
    connector.put(scratch / "list", remote)
    result = connector.run_script(SCRIPT, ["hashes", target, str(block_size), remote], timeout=_APPLY_TIMEOUT)
    if not result.ok:
        connector.run(f"rm -f {shlex.quote(remote)}", timeout=60)
        raise RestoreFailed(f"host {connector.name}: cannot read restore target {target!r}: {_last_line(result)}")
    found = json.loads(result.stdout)
    return {path: [bytes.fromhex(h[i:i + 64]) for i in range(0, len(h), 64)] for path, h in found.items()}


def _restore_tree(repo: Repository, point: RecoveryPoint, connector: Connector, target: str, in_place: bool,
                  include: list[str] | None) -> RestoreResult:
    """Ships the plan and, as records, the blocks of its files; onto an existing tree only the
    blocks that differ from the host's copy (compared by host-side hash), as for images."""
    started = time.monotonic()
    tree = TreeMap.from_json(repo.get_map(point.map.id, point=point.key), point=point.key)
    entries = select_entries(tree.entries, include, point)
    plan: dict[str, Any] = tree_plan(tree, entries, whole=not include) | {"block_size": tree.block_size}
    recurring = {c for c, n in Counter(c for e in entries for c in e.chunks).items() if n > 1}
    cache: dict[bytes, bytes] = {}
    written = nbytes = 0
    scratch = Path(tempfile.mkdtemp(prefix="patchdrill-restore-"))
    # Named like a killed restore's leftovers, so the next probe removes them if this one dies.
    remote = blockscan.temp_name(target)
    try:
        files = [e.path for e in entries if e.type == "file" and e.chunks]
        theirs = _host_hashes(connector, target, files, tree.block_size, scratch) if in_place and files else {}
        with open(scratch / "data", "wb") as data:
            for number, entry in enumerate(entries):
                held = theirs.get(entry.path, [])
                for index, chunk_id in enumerate(entry.chunks):
                    chunk = cache.get(chunk_id) or repo.get_chunk(chunk_id, point=point.key)
                    if chunk_id in recurring and len(cache) < 16:
                        cache[chunk_id] = chunk
                    if index < len(held) and held[index] == host_fingerprint(chunk):
                        plan["entries"][number]["partial"] = True
                        continue  # the host's copy already holds this block
                    data.write(struct.pack(">IQI", number, index, len(chunk)))
                    data.write(chunk)
                    written += 1
                    nbytes += len(chunk)
        (scratch / "plan").write_text(json.dumps(plan))
        connector.put(scratch / "plan", f"{remote}.plan")
        connector.put(scratch / "data", f"{remote}.data")
        result = connector.run_script(SCRIPT, ["place", f"{remote}.plan", f"{remote}.data", target],
                                      timeout=_APPLY_TIMEOUT)
        if not result.ok:
            connector.run(f"rm -f {shlex.quote(remote + '.plan')} {shlex.quote(remote + '.data')}", timeout=60)
            raise RestoreFailed(f"host {connector.name}: {_last_line(result)}")
        outcome = json.loads(result.stdout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    skipped = tree.skipped + [f"{path}: {why}" for path, why in outcome["skipped"]]
    log.info("restore.done", point=point.key, host=connector.name, target=target, blocks_written=written,
             removed=outcome["removed"], skipped=len(skipped))
    return RestoreResult(point=point.key, target=f"{connector.name}:{target}",
                         blocks=sum(len(e.chunks) for e in entries), blocks_written=written, bytes_written=nbytes,
                         files=len(entries), seconds=round(time.monotonic() - started, 3),
                         removed=outcome["removed"], skipped=skipped)
