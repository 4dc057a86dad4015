"""Turns a step plan into one forward pass over the whole batch, then samples."""

from __future__ import annotations

import torch

from . import kernels
from .loader import DTYPES, LoadedModel
from .models.attention import AttentionGroup, AttentionMetadata, build_mask
from .sampler import PenaltyInputs, SamplingBatch, sample
from .scheduler import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from .sequence import Sequence

# Prefill chunks that all start their sequences attend as one padded batch while they average
# fewer tokens than this (per-call overhead wins); longer ones one by one, unpadded and causal
# (padding a batch of lengths 16..256 to the longest wastes over half the attention FLOPs).
SPAN_MIN_MEAN_TOKENS = 64

# With the native kernel's tile path (head_dim 64, GQA groups 2-4; `tile64`: AVX-512 or AVX2),
# prompt tokens attend like decode rows: each query row reads its own causal context through
# the block table, so no work is spent above the diagonal and nothing is padded or gathered.
# Measured against the SDPA paths on a 2-core AVX-512 host (9/3 heads): 2.8x faster on W1's
# prompts (16-256 tokens), 2.1x at 528-768, 1.3x at 2048; on a 2-core AVX2 host, where the
# linears dominate prefill, W1's whole prefill 3% faster at 9/3 heads, 7% at 8/2. Longer
# contexts stop fitting in cache per row, so they keep the SDPA paths; group 1 and groups
# over 4 measured slower, as did head_dim 128 without the tile path.
KERNEL_PREFILL_MAX_CONTEXT = 4096


def bytes_per_block(model, block_size: int, dtype: str) -> int:
    """K and V of every layer for one block of `block_size` tokens."""
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int,
                 cache_dtype: str, device: str, eos_token_ids: set[int], use_kernels: bool = True):
        self.model = loaded.model
        self.block_size = block_size
        self.device = torch.device(device)
        m = self.model
        shape = (2, m.num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim)
        # Zeroed: masked-out slots are still multiplied by 0 in attention, and 0 * NaN is NaN.
        # On CPUs, on huge pages where the OS gives them: advised before zeroing touches a page.
        self.kv_cache = torch.empty(shape, dtype=DTYPES[cache_dtype], device=self.device)
        kernels.advise_huge_pages(self.kv_cache)
        self.kv_cache.zero_()
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(m.num_layers)]
        self.windows = set(m.sliding_windows)
        self.gqa_group = m.num_heads // m.num_kv_heads
        self.eos_token_ids = sorted(eos_token_ids)
        self.kernel = kernels.paged_decode() if self.device.type == "cpu" and use_kernels else None
        self.kernel_prefill = (self.kernel is not None and getattr(self.kernel, "tile64", False)
                               and m.head_dim == 64 and 2 <= self.gqa_group <= 4)
        if self.device.type == "cpu" and use_kernels:
            kernels.keep_large_allocations()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens > 1)  # decode group first (stable)
        input_ids, positions, meta, last_index = self._prepare(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:
            return ModelRunnerOutput({})
        rows = torch.tensor([last_index[i] for i, c in enumerate(chunks) if c.samples], device=self.device)
        logits = self.model.compute_logits(hidden[rows])                       # [N, V]
        out = sample(logits, self._sampling_batch(sampling, logits.shape[-1]))
        logprobs = {}
        if out.logprobs is not None:
            for seq, token, entry in zip(sampling, out.token_ids, out.logprobs):
                if seq.params.logprobs is not None:
                    logprobs[seq.seq_id] = _top(entry, seq.params.logprobs, token)
        return ModelRunnerOutput({s.seq_id: t for s, t in zip(sampling, out.token_ids)}, logprobs)

    def _sampling_batch(self, seqs: list[Sequence], vocab: int) -> SamplingBatch:
        """Per-row tensors for the sampler; the penalty inputs only when some row asks."""
        dev = self.device
        params = [s.params for s in seqs]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        suppress = [(row, tok) for row, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                    for tok in _stop_ids(s.params, self.eos_token_ids) if tok < vocab]
        return SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], device=dev),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev),
            top_p=torch.tensor([p.top_p for p in params], device=dev),
            min_p=torch.tensor([p.min_p for p in params], device=dev),
            seed_keys=torch.tensor([s.seed_key for s in seqs], device=dev),
            positions=torch.tensor([s.num_output_tokens for s in seqs], device=dev),
            all_greedy=all(p.greedy for p in params),
            needs_truncation=any(p.truncates and not p.greedy for p in params),
            penalties=self._penalties(seqs, vocab) if any(p.penalizes for p in params) else None,
            suppress=torch.tensor(suppress, device=dev) if suppress else None,
            max_logprobs=max(asked) if asked else None)

    def _penalties(self, seqs: list[Sequence], vocab: int) -> PenaltyInputs:
        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(map(len, lists)))
            return torch.tensor([ids + [vocab] * (width - len(ids)) for ids in lists], device=self.device)

        params = [s.params for s in seqs]
        return PenaltyInputs(
            repetition=torch.tensor([p.repetition_penalty for p in params], device=self.device),
            presence=torch.tensor([p.presence_penalty for p in params], device=self.device),
            frequency=torch.tensor([p.frequency_penalty for p in params], device=self.device),
            prompt_ids=padded([s.prompt_token_ids for s in seqs]),
            output_ids=padded([s.output_token_ids for s in seqs]))

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
        input_ids = torch.tensor(ids, device=dev)
        if self.kernel_prefill and num_decode < len(chunks) and \
                int(positions.max()) < KERNEL_PREFILL_MAX_CONTEXT:
            # Every token, prompt or decode, is one kernel row over its causal context.
            rows = AttentionGroup(torch.zeros(0, dtype=torch.long, device=dev), None,
                                  tables[seq_idx].to(dev), (positions + 1).to(dev), {})
            meta = AttentionMetadata(slots.to(dev), len(ids), rows, None, self.kernel)
            return input_ids, positions.to(dev), meta, (ends - 1).tolist()
        decode = prefill = None
        if num_decode:
            q_pos = (starts[:num_decode])[:, None]
            decode = self._group(torch.arange(num_decode)[:, None], None, tables[:num_decode], q_pos,
                                 chunks[:num_decode], masks=self.kernel is None)
        if num_decode < len(chunks):
            p_lens, p_offsets = lens[num_decode:], offsets[num_decode:] - offsets[num_decode]
            q_rel = torch.arange(int(p_lens.max()))[None, :]
            valid = q_rel < p_lens[:, None]
            q_index = torch.where(valid, p_offsets[:, None] + q_rel, 0)
            q_pos = torch.where(valid, starts[num_decode:, None] + q_rel, 0)
            fresh = all(c.start == 0 for c in chunks[num_decode:])
            if fresh and float(p_lens.float().mean()) < SPAN_MIN_MEAN_TOKENS:
                prefill = self._group(q_index, None if bool(valid.all()) else valid, tables[num_decode:], q_pos,
                                      chunks[num_decode:], direct=True)
            else:
                prefill = self._spans(chunks[num_decode:], tables[num_decode:], p_offsets.tolist())
        meta = AttentionMetadata(slots.to(dev), num_decode, decode, prefill, self.kernel)
        return input_ids, positions.to(dev), meta, (ends - 1).tolist()

    def _spans(self, chunks: list[ScheduledChunk], tables, offsets: list[int]) -> AttentionGroup:
        """Prefill chunks attend one by one, unpadded (see AttentionGroup); a chunk that starts
        its sequence under full attention needs no mask (causal)."""
        dev = self.device
        spans = [(first, c.num_tokens, c.start) for first, c in zip(offsets, chunks)]
        masks = {w: [None if start == 0 and w is None else
                     build_mask(torch.arange(start, start + rows)[None, :], start + rows, w, self.gqa_group).to(dev)
                     for _, rows, start in spans] for w in self.windows}
        context_lens = torch.tensor([c.start + c.num_tokens for c in chunks])
        width = max(len(c.seq.block_table) for c in chunks)
        return AttentionGroup(torch.zeros(0, dtype=torch.long, device=dev), None,
                              tables[:, :width].contiguous().to(dev), context_lens.to(dev), masks, spans=spans)

    def _group(self, q_index, q_valid, tables, q_pos, chunks, masks: bool = True,
               direct: bool = False) -> AttentionGroup:
        """Padded batch over `chunks`; block tables cut to the widest one in the group. With
        `direct`, keys are the chunks' own tokens, so masks span the longest chunk only."""
        width = max(len(c.seq.block_table) for c in chunks)
        num_keys = q_index.shape[1] if direct else width * self.block_size
        dev = self.device
        built = {w: build_mask(q_pos, num_keys, w, self.gqa_group).to(dev) for w in self.windows} if masks else {}
        context_lens = torch.tensor([c.start + c.num_tokens for c in chunks])
        return AttentionGroup(q_index.to(dev), None if q_valid is None else q_valid.to(dev),
                              tables[:, :width].contiguous().to(dev), context_lens.to(dev), built, direct)


def _stop_ids(params, eos_token_ids: list[int]) -> list[int]:
    """Tokens that would end generation: suppressed while min_tokens is not reached."""
    return params.stop_token_ids + ([] if params.ignore_eos else eos_token_ids)


def _top(entry: dict[int, float], k: int, token: int) -> dict[int, float]:
    """The first k alternatives (entry is ordered best first) plus the sampled token."""
    items = list(entry.items())
    top = dict(items[:k])
    top[token] = entry[token]
    return top
