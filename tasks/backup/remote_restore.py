"""Restoring a point onto another host, through nothing but the connector's put and run_script.

Images: the host hashes what its target holds (blockscan scan), the controller compares with
the point and sends only the blocks that differ, verified, in patch files that the host applies
in place (blockscan apply). A new target is assembled under a temporary name and renamed when
complete. Directories: restored (verified) on the controller, then shipped as one tar archive
that the host unpacks with owners, modes, times and symlinks.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import structlog

from connectors.base import Connector
from tasks.backup import cancel
from tasks.backup.blockmap import BlockMap
from tasks.backup.errors import BackupError, TargetExists
from tasks.backup.remote_source import FINGERPRINT, SCRIPT, RemoteBlockSource, host_fingerprint
from tasks.backup.repository import RecoveryPoint, Repository
from tasks.backup.restore import RestoreResult, restore

log = structlog.stdlib.get_logger("patchdrill.backup")

#: bytes of block data per patch file: bounds the controller's and the host's temporary space
PATCH_BYTES = 64 * 1024 * 1024
_APPLY_TIMEOUT = 3600.0


def restore_to_host(repo: Repository, point: RecoveryPoint, connector: Connector, target: str, *,
                    force: bool = False, include: list[str] | None = None) -> RestoreResult:
    """Restore point onto the connector's host at target (refused if it exists, unless force)."""
    exists = connector.run(f"test -e {shlex.quote(target)}", timeout=60).ok
    if exists and not force:
        raise TargetExists(f"host {connector.name}: restore target {target!r} exists; use --force (force=True) "
                           f"to overwrite it (only blocks that differ from point {point.key} are sent)")
    if point.kind == "directory":
        return _restore_tree(repo, point, connector, target, exists, include)
    if include:
        raise BackupError(f"point {point.key} is a block-level image: it has no files to select")
    return _restore_image(repo, point, connector, target, exists)


class _Patches:
    """Changed blocks gathered into patch files, each shipped and applied when full."""

    def __init__(self, connector: Connector, work: str, block_map: BlockMap, scratch: Path) -> None:
        self.connector = connector
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
        remote = f"{self.work}.patch-{uuid.uuid4().hex[:12]}"
        self.connector.put(self.scratch / "patch", remote)
        result = self.connector.run_script(SCRIPT, ["apply", remote, self.work, str(self.block_map.block_size),
                                                    str(self.block_map.size), "1" if finish else "0", rename],
                                           timeout=_APPLY_TIMEOUT)
        if not result.ok:
            self.connector.run(f"rm -f {shlex.quote(remote)}", timeout=60)
            problem = result.stderr.strip().splitlines()[-1:] or [f"exit {result.exit_code}"]
            raise BackupError(f"host {self.connector.name}: writing {self.work!r} failed: {problem[0]}")
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
    work = target if exists else f"{target}.patchdrill-restore-{uuid.uuid4().hex[:12]}"
    scratch = Path(tempfile.mkdtemp(prefix="patchdrill-restore-"))
    patches = _Patches(connector, work, block_map, scratch)
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


def _restore_tree(repo: Repository, point: RecoveryPoint, connector: Connector, target: str, exists: bool,
                  include: list[str] | None) -> RestoreResult:
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="patchdrill-restore-"))
    try:
        local = restore(repo, point, scratch / "tree", include=include)
        archive = scratch / "tree.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            # The children, not ".": the point holds no metadata for the disk's root directory,
            # so the host's target directory keeps its own.
            for child in sorted((scratch / "tree").iterdir()):
                tar.add(child, arcname=child.name)
        remote = f"{target}.patchdrill-restore-{uuid.uuid4().hex[:12]}"
        connector.put(archive, f"{remote}.tar")
        q = shlex.quote
        into = q(target) if exists else q(remote)
        # GNU tar as root restores owners by default; --same-owner says so for any user allowed to.
        script = (f"mkdir -p {into} && tar -xpf {q(remote + '.tar')} -C {into} --same-owner; rc=$?; "
                  f"rm -f {q(remote + '.tar')}; [ $rc -eq 0 ] || exit $rc")
        if not exists:
            script += f" && mv {q(remote)} {q(target)}"
        result = connector.run(script, timeout=_APPLY_TIMEOUT)
        if not result.ok:
            if not exists:
                connector.run(f"rm -rf {q(remote)}", timeout=300)
            raise BackupError(f"host {connector.name}: unpacking into {target!r} failed: "
                              f"{(result.stderr.strip().splitlines() or [str(result.exit_code)])[-1]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RestoreResult(point=point.key, target=f"{connector.name}:{target}", blocks=local.blocks,
                         blocks_written=local.blocks_written, bytes_written=local.bytes_written, files=local.files,
                         seconds=round(time.monotonic() - started, 3))
