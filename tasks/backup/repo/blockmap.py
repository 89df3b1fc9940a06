"""Block maps: the ordered content of a point (docs/repository.md, *Block maps*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.backup.errors import RepositoryError
from tasks.backup.repo.ids import ID_SIZE

CHUNK_ID_FINGERPRINT = "chunk-id"
#: The id a block map gives a block that reads as zeros (a hole, or all-zero data): no chunk is
#: stored for it. No BLAKE3 output is 32 zero bytes in practice, so it names no real chunk.
HOLE = bytes(ID_SIZE)
#: block maps before version 2 hold the zero block's real chunk id where version 2 has HOLE;
#: both restore the same bytes
BLOCK_MAP_VERSION = 2


def _join(ids: list[bytes]) -> str:
    return b"".join(ids).hex()


def _split(hex_ids: str) -> list[bytes]:
    raw = bytes.fromhex(hex_ids)
    return [raw[i:i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]


@dataclass
class BlockMap:
    """A block-level point: chunk i holds bytes [i*block_size, (i+1)*block_size) of the disk."""

    size: int
    block_size: int
    chunks: list[bytes]
    fingerprint: str = CHUNK_ID_FINGERPRINT
    fingerprints: list[bytes] | None = None
    version: int = BLOCK_MAP_VERSION

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def stored_chunks(self) -> set[bytes]:
        """The ids of the chunks this map needs from the store (holes need none)."""
        return set(self.chunks) - {HOLE}

    def used_bytes(self) -> int:
        """The bytes of the disk in blocks that hold data: its size less its holes and zero blocks."""
        return self.size - sum(self.block_length(i) for i, chunk_id in enumerate(self.chunks) if chunk_id == HOLE)

    def fingerprint_of(self, index: int) -> bytes:
        return (self.fingerprints or self.chunks)[index]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "block", "version": self.version, "size": self.size,
                                "block_size": self.block_size, "chunks": _join(self.chunks),
                                "fingerprint": self.fingerprint}
        if self.fingerprints is not None:
            body["fingerprints"] = _join(self.fingerprints)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any], *, point: str) -> "BlockMap":
        if body.get("kind") != "block":
            raise RepositoryError(f"point {point}: its map is not a block map")
        version = int(body.get("version", 1))
        if version > BLOCK_MAP_VERSION:
            raise RepositoryError(f"point {point}: block map version {version} is newer than this patchdrill reads "
                                  f"({BLOCK_MAP_VERSION}); upgrade patchdrill to restore it")
        fps = body.get("fingerprints")
        made = cls(size=int(body["size"]), block_size=int(body["block_size"]), chunks=_split(body["chunks"]),
                   fingerprint=body.get("fingerprint", CHUNK_ID_FINGERPRINT),
                   fingerprints=_split(fps) if fps is not None else None, version=version)
        expected = -(-made.size // made.block_size) if made.size else 0
        if len(made.chunks) != expected:
            raise RepositoryError(f"point {point}: map lists {len(made.chunks)} chunks for {expected} blocks")
        return made


EntryType = Literal["file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev"]
#: directory maps before version 2 have no root entry, ctime, inode, xattrs, hard links or
#: special files; they are read as they are and restored as before
TREE_VERSION = 2


@dataclass
class TreeEntry:
    """One entry of a directory point; the JSON shape is the host scanner's (blockscan.describe)."""

    path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)
    #: a symlink's target, or the path of the first link of a hard-linked file
    target: str | None = None
    ctime_ns: int | None = None
    inode: int | None = None
    #: name -> hex value; None: not recorded (a version 1 map), {} recorded and none there
    xattrs: dict[str, str] | None = None
    rdev: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode, "uid": self.uid,
                                "gid": self.gid, "mtime_ns": self.mtime_ns}
        if self.type == "file":
            body["size"] = self.size
            body["chunks"] = [c.hex() for c in self.chunks]
        for name in ("target", "ctime_ns", "inode", "xattrs", "rdev"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "TreeEntry":
        def optional_int(name: str) -> int | None:
            return int(body[name]) if body.get(name) is not None else None

        return cls(path=body["path"], type=body["type"], mode=int(body["mode"]), uid=int(body["uid"]),
                   gid=int(body["gid"]), mtime_ns=int(body["mtime_ns"]), size=int(body.get("size", 0)),
                   chunks=[bytes.fromhex(c) for c in body.get("chunks", [])], target=body.get("target"),
                   ctime_ns=optional_int("ctime_ns"), inode=optional_int("inode"), xattrs=body.get("xattrs"),
                   rdev=optional_int("rdev"))


@dataclass
class TreeMap:
    """A directory point: its entries in path order, parents before children, and (version 2)
    the metadata of the disk's top directory and what the scan could not keep."""

    block_size: int
    entries: list[TreeEntry]
    root: TreeEntry | None = None
    #: "path: why" for each entry (or part of one, like an unreadable xattr) the scan skipped
    skipped: list[str] = field(default_factory=list)
    version: int = TREE_VERSION

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "directory", "version": self.version, "block_size": self.block_size,
                                "entries": [e.to_json() for e in self.entries]}
        if self.root is not None:
            body["root"] = self.root.to_json()
        if self.skipped:
            body["skipped"] = self.skipped
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any], *, point: str) -> "TreeMap":
        if body.get("kind") != "directory":
            raise RepositoryError(f"point {point}: its map is not a directory map")
        version = int(body.get("version", 1))
        if version > TREE_VERSION:
            raise RepositoryError(f"point {point}: directory map version {version} is newer than this patchdrill "
                                  f"reads ({TREE_VERSION}); upgrade patchdrill to restore it")
        root = body.get("root")
        return cls(block_size=int(body["block_size"]), entries=[TreeEntry.from_json(e) for e in body["entries"]],
                   root=TreeEntry.from_json(root) if root else None, skipped=list(body.get("skipped", [])),
                   version=version)

    def by_path(self) -> dict[str, TreeEntry]:
        return {e.path: e for e in self.entries}

    def chunk_ids(self) -> set[bytes]:
        return {c for e in self.entries for c in e.chunks}
