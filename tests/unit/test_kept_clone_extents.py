"""How two extent maps decide which blocks changed (host_scripts/kept_clones.changed_blocks).

Extent maps are written out by hand here, as FIEMAP reports them: (logical, physical, length,
flags). The real file systems are in tests/integration/test_changed_block_tracking.py.
"""

from __future__ import annotations

from tasks.backup.host_scripts.kept_clones import EXTENT_UNWRITTEN, changed_blocks, ranges

K = 4096
BLOCK = 4 * K
DELALLOC, ENCODED = 0x4, 0x8


def test_identical_maps_change_nothing_and_holes_in_both_match() -> None:
    old = [(0, 1000 * K, 4 * K, 0), (8 * K, 2000 * K, 8 * K, 0)]  # a hole at 4K-8K
    assert changed_blocks(old, 16 * K, list(old), 16 * K, BLOCK) == []


def test_a_moved_range_changes_only_the_blocks_it_touches() -> None:
    old = [(0, 1000 * K, 16 * K, 0)]
    new = [(0, 1000 * K, 5 * K, 0), (5 * K, 7000 * K, K, 0), (6 * K, 1006 * K, 10 * K, 0)]
    assert changed_blocks(old, 16 * K, new, 16 * K, BLOCK) == [1]


def test_a_hole_against_data_and_data_against_a_hole_are_changes() -> None:
    old = [(0, 1000 * K, 8 * K, 0)]
    new = [(4 * K, 1004 * K, 4 * K, 0), (8 * K, 3000 * K, 4 * K, 0)]
    # 0-4K now a hole, 4-8K still the same blocks, 8-12K data where there was a hole.
    assert changed_blocks(old, 12 * K, new, 12 * K, 4 * K) == [0, 2]


def test_untrusted_extents_and_unwritten_state_count_as_changed() -> None:
    old = [(0, 1000 * K, 4 * K, 0), (4 * K, 1004 * K, 4 * K, ENCODED), (8 * K, 1008 * K, 4 * K, 0)]
    new = [(0, 1000 * K, 4 * K, DELALLOC), (4 * K, 1004 * K, 4 * K, ENCODED),
           (8 * K, 1008 * K, 4 * K, EXTENT_UNWRITTEN)]
    assert changed_blocks(old, 12 * K, new, 12 * K, 4 * K) == [0, 1, 2]


def test_size_changes_make_the_old_last_block_and_everything_past_it_new() -> None:
    old = [(0, 1000 * K, 10 * K, 0)]
    grown = [(0, 1000 * K, 10 * K, 0), (10 * K, 5000 * K, 10 * K, 0)]
    assert changed_blocks(old, 10 * K - 7, grown, 20 * K - 3, BLOCK) == [2, 3, 4]
    # Shrunk to an unaligned size: the new last block is shorter than before, hence new.
    assert changed_blocks(old, 10 * K, old, 6 * K + 1, BLOCK) == [1]


def test_ranges_compress_runs() -> None:
    assert ranges([1, 2, 3, 7, 9, 10]) == [[1, 3], [7, 1], [9, 2]]
