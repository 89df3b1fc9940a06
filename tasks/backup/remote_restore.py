"""Restoring a point onto another host, through nothing but the connector's put and run_script.

The host first describes the target (blockscan probe, which also removes what a killed restore
left there), and the same rules as a local restore decide what may be touched (restore.decide).
Images: the host hashes what its target holds (blockscan scan), the controller compares with
the point and sends only the blocks that differ, verified, in patch files that the host applies
in place (blockscan apply); the point's holes cost no data (left alone in a new target, sent as
zero records where the target holds data). A new target is assembled under a temporary name and renamed when
complete; the directories above it are created first (a fresh DR volume). Directories: the controller verifies every chunk and ships the tree's plan and the
blocks of its files (onto an existing tree only those whose host-side hash differs, blockscan
hashes); the host writes them with the same tree writer a local restore uses (blockscan
place): no symbolic link in the target is followed, an existing directory is restored in place
and a whole point's restore removes what the point lacks. Windows hosts take image points only:
win_blockscan.ps1 hashes what the target holds, win_restore.ps1 writes the patch files in place.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import shutil
import struct
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import structlog

from connectors.base import CommandResult, Connector
from tasks.backup.host_scripts import blockscan
from tasks.backup import cancel
from tasks.backup.repo.blockmap import HOLE, BlockMap, TreeMap
from tasks.backup.errors import BackupError, RestoreFailed
from tasks.backup.sources.base import ZeroFingerprints
from tasks.backup.sources.remote import FINGERPRINT, SCRIPT, RemoteBlockSource, host_fingerprint
from tasks.backup.sources.windows_direct_upload import FINGERPRINT as WINDOWS_FINGERPRINT
from tasks.backup.sources.windows_direct_upload import scan_on_host, sha256_fingerprint
from tasks.backup.repo.repository import RecoveryPoint, Repository
from tasks.backup.restore import RestoreResult, decide, select_entries, tree_plan

log = structlog.stdlib.get_logger("patchdrill.backup")

#: bytes of block data per patch file: bounds the controller's and the host's temporary space
PATCH_BYTES = 64 * 1024 * 1024
_APPLY_TIMEOUT = 3600.0
WINDOWS_SCRIPT = Path(__file__).parent / "host_scripts" / "win_restore.ps1"


def _last_line(result: CommandResult) -> str:
    return (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1].removeprefix("blockscan: ")


def restore_to_host(repo: Repository, point: RecoveryPoint, connector: Connector, target: str, *,
                    force: bool = False, include: list[str] | None = None) -> RestoreResult:
    """Restore point onto the connector's host at target (refused if it exists, unless force)."""
    where = f"{connector.name}:{target}"
    if point.kind == "block" and include:
        raise BackupError(f"point {point.key} is a block-level image: it has no files to select")
    if connector.os_family == "windows":
        return _restore_windows(repo, point, connector, target, force)
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


def _restore_windows(repo: Repository, point: RecoveryPoint, connector: Connector, target: str,
                     force: bool) -> RestoreResult:
    """An image point onto a Windows host: win_restore.ps1 describes the target (making its
    parent directory, removing a killed restore's work file), the same rules decide."""
    where = f"{connector.name}:{target}"
    if point.kind != "block":
        raise BackupError(f"point {point.key} is a directory tree: only image points (VHD, VHDX, raw) restore onto "
                          f"Windows hosts such as {connector.name}")
    probed = connector.run_script(WINDOWS_SCRIPT, ["-Mode", "Probe", "-Path", target], timeout=300)
    if not probed.ok:
        raise RestoreFailed(f"host {connector.name}: cannot look at restore target {target!r}: "
                            f"{probed.tail(1) or f'exit {probed.exit_code}'}")
    found = json.loads(probed.stdout.strip().splitlines()[-1])
    return _restore_image(repo, point, connector, target, decide(found, point, force, where))


def _make_parent(connector: Connector, target: str) -> None:
    """Create the directories above a new target (a fresh DR volume's path): the patch, plan and
    data files are sent beside the target before the host assembles it."""
    parent = posixpath.dirname(target.rstrip("/")) or "/"
    made = connector.run(f"mkdir -p -- {shlex.quote(parent)}", timeout=60)
    if not made.ok:
        raise RestoreFailed(f"host {connector.name}: cannot create {parent} for restore target {target!r}: "
                            f"{_last_line(made)}")


class _ImageHost(Protocol):
    """How one kind of host takes an image restore: what it holds, and how a patch file of
    changed blocks reaches the target (Linux: blockscan.py over the connector; Windows:
    win_blockscan.ps1 and win_restore.ps1 over WinRM)."""

    #: the name of the block hash `fingerprint` computes (a point's map may hold the same kind)
    fingerprint_name: str
    #: whether its patch files take zero records (a range made zeros, no data sent)
    zero_records: bool

    def scan(self, block_size: int) -> list[bytes]: ...

    def fingerprint(self, data: bytes) -> bytes: ...

    def ship(self, patch: Path, *, finish: bool) -> None: ...

    def discard(self) -> None: ...


class _LinuxImage:
    def __init__(self, connector: Connector, target: str, exists: bool, block_map: BlockMap) -> None:
        self.connector, self.target, self.block_map = connector, target, block_map
        self.exists = exists
        self.work = target if exists else blockscan.temp_name(target)
        self.fingerprint_name = FINGERPRINT
        self.zero_records = True

    def scan(self, block_size: int) -> list[bytes]:
        return RemoteBlockSource(self.connector, self.target).scan(block_size)

    def fingerprint(self, data: bytes) -> bytes:
        return host_fingerprint(data)

    def ship(self, patch: Path, *, finish: bool) -> None:
        # Named like a restore's temporary, so the next restore removes it should this one die.
        remote = f"{blockscan.temp_name(self.target)}.patch"
        self.connector.put(patch, remote)
        rename = self.target if finish and not self.exists else "-"
        result = self.connector.run_script(SCRIPT, ["apply", remote, self.work, str(self.block_map.block_size),
                                                    str(self.block_map.size), "1" if finish else "0", rename],
                                           timeout=_APPLY_TIMEOUT)
        if not result.ok:
            self.connector.run(f"rm -f {shlex.quote(remote)}", timeout=60)
            raise RestoreFailed(f"host {self.connector.name}: {_last_line(result)}")

    def discard(self) -> None:
        if not self.exists:
            self.connector.run(f"rm -f {shlex.quote(self.work)}", timeout=60)


class _WindowsImage:
    """An image file on a Windows host. The changed blocks cross WinRM in patch files (the
    connector's put, max_transfer_bytes each): fine for the images a drill or failover of a
    small VM moves, slow for large ones, whose data has no faster way to the host yet (a host
    cannot read the repository's compressed, possibly encrypted chunks itself)."""

    fingerprint_name = WINDOWS_FINGERPRINT
    #: win_restore.ps1 reads data records only: zeros are sent as data
    zero_records = False

    def __init__(self, connector: Connector, target: str, exists: bool, block_map: BlockMap) -> None:
        self.connector, self.target, self.block_map, self.exists = connector, target, block_map, exists

    def scan(self, block_size: int) -> list[bytes]:
        return scan_on_host(self.connector, self.target, block_size).hashes()

    def fingerprint(self, data: bytes) -> bytes:
        return sha256_fingerprint(data)

    def ship(self, patch: Path, *, finish: bool) -> None:
        remote = f"{self.target}.{uuid.uuid4().hex[:12]}.patchdrill-patch"
        self.connector.put(patch, remote)
        args = ["-Mode", "Apply", "-Path", self.target, "-Patch", remote, "-BlockSize", str(self.block_map.block_size),
                "-Size", str(self.block_map.size)] + ([] if self.exists else ["-Fresh"]) + (["-Finish"] if finish else [])
        result = self.connector.run_script(WINDOWS_SCRIPT, args, timeout=_APPLY_TIMEOUT)
        if not result.ok:
            raise RestoreFailed(f"host {self.connector.name}: writing {self.target!r} failed: "
                                f"{result.tail(1) or f'exit {result.exit_code}'}")

    def discard(self) -> None:
        if not self.exists:
            self.connector.run_script(WINDOWS_SCRIPT, ["-Mode", "Discard", "-Path", self.target], timeout=60)


class _Patches:
    """Changed blocks gathered into patch files, each shipped to the host and applied when full."""

    def __init__(self, host: _ImageHost, scratch: Path) -> None:
        self.host = host
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
            self.ship(finish=False)

    def add_zeros(self, index: int, length: int) -> None:
        """Block index is to read as zeros (a hole of the point where the host's copy has data)."""
        if not self.host.zero_records:
            self.add(index, bytes(length))
            return
        self._file.write(struct.pack(">QI", index | blockscan.ZERO_RECORD, length))
        self.blocks += 1

    def ship(self, *, finish: bool) -> None:
        self._file.close()
        self.host.ship(self.scratch / "patch", finish=finish)
        self.pending = 0
        self._file = open(self.scratch / "patch", "wb")

    def close(self) -> None:
        self._file.close()


def _restore_image(repo: Repository, point: RecoveryPoint, connector: Connector, target: str,
                   exists: bool) -> RestoreResult:
    started = time.monotonic()
    block_map = BlockMap.from_json(repo.get_map(point.map.id, point=point.key), point=point.key)
    kind = _WindowsImage if connector.os_family == "windows" else _LinuxImage
    host: _ImageHost = kind(connector, target, exists, block_map)
    theirs: list[bytes] = host.scan(block_map.block_size) if exists else []
    known = block_map.fingerprints if block_map.fingerprint == host.fingerprint_name else None
    zero = repo.codec.chunk_id(bytes(block_map.block_size))
    host_zero = ZeroFingerprints(host.fingerprint)
    recurring = {c for c, n in Counter(block_map.chunks).items() if n > 1}
    cache: dict[bytes, bytes] = {}
    scratch = Path(tempfile.mkdtemp(prefix="patchdrill-restore-"))
    patches = _Patches(host, scratch)
    try:
        for index, chunk_id in enumerate(block_map.chunks):
            cancel.check()
            if not exists and chunk_id in (zero, HOLE):
                continue  # a fresh file reads as zeros there already
            if exists and known is not None and index < len(theirs) and theirs[index] == known[index]:
                continue  # the host already holds this block: nothing to fetch or send
            if chunk_id == HOLE:
                length = block_map.block_length(index)
                if index >= len(theirs) or theirs[index] != host_zero(length):
                    patches.add_zeros(index, length)
                continue
            data = cache.get(chunk_id) or repo.get_chunk(chunk_id, point=point.key)
            if chunk_id in recurring and len(cache) < 16:
                cache[chunk_id] = data
            if exists and known is None and index < len(theirs) and theirs[index] == host.fingerprint(data):
                continue
            patches.add(index, data)
        patches.ship(finish=True)
    except BaseException:
        host.discard()
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
