"""Property tests of the store's key rules: the keys accepted are exactly the safe ones, an
accepted key always names a place inside the store, and a listing by any accepted prefix finds
exactly the keys that start with it (on a real local store)."""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.stores import InvalidKey, LocalBlobStore, validate_key, validate_prefix
from connectors.stores.base import TEMP_PREFIX, key_problem

QUICK = settings(max_examples=200, deadline=None)

# Keys built from the pieces that make a key unsafe, and ordinary ones.
pieces = st.sampled_from(["a", "b0", "x.json", ".", "..", "...", ".hidden", "", "\\", "\x00", "C:", " ", "é",
                          TEMP_PREFIX + "1", "a" + TEMP_PREFIX])
keys = st.lists(pieces, min_size=0, max_size=5).map("/".join) | st.lists(pieces, max_size=4).map("".join) | st.text(max_size=12)


def is_safe(key: str) -> bool:
    """The rule stated independently of key_problem: a non-empty relative POSIX path that is
    already in normal form (no empty or '.' segments), never climbs ('..'), carries no
    backslash or NUL, and names no temporary file."""
    if not key or "\\" in key or "\x00" in key:
        return False
    path = PurePosixPath(key)
    if path.is_absolute() or str(path) != key or "." in key.split("/"):
        return False
    return ".." not in path.parts and not any(part.startswith(TEMP_PREFIX) for part in path.parts)


@QUICK
@given(keys)
def test_accepted_keys_are_exactly_the_safe_ones(key: str) -> None:
    assert (key_problem(key) is None) == is_safe(key), key
    if is_safe(key):
        assert validate_key(key) == key
    else:
        with pytest.raises(InvalidKey, match="invalid key"):
            validate_key(key)


@QUICK
@given(keys)
def test_an_accepted_key_stays_inside_the_store(key: str) -> None:
    if key_problem(key) is not None:
        return
    root = "/srv/store"
    joined = posixpath.normpath(posixpath.join(root, key))
    assert joined.startswith(root + "/") and joined != root
    # Nothing normalises away: the key is the path the store writes.
    assert joined == f"{root}/{key}"


@QUICK
@given(keys)
def test_an_accepted_prefix_cannot_climb_out(prefix: str) -> None:
    try:
        validate_prefix(prefix)
    except InvalidKey:
        return
    root = "/srv/store"
    assert posixpath.normpath(posixpath.join(root, prefix or ".")).startswith(root)


# Leaf keys of a small tree: no key is another's directory, as in a real repository.
leaf_names = st.sampled_from(["a", "ab", "b", "c.json", "a.b"])
tree_keys = st.lists(st.lists(leaf_names, min_size=1, max_size=3).map("/".join), max_size=10, unique=True).filter(
    lambda ks: not any(other.startswith(k + "/") for k in ks for other in ks))
prefixes = st.lists(st.sampled_from(["a", "ab", "b", "a/", "a/a", "c", "a.", ""]), max_size=3).map("".join)


@settings(max_examples=60, deadline=None)
@given(tree_keys, prefixes)
def test_listing_by_prefix_finds_exactly_the_keys_that_start_with_it(keys_written: list[str], prefix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalBlobStore(Path(tmp))
        for key in keys_written:
            store.put(key, key.encode())
        listed = sorted(info.key for info in store.list(prefix))
    assert listed == sorted(k for k in keys_written if k.startswith(prefix)), prefix
