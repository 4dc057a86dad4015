"""Turns a step plan into one forward pass over the whole batch, then samples."""

from __future__ import annotations

import torch

from .loader import DTYPES, LoadedModel
from .models.attention import AttentionGroup, AttentionMetadata, build_mask
from .sampler import Sampler
from .scheduler import ModelRunnerOutput, ScheduledChunk, SchedulerOutput


def bytes_per_block(model, block_size: int, dtype: str) -> int:
    """K and V of every layer for one block of `block_size` tokens."""
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int,
                 dtype: str, device: str, seed: int):
        self.model = loaded.model
        self.block_size = block_size
        self.device = torch.device(device)
        m = self.model
        shape = (2, m.num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim)
        # Zeroed: masked-out slots are still multiplied by 0 in attention, and 0 * NaN is NaN.
        self.kv_cache = torch.zeros(shape, dtype=DTYPES[dtype], device=self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(m.num_layers)]
        self.windows = set(m.sliding_windows)
        self.gqa_group = m.num_heads // m.num_kv_heads
        self.sampler = Sampler(device, seed)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens > 1)  # decode group first (stable)
        input_ids, positions, meta, last_index = self._prepare(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return ModelRunnerOutput({})
        rows = torch.tensor([last_index[i] for i, c in enumerate(chunks) if c.samples], device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        tokens = self.sampler(logits, [c.seq.params for c in sampling]).tolist()
        return ModelRunnerOutput({c.seq.request_id: t for c, t in zip(sampling, tokens)})

    def _prepare(self, chunks: list[ScheduledChunk]):
        dev, bs = self.device, self.block_size
        ids = [t for c in chunks for t in c.seq.token_ids[c.start:c.start + c.num_tokens]]
        lens = torch.tensor([c.num_tokens for c in chunks])
        starts = torch.tensor([c.start for c in chunks])
        ends = lens.cumsum(0)
        offsets = ends - lens
        seq_idx = torch.repeat_interleave(torch.arange(len(chunks)), lens)
        positions = torch.arange(int(ends[-1])) - offsets[seq_idx] + starts[seq_idx]   # [T]
        width = max(len(c.seq.block_table) for c in chunks)
        tables = torch.tensor([c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks])
        slots = tables[seq_idx, positions // bs] * bs + positions % bs
        num_decode = int((lens == 1).sum())
        decode = prefill = None
        if num_decode:
            q_pos = (starts[:num_decode])[:, None]
            decode = self._group(torch.arange(num_decode)[:, None], None, tables[:num_decode], q_pos, chunks[:num_decode])
        if num_decode < len(chunks):
            p_lens, p_offsets = lens[num_decode:], offsets[num_decode:] - offsets[num_decode]
            q_rel = torch.arange(int(p_lens.max()))[None, :]
            valid = q_rel < p_lens[:, None]
            q_index = torch.where(valid, p_offsets[:, None] + q_rel, 0)
            q_pos = torch.where(valid, starts[num_decode:, None] + q_rel, 0)
            prefill = self._group(q_index, None if bool(valid.all()) else valid,
                                  tables[num_decode:], q_pos, chunks[num_decode:])
        meta = AttentionMetadata(slots.to(dev), num_decode, decode, prefill)
        input_ids = torch.tensor(ids, device=dev)
        return input_ids, positions.to(dev), meta, (ends - 1).tolist()

    def _group(self, q_index, q_valid, tables, q_pos, chunks) -> AttentionGroup:
        """Padded batch over `chunks`; block tables cut to the widest one in the group."""
        width = max(len(c.seq.block_table) for c in chunks)
        num_keys = width * self.block_size
        dev = self.device
        masks = {w: build_mask(q_pos, num_keys, w, self.gqa_group).to(dev) for w in self.windows}
        return AttentionGroup(q_index.to(dev), None if q_valid is None else q_valid.to(dev),
                              tables[:, :width].contiguous().to(dev), masks)
