"""Unit tests for the paged KV-cache bookkeeping: BlockAllocator, BlockManager, cdiv."""

from __future__ import annotations

import pytest

from pravaha_core.block_manager import BlockAllocator, BlockManager, cdiv
from pravaha_core.sampling_params import SamplingParams
from pravaha_core.sequence import Sequence


def make_seq(rid: str = "r", num_prompt: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=4))


# ---- arithmetic ----------------------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    (0, 1, 0), (1, 1, 1), (5, 1, 5),
    (0, 4, 0), (1, 4, 1), (3, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3),
    (15, 16, 1), (16, 16, 1), (17, 16, 2), (33, 16, 3),
])
def test_cdiv(a, b, expected):
    assert cdiv(a, b) == expected


def test_cdiv_matches_ceil_division_exhaustively():
    for b in range(1, 20):
        for a in range(0, 200):
            assert cdiv(a, b) == (a + b - 1) // b


@pytest.mark.parametrize("block_size, num_tokens, expected", [
    (16, 0, 0), (16, 1, 1), (16, 16, 1), (16, 17, 2), (16, 32, 2), (16, 33, 3),
    (1, 0, 0), (1, 7, 7), (3, 7, 3), (3, 9, 3), (3, 10, 4),
])
def test_blocks_for(block_size, num_tokens, expected):
    bm = BlockManager(num_blocks=8, block_size=block_size)
    assert bm.blocks_for(num_tokens) == expected


# ---- BlockAllocator ------------------------------------------------------------------

def test_allocator_starts_all_free():
    a = BlockAllocator(5)
    assert a.num_blocks == 5
    assert a.num_free == 5
    assert a.ref_counts == [0] * 5


def test_allocator_needs_at_least_one_block():
    with pytest.raises(AssertionError):
        BlockAllocator(0)


def test_allocate_hands_out_distinct_blocks_with_ref_count_one():
    a = BlockAllocator(4)
    blocks = [a.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert a.num_free == 0
    assert a.ref_counts == [1, 1, 1, 1]


def test_allocate_from_empty_free_list_fails_loudly():
    a = BlockAllocator(2)
    a.allocate()
    a.allocate()
    with pytest.raises(IndexError):
        a.allocate()
    # the failed attempt changed nothing
    assert a.num_free == 0
    assert a.ref_counts == [1, 1]


def test_free_returns_block_to_free_list():
    a = BlockAllocator(3)
    b = a.allocate()
    assert a.num_free == 2
    a.free(b)
    assert a.num_free == 3
    assert a.ref_counts[b] == 0


def test_free_list_reuses_freed_block():
    a = BlockAllocator(4)
    blocks = [a.allocate() for _ in range(4)]
    a.free(blocks[2])
    assert a.allocate() == blocks[2]
    assert a.ref_counts[blocks[2]] == 1
    assert a.num_free == 0


def test_freed_blocks_are_reused_in_free_order():
    a = BlockAllocator(3)
    blocks = [a.allocate() for _ in range(3)]
    a.free(blocks[1])
    a.free(blocks[0])
    assert a.allocate() == blocks[1]
    assert a.allocate() == blocks[0]


def test_fork_adds_an_owner_and_block_stays_until_last_free():
    a = BlockAllocator(2)
    b = a.allocate()
    assert a.fork(b) == b
    assert a.fork(b) == b
    assert a.ref_counts[b] == 3
    a.free(b)
    assert a.ref_counts[b] == 2
    assert a.num_free == 1          # still held
    a.free(b)
    assert a.ref_counts[b] == 1
    assert a.num_free == 1
    a.free(b)
    assert a.ref_counts[b] == 0
    assert a.num_free == 2          # back on the free list exactly once


def test_fork_of_unallocated_block_is_caught():
    a = BlockAllocator(2)
    with pytest.raises(AssertionError, match="not allocated"):
        a.fork(0)
    b = a.allocate()
    a.free(b)
    with pytest.raises(AssertionError, match="not allocated"):
        a.fork(b)


def test_double_free_is_caught():
    a = BlockAllocator(2)
    b = a.allocate()
    a.free(b)
    with pytest.raises(AssertionError, match="freed twice"):
        a.free(b)
    # the bad free did not corrupt the free list (no duplicate entry)
    assert a.num_free == 2
    assert a.ref_counts == [0, 0]
    assert sorted([a.allocate(), a.allocate()]) == [0, 1]


def test_free_of_never_allocated_block_is_caught():
    a = BlockAllocator(3)
    with pytest.raises(AssertionError):
        a.free(1)
    assert a.num_free == 3


def test_over_free_after_fork_is_caught():
    a = BlockAllocator(1)
    b = a.allocate()
    a.fork(b)
    a.free(b)
    a.free(b)
    with pytest.raises(AssertionError):
        a.free(b)
    assert a.num_free == 1


# ---- BlockManager --------------------------------------------------------------------

def test_block_manager_properties():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.num_blocks == 6
    assert bm.num_free_blocks == 6
    assert bm.block_size == 4


def test_num_missing_blocks_accounts_for_computed_and_held():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(num_prompt=10)
    assert bm.num_missing_blocks(seq, 10) == 3
    assert bm.num_missing_blocks(seq, 4) == 1
    assert bm.num_missing_blocks(seq, 0) == 0
    assert bm.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    assert bm.num_missing_blocks(seq, 1) == 1       # token 5 starts a new block
    assert bm.num_missing_blocks(seq, 4) == 1
    assert bm.num_missing_blocks(seq, 5) == 2
    seq.num_computed_tokens = 3
    assert bm.num_missing_blocks(seq, 1) == 0       # fits in the held block


def test_allocate_slots_grows_block_table_incrementally():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq(num_prompt=6)
    assert bm.allocate_slots(seq, 6)
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 3
    first_two = list(seq.block_table)
    seq.num_computed_tokens = 6
    assert bm.allocate_slots(seq, 1)                # 7th token fits in block 2
    assert seq.block_table == first_two
    seq.num_computed_tokens = 8
    assert bm.allocate_slots(seq, 1)                # 9th token needs block 3
    assert seq.block_table[:2] == first_two
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 2
    for b in seq.block_table:
        assert bm.allocator.ref_counts[b] == 1


def test_allocate_slots_with_nothing_missing_succeeds_even_when_cache_is_full():
    bm = BlockManager(num_blocks=1, block_size=4)
    seq = make_seq(num_prompt=2)
    assert bm.allocate_slots(seq, 2)
    assert bm.num_free_blocks == 0
    seq.num_computed_tokens = 2
    assert bm.allocate_slots(seq, 2)                # tokens 3, 4 still in block 0
    assert len(seq.block_table) == 1


def test_allocate_slots_out_of_blocks_returns_false_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq("a", 8), make_seq("b", 12)
    assert bm.allocate_slots(a, 8)
    assert bm.num_free_blocks == 2
    refs_before = list(bm.allocator.ref_counts)
    free_before = list(bm.allocator._free)
    assert not bm.allocate_slots(b, 12)             # needs 3, only 2 free
    assert b.block_table == []
    assert bm.num_free_blocks == 2
    assert bm.allocator.ref_counts == refs_before
    assert list(bm.allocator._free) == free_before
    # it is all-or-nothing: a request that fits still works afterwards
    assert bm.allocate_slots(b, 8)
    assert len(b.block_table) == 2
    assert bm.num_free_blocks == 0


def test_allocate_slots_false_for_sequence_that_already_holds_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq(num_prompt=4)
    assert bm.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    table = list(seq.block_table)
    assert not bm.allocate_slots(seq, 3)            # would need 4 blocks in all, 1 free
    assert seq.block_table == table
    assert bm.num_free_blocks == 1


def test_free_sequence_releases_all_blocks_and_clears_table():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq(num_prompt=5)
    assert bm.allocate_slots(seq, 5)
    assert bm.num_free_blocks == 1
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 4
    assert bm.allocator.ref_counts == [0, 0, 0, 0]
    bm.free(seq)                                    # freeing an empty table is a no-op
    assert bm.num_free_blocks == 4


def test_free_sequence_with_shared_blocks_keeps_them_for_other_owner():
    bm = BlockManager(num_blocks=4, block_size=2)
    parent, child = make_seq("p", 4), make_seq("c", 4)
    assert bm.allocate_slots(parent, 4)
    child.block_table = [bm.allocator.fork(b) for b in parent.block_table]
    shared = list(parent.block_table)
    assert all(bm.allocator.ref_counts[b] == 2 for b in shared)
    assert bm.num_free_blocks == 2
    bm.free(parent)
    assert parent.block_table == []
    assert all(bm.allocator.ref_counts[b] == 1 for b in shared)
    assert bm.num_free_blocks == 2                  # the child still holds them
    bm.free(child)
    assert bm.num_free_blocks == 4
    assert bm.allocator.ref_counts == [0, 0, 0, 0]


def test_freed_sequence_blocks_are_reused_by_next_sequence():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq("a", 12)
    assert bm.allocate_slots(a, 12)
    held = set(a.block_table)
    b = make_seq("b", 4)
    assert not bm.allocate_slots(b, 4)
    bm.free(a)
    assert bm.allocate_slots(b, 4)
    assert b.block_table[0] in held


# ---- prefix cache ----------------------------------------------------------------------
from pravaha_core.sampling_params import SamplingParams  # noqa: E402
from pravaha_core.sequence import Sequence  # noqa: E402


def _seq(tokens, rid="s"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def _computed(bm, seq):
    """Allocate and mark every token but the last computed, then name the full blocks."""
    assert bm.allocate_slots(seq, seq.num_tokens - 1 - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens - 1
    bm.commit(seq)


def test_prefix_cache_reuses_full_blocks_of_a_shared_prefix():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _seq(range(10), "a")                       # blocks [0..3] [4..7] full, [8, 9] partial
    _computed(bm, a)
    b = _seq(list(range(8)) + [42, 43, 44], "b")   # same first two blocks
    assert bm.reuse_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.allocator.ref_counts[x] for x in b.block_table] == [2, 2]
    c = _seq([9] + list(range(1, 8)), "c")         # first block differs: the chain breaks at once
    assert bm.reuse_cached_prefix(c) == 0 and c.block_table == []


def test_prefix_cache_hash_is_chained_by_position():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = _seq([1, 2, 3, 4, 5], "a")
    _computed(bm, a)
    b = _seq([3, 4, 1, 2, 9], "b")                 # same blocks, other order: no hit
    assert bm.reuse_cached_prefix(b) == 0


def test_prefix_cache_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _seq(range(9), "a")
    _computed(bm, a)                                # blocks [0..3] [4..7] named
    exact = _seq(range(8), "b")                     # 8 tokens: only the first block may be reused
    assert bm.reuse_cached_prefix(exact) == 4


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = _seq([1, 2, 3, 4, 5], "a")
    _computed(bm, a)
    held = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = _seq([1, 2, 3, 4, 7], "b")
    assert bm.reuse_cached_prefix(b) == 4 and b.block_table == held[:2]
    assert bm.num_free_blocks == 2
    bm.free(b)
    # Allocate everything: the named blocks go last (least recently freed first) and lose their names.
    c = _seq(range(100, 109), "c")
    assert bm.allocate_slots(c, 8)
    assert bm.cached == {} and bm.block_hash == {}


def test_prefix_cache_off_never_reuses():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10), "a")
    _computed(bm, a)
    assert bm.cached == {}
    assert bm.reuse_cached_prefix(_seq(range(10), "b")) == 0
