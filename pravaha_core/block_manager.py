"""Paged KV-cache bookkeeping: ref-counted blocks, a free list, block tables. No torch."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Hands out block ids from a free list; a block returns to it when its ref count hits 0."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 1
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        block = self._free.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def fork(self, block: int) -> int:
        """Share `block` with one more owner."""
        assert self.ref_counts[block] > 0, f"block {block} is not allocated"
        self.ref_counts[block] += 1
        return block

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


class BlockManager:
    """Gives each sequence the blocks its computed tokens need."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

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
        if missing > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate() for _ in range(missing))
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (each one returns to the free list when unshared)."""
        for block in reversed(seq.block_table):
            self.allocator.free(block)
        seq.block_table = []
