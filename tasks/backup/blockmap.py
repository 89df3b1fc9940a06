"""Block maps: the ordered content of a point (docs/repository.md, *Block maps*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.backup.errors import RepositoryError
from tasks.backup.repository import ID_SIZE

CHUNK_ID_FINGERPRINT = "chunk-id"


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

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def fingerprint_of(self, index: int) -> bytes:
        return (self.fingerprints or self.chunks)[index]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": "block", "size": self.size, "block_size": self.block_size,
                                "chunks": _join(self.chunks), "fingerprint": self.fingerprint}
        if self.fingerprints is not None:
            body["fingerprints"] = _join(self.fingerprints)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any], *, point: str) -> "BlockMap":
        if body.get("kind") != "block":
            raise RepositoryError(f"point {point}: its map is not a block map")
        fps = body.get("fingerprints")
        made = cls(size=int(body["size"]), block_size=int(body["block_size"]), chunks=_split(body["chunks"]),
                   fingerprint=body.get("fingerprint", CHUNK_ID_FINGERPRINT),
                   fingerprints=_split(fps) if fps is not None else None)
        expected = -(-made.size // made.block_size) if made.size else 0
        if len(made.chunks) != expected:
            raise RepositoryError(f"point {point}: map lists {len(made.chunks)} chunks for {expected} blocks")
        return made


EntryType = Literal["file", "dir", "symlink"]


@dataclass
class TreeEntry:
    path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)
    target: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode, "uid": self.uid,
                                "gid": self.gid, "mtime_ns": self.mtime_ns}
        if self.type == "file":
            body["size"] = self.size
            body["chunks"] = [c.hex() for c in self.chunks]
        if self.type == "symlink":
            body["target"] = self.target
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "TreeEntry":
        return cls(path=body["path"], type=body["type"], mode=int(body["mode"]), uid=int(body["uid"]),
                   gid=int(body["gid"]), mtime_ns=int(body["mtime_ns"]), size=int(body.get("size", 0)),
                   chunks=[bytes.fromhex(c) for c in body.get("chunks", [])], target=body.get("target"))


@dataclass
class TreeMap:
    """A directory point: its entries in path order, parents before children."""

    block_size: int
    entries: list[TreeEntry]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "directory", "block_size": self.block_size, "entries": [e.to_json() for e in self.entries]}

    @classmethod
    def from_json(cls, body: dict[str, Any], *, point: str) -> "TreeMap":
        if body.get("kind") != "directory":
            raise RepositoryError(f"point {point}: its map is not a directory map")
        return cls(block_size=int(body["block_size"]), entries=[TreeEntry.from_json(e) for e in body["entries"]])

    def by_path(self) -> dict[str, TreeEntry]:
        return {e.path: e for e in self.entries}

    def chunk_ids(self) -> set[bytes]:
        return {c for e in self.entries for c in e.chunks}
