"""Property tests of the block map and the tree map (serialised, stored as JSON, parsed back:
equal to what was written) and of `changed_blocks` (a block is re-read exactly when its
host-side fingerprint is new or differs from the parent point's)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.backup.repo.blockmap import CHUNK_ID_FINGERPRINT, TREE_VERSION, BlockMap, TreeEntry, TreeMap
from tasks.backup.errors import RepositoryError
from tasks.backup.repo.ids import ID_SIZE
from tasks.backup.sources.remote import changed_blocks

QUICK = settings(max_examples=60, deadline=None)
HOST_SIDE = ("blake2b-256", "sha256")

ids = st.binary(min_size=ID_SIZE, max_size=ID_SIZE)
block_sizes = st.integers(min_value=1, max_value=1 << 16)
# File names as a scanner reports them: any text, including lone surrogates (undecodable bytes).
names = st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=12)
ns = st.integers(min_value=0, max_value=(1 << 63) - 1)


@st.composite
def block_maps(draw: st.DrawFn) -> BlockMap:
    block_size = draw(block_sizes)
    blocks = draw(st.integers(min_value=0, max_value=40))
    # Any size whose block count is `blocks`: the last block may be short.
    size = 0 if blocks == 0 else draw(st.integers((blocks - 1) * block_size + 1, blocks * block_size))
    fingerprint = draw(st.sampled_from((CHUNK_ID_FINGERPRINT, *HOST_SIDE)))
    fingerprints = None if fingerprint == CHUNK_ID_FINGERPRINT else draw(st.lists(ids, min_size=blocks, max_size=blocks))
    return BlockMap(size=size, block_size=block_size, chunks=draw(st.lists(ids, min_size=blocks, max_size=blocks)),
                    fingerprint=fingerprint, fingerprints=fingerprints)


def _stored(body: dict) -> dict:  # type: ignore[type-arg]
    """Through JSON text and back, as the repository stores a map."""
    return json.loads(json.dumps(body, separators=(",", ":")).encode())


@QUICK
@given(block_maps())
def test_a_block_map_reads_back_as_written(block_map: BlockMap) -> None:
    assert BlockMap.from_json(_stored(block_map.to_json()), point="p") == block_map


@QUICK
@given(block_maps(), st.integers(min_value=-3, max_value=3).filter(bool))
def test_a_block_map_with_chunks_missing_or_extra_is_refused(block_map: BlockMap, delta: int) -> None:
    count = len(block_map.chunks) + delta
    if count < 0:
        return
    wrong = (block_map.chunks + [bytes(ID_SIZE)] * delta)[:count]
    with pytest.raises(RepositoryError, match=f"map lists {count} chunks for {len(block_map.chunks)} blocks"):
        BlockMap.from_json({**block_map.to_json(), "chunks": b"".join(wrong).hex()}, point="p")


@st.composite
def tree_entries(draw: st.DrawFn, path: str | None = None) -> TreeEntry:
    kind = draw(st.sampled_from(("file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev")))
    is_file = kind == "file"
    optional = st.none() | ns
    return TreeEntry(
        path=path if path is not None else "/".join(draw(st.lists(names, min_size=1, max_size=3))),
        type=kind, mode=draw(st.integers(0, 0o7777)), uid=draw(st.integers(0, 1 << 32)), gid=draw(st.integers(0, 1 << 32)),
        mtime_ns=draw(ns),
        # Only a file has a size and chunks: the map keeps none for other entries.
        size=draw(st.integers(0, 1 << 40)) if is_file else 0,
        chunks=draw(st.lists(ids, max_size=4)) if is_file else [],
        target=draw(st.none() | names) if kind in ("symlink", "hardlink") else None,
        ctime_ns=draw(optional), inode=draw(optional),
        xattrs=draw(st.none() | st.dictionaries(names, st.binary(max_size=8).map(bytes.hex), max_size=3)),
        rdev=draw(st.none() | st.integers(0, 1 << 32)) if kind in ("chardev", "blockdev") else None,
    )


@st.composite
def tree_maps(draw: st.DrawFn) -> TreeMap:
    version = draw(st.integers(min_value=1, max_value=TREE_VERSION))
    return TreeMap(block_size=draw(block_sizes), entries=draw(st.lists(tree_entries(), max_size=8)),
                   root=draw(st.none() | tree_entries(path="")) if version >= 2 else None,
                   skipped=draw(st.lists(names.map(lambda n: f"{n}: unreadable"), max_size=3)), version=version)


@QUICK
@given(tree_maps())
def test_a_tree_map_reads_back_as_written(tree_map: TreeMap) -> None:
    assert TreeMap.from_json(_stored(tree_map.to_json()), point="p") == tree_map


@st.composite
def scans(draw: st.DrawFn) -> tuple[list[bytes], BlockMap | None, str, int]:
    """A new scan's fingerprints beside a parent point made mostly of the same blocks: some
    kept, some changed, the disk grown or shrunk; the parent sometimes not comparable."""
    algorithm = draw(st.sampled_from(HOST_SIDE))
    block_size = draw(st.sampled_from((4096, 65536)))
    old = draw(st.lists(ids, max_size=30))
    new = [draw(st.sampled_from((fp, fp, bytes(ID_SIZE)))) if draw(st.booleans()) else fp for fp in old]
    new = new[:draw(st.integers(0, len(new)))] if draw(st.booleans()) else new + draw(st.lists(ids, max_size=5))
    if draw(st.integers(0, 9)) == 0:
        return new, None, algorithm, block_size
    parent = BlockMap(size=len(old) * block_size,
                      block_size=draw(st.sampled_from((block_size, block_size, block_size * 2))),
                      chunks=draw(st.lists(ids, min_size=len(old), max_size=len(old))),
                      fingerprint=draw(st.sampled_from((algorithm, algorithm, algorithm, CHUNK_ID_FINGERPRINT,
                                                        *HOST_SIDE))),
                      fingerprints=old)
    return new, parent, algorithm, block_size


@settings(max_examples=150, deadline=None)
@given(scans())
def test_changed_blocks_are_exactly_the_new_and_the_different(scan: tuple[list[bytes], BlockMap | None, str, int]) -> None:
    fingerprints, parent, algorithm, block_size = scan
    changed = changed_blocks(fingerprints, parent, algorithm, block_size)
    assert changed == sorted(set(changed)) and all(0 <= i < len(fingerprints) for i in changed)
    comparable = parent is not None and parent.fingerprint == algorithm and parent.block_size == block_size
    if not comparable:
        # Another hash or block size says nothing about these blocks: every one is read.
        assert changed == list(range(len(fingerprints)))
        return
    assert parent is not None and parent.fingerprints is not None
    previous = parent.fingerprints
    for index, fingerprint in enumerate(fingerprints):
        same = index < len(previous) and previous[index] == fingerprint
        # Never skip a changed block (a restore would bring back stale data); never re-read an unchanged one.
        assert (index in changed) is not same, (index, same)
