"""The backup repository inside a BlobStore, as specified in docs/repository.md.

This module owns every key name and encoding: config.json, chunks, maps, points, locks, damage
records and the staging area.
The engines (backup, restore, verify, prune) go through it and never build a key themselves.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

import blake3
import structlog
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from configs.secrets import redact, resolve
from connectors.stores import BlobExists, BlobInfo, BlobNotFound, BlobStore, StoreError
from tasks.backup import cancel
from tasks.backup.repo import keys, locks
from tasks.backup.errors import (
    ChunkCorrupt, ChunkMissing, KeyRequired, PointNotFound, PointTampered, RepositoryBusy, RepositoryError,
)

FORMAT = "patchdrill-repository"
#: Version 2 seals the private fields of points in encrypted repositories and authenticates the
#: rest; version 1 repositories stay readable (their points are unauthenticated; see the docs).
VERSION = 2
READABLE_VERSIONS = (1, 2)
log = structlog.stdlib.get_logger("patchdrill.backup")

CONFIG_KEY = "config.json"
#: Where a Windows host stages raw blocks for the controller (docs/repository.md, *Windows hosts*).
STAGING_PREFIX = "staging/"
LOCK_REFRESH = timedelta(minutes=5)
LOCK_STALE = timedelta(minutes=30)
DAMAGE_PREFIX = "damaged/"
INDEX_PREFIX = "index/"
#: The first bytes of an index file's plaintext; the 32-byte chunk ids follow, concatenated.
INDEX_MAGIC = b"patchdrill-index 1\n"
Consistency = Literal["application-consistent", "file-system-consistent", "crash-consistent"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def point_stamp(moment: datetime) -> str:
    """A point's time as a key segment that sorts chronologically."""
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def parse_stamp(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)


class Totals(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 0
    #: bytes of the disk that hold data: its size less its holes and zero blocks (None in
    #: points from before holes were recorded)
    used: int | None = None
    scanned: int = 0
    changed_blocks: int = 0
    changed_bytes: int = 0
    uploaded_chunks: int = 0
    uploaded_bytes: int = 0
    stored_bytes: int = 0
    skipped: int = 0
    #: chunks a backup wrote again because verify had found them corrupt or they were missing
    repaired_chunks: int = 0


class MapRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    blocks: int
    files: int | None = None


class KeptClone(BaseModel):
    """The reflink clone a point was read from, kept on its host (docs/repository.md, *Kept
    clones*): what tells the next backup and a restore that it is still the clone the point
    read, untouched (a write, truncation or replacement moves its ctime or inode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    device: int
    inode: int
    ctime_ns: int
    size: int
    #: the file system it lives on, as the host named it (type and mount point)
    file_system: str


class RecoveryPoint(BaseModel):
    """The manifest of one backup of one disk; see docs/repository.md, *Recovery points*."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["patchdrill-point"] = "patchdrill-point"
    version: Literal[1, 2] = 2
    host: str
    disk: str
    #: the moment the data is from: when the snapshot was taken (or, without one, when reading began)
    time: datetime
    #: when the point was written (None in version 1 points)
    completed: datetime | None = None
    #: the patchdrill version and the backup policy that made the point
    tool: str | None = None
    policy: str | None = None
    kind: Literal["block", "directory"]
    #: sealed in an encrypted repository: None when its points were read without the key
    source_path: str | None
    consistency: Consistency
    snapshot_method: str = "none"
    notes: list[str] = Field(default_factory=list)
    block_size: int
    map: MapRef
    parent: str | None = None
    totals: Totals = Field(default_factory=Totals)
    seconds: float = 0.0
    #: sealed in an encrypted repository (it names a path on the host)
    kept_clone: KeptClone | None = None

    @property
    def key(self) -> str:
        return point_key(self.host, self.disk, self.time)


#: What an encrypted repository seals inside a point (they name paths on the host).
SEALED_FIELDS = ("source_path", "notes", "kept_clone")
_POINT_AAD = b"patchdrill point v2\n"


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("patchdrill")
    except PackageNotFoundError:
        return "unknown"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class HeldLock:
    key: str
    #: stale locks of others that taking this one removed (prune only), with why each was stale
    removed_stale: list[str] = field(default_factory=list)


def point_key(host: str, disk: str, moment: datetime) -> str:
    return f"points/{host}/{disk}/{point_stamp(moment)}.json"


def newest_point_time(store: BlobStore, host: str, disk: str) -> datetime | None:
    """The time of a disk's newest point, from the keys alone: no point is read and no key
    material is needed, so it works on an encrypted repository at the cost of one listing."""
    stamps = [info.key.rsplit("/", 1)[1].removesuffix(".json")
              for info in store.list(f"points/{host}/{disk}/") if info.key.endswith(".json")]
    return parse_stamp(max(stamps)) if stamps else None


class ChunkCodec:
    """Hashing and the blob encoding of chunks and maps (zstd, optionally AES-256-GCM)."""

    def __init__(self, level: int, master: keys.MasterKey | None) -> None:
        self.level = level
        self.master = master
        self._aead = AESGCM(master.data_key) if master else None
        # zstd contexts are not thread-safe; the engines call from a pool.
        self._local = threading.local()

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        if self.master is None:
            return blake3.blake3(data).digest()
        return blake3.blake3(data, key=self.master.id_key).digest()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "c", None)
        if comp is None:
            comp = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "d", None)
        if dec is None:
            dec = self._local.d = zstandard.ZstdDecompressor()
        return dec

    def encode(self, chunk_id: bytes, data: bytes | bytearray | memoryview) -> bytes:
        packed = self._compressor().compress(data)
        if self._aead is None:
            return packed
        nonce = os.urandom(keys.NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, packed, chunk_id)

    def decode(self, chunk_id: bytes, blob: bytes, *, point: str | None) -> bytes:
        """The plaintext of a chunk, or ChunkCorrupt if it is not exactly what its id says."""
        hex_id = chunk_id.hex()
        if self._aead is not None:
            try:
                blob = self._aead.decrypt(blob[:keys.NONCE_SIZE], blob[keys.NONCE_SIZE:], chunk_id)
            except (InvalidTag, ValueError):
                raise ChunkCorrupt(hex_id, point, "fails authentication (altered, truncated or from another repository)") from None
        try:
            data = self._decompressor().decompress(blob)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(hex_id, point, f"does not decompress ({exc})") from None
        if self.chunk_id(data) != chunk_id:
            raise ChunkCorrupt(hex_id, point, "content does not hash to its id")
        return data


def chunk_key(chunk_id: bytes | str, prefix: str = "chunks") -> str:
    hex_id = chunk_id if isinstance(chunk_id, str) else chunk_id.hex()
    return f"{prefix}/{hex_id[:2]}/{hex_id}"


def content_id(key: str) -> str:
    """The hex id a chunk or map key names (the inverse of chunk_key)."""
    return key.rsplit("/", 1)[1]


def staging_prefix(host: str, disk: str, run: str) -> str:
    """Where one staged upload of host/disk puts its blocks (no trailing slash)."""
    return f"{STAGING_PREFIX}{host}/{disk}/{run}"


def staged_block_key(prefix: str, index: int) -> str:
    """The blob a host uploads block `index` of a staged upload to."""
    return f"{prefix}/{index}"


class Repository:
    """An opened repository: its config, its codec, and typed access to its files."""

    def __init__(self, store: BlobStore, config: dict[str, Any], master: keys.MasterKey | None) -> None:
        self.store = store
        self.config = config
        self.codec = ChunkCodec(int(config["compression"]["level"]), master)

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def encrypted(self) -> bool:
        return bool(self.config.get("encryption"))

    def _need_key(self) -> None:
        if self.encrypted and self.codec.master is None:
            raise KeyRequired(f"{self.name}: the repository is encrypted and was opened without its key")

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, store: BlobStore, *, key_reference: str | None = None, base_dir: Path | None = None,
             create: bool = False, compression_level: int = 3, metadata_only: bool = False) -> "Repository":
        """Open the repository in store; with create=True make it first if the store has none.

        key_reference is a credential reference (env:, file:, prefect-secret:); the passphrase
        it resolves to is registered for redaction by configs.secrets.resolve. metadata_only
        opens an encrypted repository without its key, for listing points (plaintext) only.
        """
        passphrase = resolve(key_reference, base_dir=base_dir) if key_reference else None
        try:
            config = cls._read_config(store)
        except BlobNotFound:
            if not create:
                raise RepositoryError(f"{store.name}: no repository here (no {CONFIG_KEY}); run a backup to create one") from None
            if passphrase is not None and key_reference is not None:
                keys.check_passphrase(passphrase, reference=key_reference)
            created = cls._create(store, passphrase, compression_level)
            # None: another process created it first, and its config is the one that counts.
            config = created if created is not None else cls._read_config(store)
        encryption = config.get("encryption")
        master = None
        if encryption and metadata_only and passphrase is None:
            return cls(store, config, None)
        if encryption:
            if passphrase is None or key_reference is None:
                raise KeyRequired(f"{store.name}: the repository is encrypted; give the policy's encryption_key reference")
            master = keys.unwrap(encryption, passphrase, reference=key_reference, repository=store.name)
        elif passphrase is not None:
            raise KeyRequired(f"{store.name}: the repository is not encrypted, but a key ({key_reference}) was given; "
                              "use a new store for an encrypted repository")
        return cls(store, config, master)

    @staticmethod
    def _read_config(store: BlobStore) -> dict[str, Any]:
        raw = store.get(CONFIG_KEY)
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise RepositoryError(f"{store.name}: {CONFIG_KEY} is not JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise RepositoryError(f"{store.name}: {CONFIG_KEY} is not a patchdrill repository config")
        if config.get("version") not in READABLE_VERSIONS:
            raise RepositoryError(f"{store.name}: repository format version {config.get('version')!r} is not supported "
                                  f"(this patchdrill reads {', '.join(map(str, READABLE_VERSIONS))})")
        return config

    @staticmethod
    def _create(store: BlobStore, passphrase: str | None, level: int) -> dict[str, Any] | None:
        encryption = None
        if passphrase is not None:
            master = keys.MasterKey.generate()
            encryption = {"algorithm": "AES-256-GCM", "kdf": keys.kdf_parameters(), "keys": [keys.wrap(master, passphrase)]}
        config = {
            "format": FORMAT, "version": VERSION, "id": uuid.uuid4().hex, "created": utcnow().isoformat(),
            "hash": "blake3", "compression": {"algorithm": "zstd", "level": level}, "encryption": encryption,
        }
        try:
            store.put(CONFIG_KEY, json.dumps(config, indent=2).encode(), overwrite=False)
        except BlobExists:
            return None
        return config

    # -- chunks and maps ---------------------------------------------------------------------

    def chunk_ids(self) -> set[bytes]:
        """Every chunk id in the store (one listing; cheaper than an exists() per block)."""
        return {chunk_id for chunk_id, _ in self.chunk_blobs()}

    def chunk_blobs(self, *, uncommitted: bool = False) -> Iterator[tuple[bytes, BlobInfo]]:
        """Every chunk blob with its id; `uncommitted` adds uploads that never completed."""
        for info in self.store.list("chunks/", uncommitted=uncommitted):
            yield bytes.fromhex(content_id(info.key)), info

    def has_chunks(self) -> bool:
        """Whether the store holds any chunk (one listing call, however many there are)."""
        return next(iter(self.store.list("chunks/")), None) is not None

    def has_chunk(self, chunk_id: bytes) -> bool:
        return self.store.exists(chunk_key(chunk_id))

    # -- the index of stored chunks (docs/repository.md, *Index*) ------------------------------

    def index_keys(self) -> list[str]:
        return sorted(info.key for info in self.store.list(INDEX_PREFIX))

    def write_index(self, ids: set[bytes]) -> str | None:
        """Store an index file naming ids; returns its key (None for no ids).

        The file is content-addressed and encoded like a chunk: a put is atomic on both stores,
        and a torn or altered file fails its hash on reading, so it is never taken as valid.
        """
        if not ids:
            return None
        self._need_key()
        data = INDEX_MAGIC + b"".join(sorted(ids))
        index_id = self.codec.chunk_id(data)
        key = INDEX_PREFIX + index_id.hex()
        try:
            self.store.put(key, self.codec.encode(index_id, data), overwrite=False)
        except BlobExists:
            pass  # the same content, written before
        return key

    def read_index(self, key: str) -> bytes:
        """The sorted 32-byte chunk ids an index file names, concatenated; ChunkCorrupt if the file
        is not intact, BlobNotFound if it is gone."""
        self._need_key()
        data = self.codec.decode(bytes.fromhex(content_id(key)), self.store.get(key), point=None)
        if not data.startswith(INDEX_MAGIC) or (len(data) - len(INDEX_MAGIC)) % 32:
            raise ChunkCorrupt(content_id(key), None, "is not an index file")
        return data[len(INDEX_MAGIC):]

    def delete_index(self, key: str) -> None:
        try:
            self.store.delete(key)
        except BlobNotFound:
            pass

    def map_blobs(self) -> Iterator[tuple[str, BlobInfo]]:
        """Every block-map blob with its (hex) id."""
        for info in self.store.list("maps/"):
            yield content_id(info.key), info

    def put_chunk(self, chunk_id: bytes, data: bytes | bytearray | memoryview, *, replace: bool = False) -> int:
        """Store a chunk; returns the bytes written (0 if a concurrent writer stored it first).

        replace=True overwrites a chunk known to be damaged. Both stores replace a blob
        atomically (a rename; a single Put Blob), so a reader sees the old or the new blob,
        never a torn one; the new blob is read back and checked before this returns.
        """
        self._need_key()
        blob = self.codec.encode(chunk_id, data)
        if replace:
            self.store.put(chunk_key(chunk_id), blob, overwrite=True)
            self.get_chunk(chunk_id)
            return len(blob)
        try:
            self.store.put(chunk_key(chunk_id), blob, overwrite=False)
        except BlobExists:
            return 0
        return len(blob)

    def get_chunk(self, chunk_id: bytes, *, point: str | None = None) -> bytes:
        self._need_key()
        try:
            blob = self.store.get(chunk_key(chunk_id))
        except BlobNotFound:
            raise ChunkMissing(chunk_id.hex(), point, f"missing from {self.name}") from None
        return self.codec.decode(chunk_id, blob, point=point)

    def put_map(self, content: dict[str, Any]) -> str:
        self._need_key()
        data = json.dumps(content, separators=(",", ":")).encode()
        map_id = self.codec.chunk_id(data)
        try:
            self.store.put(chunk_key(map_id, "maps"), self.codec.encode(map_id, data), overwrite=False)
        except BlobExists:
            pass
        return map_id.hex()

    def get_map(self, map_id: str, *, point: str | None = None) -> dict[str, Any]:
        self._need_key()
        raw_id = bytes.fromhex(map_id)
        try:
            blob = self.store.get(chunk_key(map_id, "maps"))
        except BlobNotFound:
            raise ChunkMissing(map_id, point, f"block map missing from {self.name}") from None
        return json.loads(self.codec.decode(raw_id, blob, point=point))

    # -- points ------------------------------------------------------------------------------

    def point_blob(self, point: RecoveryPoint) -> bytes:
        """A point as stored: in an encrypted repository its SEALED_FIELDS are encrypted, and the
        whole point (with its key) is the associated data, so no field can be altered unseen."""
        body = point.model_dump(mode="json")
        if self.encrypted:
            self._need_key()
            assert self.codec.master is not None
            private = {name: body.pop(name) for name in SEALED_FIELDS}
            nonce = os.urandom(keys.NONCE_SIZE)
            sealed = AESGCM(self.codec.master.data_key).encrypt(nonce, _canonical(private), self._point_aad(point.key, body))
            body["sealed"] = base64.b64encode(nonce + sealed).decode()
        return json.dumps(body, indent=2).encode()

    @staticmethod
    def _point_aad(key: str, public: dict[str, Any]) -> bytes:
        return _POINT_AAD + key.encode() + b"\n" + _canonical(public)

    def write_point(self, point: RecoveryPoint) -> str:
        self.store.put(point.key, self.point_blob(point), overwrite=False)
        return point.key

    def read_point(self, key: str) -> RecoveryPoint:
        try:
            raw = self.store.get(key)
        except BlobNotFound:
            raise PointNotFound(f"{self.name}: no recovery point {key!r}") from None
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise RepositoryError(f"{self.name}: recovery point {key!r} is malformed: {exc}") from None
        body = self._unseal(key, body)
        try:
            return RecoveryPoint.model_validate(body)
        except ValidationError as exc:
            raise RepositoryError(f"{self.name}: recovery point {key!r} is malformed: {exc.errors()[0]['msg']}") from None

    def _unseal(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        sealed = body.pop("sealed", None)
        if not self.encrypted:
            if sealed is not None:
                raise PointTampered(f"{self.name}: recovery point {key!r} is sealed, but the repository is not encrypted: refused")
            return body
        if sealed is None:
            # Only a version 1 repository may hold unsealed (unauthenticated) points.
            if self.config.get("version", 1) >= 2 or body.get("version", 1) >= 2:
                raise PointTampered(f"{self.name}: recovery point {key!r} is not sealed, but the repository is "
                                    "encrypted: refused (it was not written by this repository's key holder)")
            return body
        if self.codec.master is None:
            return body | {"source_path": None, "notes": []}  # metadata-only listing: private fields stay sealed
        try:
            blob = base64.b64decode(str(sealed), validate=True)
            private = json.loads(AESGCM(self.codec.master.data_key).decrypt(
                blob[:keys.NONCE_SIZE], blob[keys.NONCE_SIZE:], self._point_aad(key, body)))
        except (InvalidTag, ValueError):
            raise PointTampered(f"{self.name}: recovery point {key!r} fails authentication (altered, renamed or from "
                                "another repository): refused") from None
        return body | {name: private.get(name) for name in SEALED_FIELDS}

    def point_keys(self, host: str | None = None, disk: str | None = None) -> list[str]:
        """Point keys, oldest first (the time stamp sorts as a string)."""
        prefix = "points/" + (f"{host}/" if host else "") + (f"{disk}/" if host and disk else "")
        keys_ = [i.key for i in self.store.list(prefix) if i.key.endswith(".json")]
        if disk and not host:
            keys_ = [k for k in keys_ if k.split("/")[2] == disk]
        return sorted(keys_, key=lambda k: (k.rsplit("/", 1)[1], k))

    def points(self, host: str | None = None, disk: str | None = None) -> list[RecoveryPoint]:
        return [self.read_point(k) for k in self.point_keys(host, disk)]

    def latest_point(self, host: str, disk: str) -> RecoveryPoint | None:
        found = self.point_keys(host, disk)
        return self.read_point(found[-1]) if found else None

    def find_point(self, host: str, disk: str, when: str | None = None) -> RecoveryPoint:
        """The latest point, or the one whose stamp or key is `when` (a unique prefix of the stamp works;
        a prefix that several points share is refused with the candidates, never guessed)."""
        found = self.point_keys(host, disk)
        if when:
            exact = [k for k in found if k == when or k.rsplit("/", 1)[1].removesuffix(".json") == when]
            found = exact or [k for k in found if k.rsplit("/", 1)[1].startswith(when)]
            if len(found) > 1:
                stamps = ", ".join(k.rsplit("/", 1)[1].removesuffix(".json") for k in found)
                raise PointNotFound(f"{self.name}: {when!r} matches {len(found)} points of host {host!r} disk {disk!r}: "
                                    f"{stamps}; give more of the time stamp")
        if not found:
            at = f" at {when!r}" if when else ""
            raise PointNotFound(f"{self.name}: no recovery point for host {host!r} disk {disk!r}{at}")
        return self.read_point(found[-1])

    # -- locks -------------------------------------------------------------------------------

    @contextmanager
    def lock(self, kind: Literal["backup", "prune"], *, wait: timedelta = timedelta(0),
             poll_seconds: float = 2.0, stale: timedelta = LOCK_STALE,
             refresh: timedelta = LOCK_REFRESH) -> Iterator[HeldLock]:
        """Hold a lock of `kind` for the duration; docs/repository.md, *Locks*.

        Backups share with backups; prune excludes everything. Each side writes its lock before
        looking for the other's, so simultaneous starts cannot both proceed. Prune removes the
        stale locks it finds (their holders are dead or silent) and says so in the HeldLock.
        A stop request (Ctrl-C, SIGTERM, a Prefect cancellation) ends the wait at once with
        Interrupted: a backup queued behind a long prune must not hold a stopping run.
        """
        deadline = utcnow() + wait
        held = HeldLock("")
        while True:
            held.key, created = self._write_lock(kind)
            blocker = self._conflicting_lock(held, kind, stale)
            if blocker is None:
                break
            self._remove_lock(held.key)
            if utcnow() >= deadline:
                raise RepositoryBusy(f"{self.name}: repository busy: {blocker}")
            if cancel.wait(poll_seconds):
                cancel.check()
        stop = threading.Event()
        refresher = threading.Thread(target=self._refresh_lock, args=(held.key, kind, created, stop, refresh),
                                     name="patchdrill-lock-refresh", daemon=True)
        refresher.start()
        try:
            yield held
        finally:
            stop.set()
            refresher.join()
            self._remove_lock(held.key)

    def _write_lock(self, kind: str) -> tuple[str, datetime]:
        key = f"locks/{uuid.uuid4().hex}.json"
        now = utcnow()
        self.store.put(key, json.dumps(locks.lock_body(kind, now, now)).encode(), overwrite=False)
        return key, now

    def _refresh_lock(self, key: str, kind: str, created: datetime, stop: threading.Event, every: timedelta) -> None:
        while not stop.wait(every.total_seconds()):
            try:
                self.store.put(key, json.dumps(locks.lock_body(kind, created, utcnow())).encode(), overwrite=True)
            except StoreError as exc:
                # One missed refresh is harmless (the stale limit is six intervals); the next
                # attempt follows at the next interval.
                log.warning("lock.refresh_failed", lock=key, error=str(exc))

    def _remove_lock(self, key: str) -> None:
        try:
            self.store.delete(key)
        except BlobNotFound:
            pass

    def locks(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for info in self.store.list("locks/"):
            try:
                body = json.loads(self.store.get(info.key))
            except (BlobNotFound, ValueError):
                continue  # removed while listing, or torn by a crash: not a live lock
            if isinstance(body, dict):
                found.append((info.key, body))
        return found

    def lock_states(self, stale: timedelta = LOCK_STALE) -> list[locks.LockState]:
        """Every lock in the repository, judged: is its holder alive, and why we think so."""
        now = utcnow()
        return [locks.judge(key, body, now=now, stale_after=stale) for key, body in self.locks()]

    def remove_locks(self, *, include_live: bool = False, stale: timedelta = LOCK_STALE) -> list[locks.LockState]:
        """Remove stale locks (all locks with include_live); returns what was removed."""
        removed = [state for state in self.lock_states(stale) if state.stale or include_live]
        for state in removed:
            self._remove_lock(state.key)
            log.warning("lock.removed", lock=state.key, why=redact(state.why), live=not state.stale)
        return removed

    def _conflicting_lock(self, held: HeldLock, kind: str, stale: timedelta) -> str | None:
        for state in self.lock_states(stale):
            if state.key == held.key:
                continue
            if state.stale:
                if kind == "prune":
                    self._remove_lock(state.key)
                    held.removed_stale.append(redact(state.why))
                    log.warning("lock.stale_removed", lock=state.key, why=redact(state.why))
                continue
            if kind == "prune" or state.kind == "prune":
                return redact(state.why)
        return None

    # -- damage found by verify ----------------------------------------------------------------

    def record_damage(self, chunk_id: str, problem: str, points: list[str]) -> None:
        """Remember a chunk verify found corrupt or missing, so backups and repair rewrite it."""
        body = {"chunk": chunk_id, "problem": problem, "points": points, "found": utcnow().isoformat()}
        self.store.put(f"{DAMAGE_PREFIX}{chunk_id}.json", json.dumps(body).encode(), overwrite=True)

    def clear_damage(self, chunk_id: str) -> None:
        try:
            self.store.delete(f"{DAMAGE_PREFIX}{chunk_id}.json")
        except BlobNotFound:
            pass

    def damaged_chunks(self) -> dict[bytes, dict[str, Any]]:
        """Chunk id -> the damage record verify wrote for it."""
        found: dict[bytes, dict[str, Any]] = {}
        for info in self.store.list(DAMAGE_PREFIX):
            hex_id = info.key.rsplit("/", 1)[1].removesuffix(".json")
            try:
                found[bytes.fromhex(hex_id)] = json.loads(self.store.get(info.key))
            except (BlobNotFound, ValueError):
                continue  # cleared meanwhile, or not a record of ours
        return found
