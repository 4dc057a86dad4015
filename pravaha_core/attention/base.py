"""What every attention backend shares: the model facts it needs, the step's flat batch as the
runner lays it out on the host, and the two calls of the seam."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionSpec:
    """The model's attention, as the backends need to know it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    device: torch.device
    dtype: torch.dtype                      # the model's (q's) dtype
    cache_dtype: torch.dtype
    windows: frozenset                      # the sliding windows in use (None: full attention)
    softcap: bool = False                   # some layer soft-caps its attention logits

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class StepLayout:
    """The step's flat batch on the host. Chunks come decode first (single-token chunks), then
    prefill chunks; chunk b owns rows [offsets[b], offsets[b] + lens[b]) of the batch.

    lens:          [B]    query tokens of each chunk
    starts:        [B]    position of each chunk's first token in its sequence
    offsets:       [B]    row of each chunk's first token in the flat batch
    seq_idx:       [T]    chunk of each row
    positions:     [T]    position of each row in its sequence
    block_tables:  [B, W] block ids per chunk's sequence (padding: block 0)
    slot_mapping:  [T]    flat cache slot of each row
    """

    lens: torch.Tensor
    starts: torch.Tensor
    offsets: torch.Tensor
    seq_idx: torch.Tensor
    positions: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    num_decode: int

    @classmethod
    def build(cls, lens: list[int], starts: list[int], tables: list[list[int]], block_size: int) -> StepLayout:
        """From each chunk's query length, first position and block table (decode chunks,
        of length 1, first)."""
        num_decode = next((i for i, n in enumerate(lens) if n != 1), len(lens))
        assert all(n > 1 for n in lens[num_decode:]), "decode chunks must come first"
        lens_t, starts_t = _int_tensor(lens), _int_tensor(starts)
        block_tables = _padded(tables)
        if num_decode == len(lens):   # steady decode: one row per chunk, at its start
            seq_idx = torch.arange(num_decode)
            slots = block_tables[seq_idx, starts_t // block_size] * block_size + starts_t % block_size
            return cls(lens_t, starts_t, torch.arange(num_decode), seq_idx, starts_t.clone(), block_tables,
                       slots, num_decode)
        ends = lens_t.cumsum(0)
        offsets = ends - lens_t
        seq_idx = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
        positions = torch.arange(int(ends[-1])) - offsets[seq_idx] + starts_t[seq_idx]      # [T]
        slots = block_tables[seq_idx, positions // block_size] * block_size + positions % block_size
        return cls(lens_t, starts_t, offsets, seq_idx, positions, block_tables, slots, num_decode)

    @property
    def num_seqs(self) -> int:
        return int(self.lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def context_lens(self) -> torch.Tensor:
        """[B] tokens each chunk's sequence has in the cache after this step."""
        return self.starts + self.lens


def _int_tensor(values: list[int]) -> torch.Tensor:
    """int64 [N] from a list (through numpy: torch.tensor walks a list several times slower)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """[B, W] int64, each row a table padded with block 0 to the longest."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(lens.sum()))
    out = np.zeros((len(tables), int(lens.max())), np.int64)
    out[np.arange(out.shape[1]) < lens[:, None]] = flat
    return torch.from_numpy(out)


class AttentionBackend:
    """One way of attending over the paged cache. `build_metadata` runs once per step on the
    host; `forward` runs in every layer with what it built."""

    name = "base"

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def build_metadata(self, layout: StepLayout):
        """The step's tensors, on the device, shared by every layer; carries `backend`."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta, scale: float, window: int | None,
                softcap: float | None) -> torch.Tensor:
        """Write k/v [T, KVH, D] into their slots, then attend: q [T, H, D] -> [T, H, D]."""
        raise NotImplementedError
