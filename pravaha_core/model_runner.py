"""Turns a step plan into one forward pass over the whole batch, then samples."""

from __future__ import annotations

import torch

from . import kernels
from .attention import AttentionSpec, StepLayout, select_backend
from .config import EngineConfig
from .loader import DTYPES, LoadedModel
from .sampler import PenaltyInputs, SamplingBatch, sample
from .scheduler import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from .sequence import Sequence
from .structured import StructuredOutputs


def bytes_per_block(model, block_size: int, dtype: str) -> int:
    """K and V of every layer for one block of `block_size` tokens."""
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int, eos_token_ids: set[int],
                 cpu: kernels.CpuPlatform | None = None, structured: StructuredOutputs | None = None):
        self.model = loaded.model
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        m = self.model
        cache_dtype = DTYPES[config.cache_dtype]
        shape = (2, m.num_layers, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        # Zeroed: masked-out slots are still multiplied by 0 in attention, and 0 * NaN is NaN.
        # On CPUs, on huge pages where the OS gives them: advised before zeroing touches a page.
        self.kv_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        if cpu is not None and cpu.huge_pages:
            kernels.advise_huge_pages(self.kv_cache)
        self.kv_cache.zero_()
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(m.num_layers)]
        self.eos_token_ids = sorted(eos_token_ids)
        native = cpu.native if cpu is not None else None
        spec = AttentionSpec(m.num_heads, m.num_kv_heads, m.head_dim, self.block_size, self.device,
                             DTYPES[config.dtype], cache_dtype, frozenset(m.sliding_windows),
                             getattr(m, "attention_softcap", None) is not None)
        self.attention = select_backend(config.attention_backend, spec, native)
        self.structured = structured

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens > 1)  # decode group first (stable)
        input_ids, positions, meta, last_index = self._prepare(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:
            return ModelRunnerOutput({})
        allowed = self.structured.bitmask(sampling) if self.structured is not None else None
        rows = torch.tensor([last_index[i] for i, c in enumerate(chunks) if c.samples], device=self.device)
        logits = self.model.compute_logits(hidden[rows])                       # [N, V]
        batch = self._sampling_batch(sampling, logits.shape[-1])
        if allowed is not None:
            batch.bitmask, batch.bitmask_rows = allowed[0].to(self.device, non_blocking=True), allowed[1]
        out = sample(logits, batch)
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
        """(input ids [T], positions [T], attention metadata, each chunk's last row)."""
        dev = self.device
        ids = [t for c in chunks for t in c.seq.token_ids[c.start:c.start + c.num_tokens]]
        layout = StepLayout.build([c.num_tokens for c in chunks], [c.start for c in chunks],
                                  [c.seq.block_table for c in chunks], self.block_size)
        meta = self.attention.build_metadata(layout)
        last_index = (layout.offsets + layout.lens - 1).tolist()
        return torch.tensor(ids, device=dev), layout.positions.to(dev), meta, last_index


def _stop_ids(params, eos_token_ids: list[int]) -> list[int]:
    """Tokens that would end generation: suppressed while min_tokens is not reached."""
    return params.stop_token_ids + ([] if params.ignore_eos else eos_token_ids)


def _top(entry: dict[int, float], k: int, token: int) -> dict[int, float]:
    """The first k alternatives (entry is ordered best first) plus the sampled token."""
    items = list(entry.items())
    top = dict(items[:k])
    top[token] = entry[token]
    return top
