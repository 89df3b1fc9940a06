"""The size of the repository's content ids (chunk and block-map names, block hashes).

A module of its own so the block map, which packs ids, can be imported without the
repository and its storage SDK, compressor, hasher and cipher.
"""

from __future__ import annotations

#: Bytes of a content id: a BLAKE3-256 digest (docs/repository.md).
ID_SIZE = 32
