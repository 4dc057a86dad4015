"""Paged KV-cache bookkeeping: ref-counted blocks, a free list, block tables, prefix cache.
No torch.

Prefix caching: a full block is named by a chained hash of its token ids (and everything
before it). A freed block keeps its contents and its name until it is handed out again, so
a later request with the same prefix reuses it; the free list is kept in LRU order.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Hands out block ids from a free list (least recently freed first); a block returns to
    it when its ref count hits 0. A free block may still be named in the prefix cache."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 1
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.on_evict = None     # called with a block id when a named free block is reused

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise IndexError("no free KV blocks")
        block, _ = self._free.popitem(last=False)
        assert self.ref_counts[block] == 0
        if self.on_evict is not None:
            self.on_evict(block)
        self.ref_counts[block] = 1
        return block

    def fork(self, block: int) -> int:
        """Share `block` with one more owner."""
        assert 0 <= block < self.num_blocks and self.ref_counts[block] > 0, f"block {block} is not allocated"
        self.ref_counts[block] += 1
        return block

    def take(self, block: int) -> int:
        """Own `block` again: held blocks gain an owner; a free one leaves the free list with
        its contents intact (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
            self.ref_counts[block] = 1
            return block
        return self.fork(block)

    def free(self, block: int) -> None:
        assert 0 <= block < self.num_blocks and self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None


class BlockManager:
    """Gives each sequence the blocks its computed tokens need."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.cached: dict[int, int] = {}        # block hash -> block id
        self.block_hash: dict[int, int] = {}    # block id -> its hash (full, computed blocks)
        self.allocator.on_evict = self._evict

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`. False means no room: preempt."""
        missing = self.num_missing_blocks(seq, num_new_tokens)
        if missing == 0:   # steady decode: most steps stay inside the last block
            return True
        if missing > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate() for _ in range(missing))
        return True

    def trim(self, seq: Sequence) -> None:
        """Speculation rollback: free the blocks past those holding the computed tokens (they
        hold only rejected drafts' K/V; rejected slots inside a kept block are overwritten later)."""
        keep = self.blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self.allocator.free(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (each one returns to the free list when unshared);
        the tail goes back first, so it is the first to be reused."""
        for block in reversed(seq.block_table):
            self.allocator.free(block)
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- prefix cache ----------------------------------------------------------------
    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence with nothing computed: take the longest run of cached full blocks
        of its tokens (leaving at least one token to compute); returns tokens reused."""
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table:
            return 0
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            seq.block_table.append(self.allocator.take(block))
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_committed_blocks = len(seq.block_table)
        return seq.num_computed_tokens

    def commit(self, seq: Sequence) -> None:
        """Name the sequence's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if block not in self.block_hash and h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_committed_blocks = num_full

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first `num_blocks` full blocks (memoized on it)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash((hashes[-1] if hashes else 0, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def _evict(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None:
            del self.cached[h]
