"""Turns a step plan into one forward pass over the whole batch, then samples."""

from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .attention import AttentionSpec, StepLayout, select_backend
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .loader import DTYPES, LoadedModel
from .sampler import sample
from .sampling_rows import SamplingRows
from .scheduler import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from .sequence import Sequence
from .spec_decode import verify_greedy
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
                             any(getattr(layer, "softcap", None) is not None for layer in m.modules()))
        self.attention = select_backend(config.attention_backend, spec, native)
        self.sampling_rows = SamplingRows(self.device, m.vocab_size, config.max_num_seqs)
        self.structured = structured
        self.decode_graphs = None
        if config.cuda_graphs and self.device.type == "cuda" and self.attention.name == "triton":
            max_blocks = -(-loaded.max_model_len // self.block_size)
            self.decode_graphs = DecodeGraphs(self, config.max_num_seqs, max_blocks, capture=True)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens > 1)  # decode group first (stable)
        input_ids, layout = self._prepare(chunks)
        if self.decode_graphs is not None and self.decode_graphs.fits(layout):
            hidden = self.decode_graphs.run(input_ids, layout)
        else:
            meta = self.attention.build_metadata(layout)
            hidden = self.model(input_ids, layout.positions.to(self.device), meta, self.kv_caches)
        verified = self._verify_drafts(chunks, layout, hidden)
        samples = [bool(c.samples) and not c.draft_ids for c in chunks]
        sampling = [c.seq for c, s in zip(chunks, samples) if s]
        if not sampling:
            return ModelRunnerOutput({}, spec_token_ids=verified)
        allowed = self.structured.bitmask(sampling) if self.structured is not None else None
        rows = layout.offsets + layout.lens - 1                                 # [B] each chunk's last row
        if len(sampling) < len(chunks):
            rows = rows[torch.tensor(samples)]
        rows = rows.to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[rows])                       # [N, V]
        batch = self.sampling_rows.batch(sampling, self.eos_token_ids)
        if allowed is not None:
            batch.bitmask, batch.bitmask_rows = allowed[0].to(self.device, non_blocking=True), allowed[1]
        out = sample(logits, batch)
        logprobs = {}
        if out.logprobs is not None:
            for seq, token, entry in zip(sampling, out.token_ids, out.logprobs):
                if seq.params.logprobs is not None:
                    logprobs[seq.seq_id] = _top(entry, seq.params.logprobs, token)
        return ModelRunnerOutput({s.seq_id: t for s, t in zip(sampling, out.token_ids)}, logprobs, verified)

    def _verify_drafts(self, chunks: list[ScheduledChunk], layout: StepLayout, hidden: torch.Tensor) -> dict:
        """Greedy verification of the speculating chunks: their last k+1 rows' argmax against
        the drafts (only plain greedy rows speculate, so the argmax is the sampler's token)."""
        spec = [(i, c) for i, c in enumerate(chunks) if c.draft_ids]
        if not spec:
            return {}
        offsets, lens = layout.offsets.tolist(), layout.lens.tolist()
        rows = [r for i, c in spec for r in range(offsets[i] + lens[i] - len(c.draft_ids) - 1, offsets[i] + lens[i])]
        argmax = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float().max(dim=-1).indices.tolist()
        verified, at = {}, 0
        for _, c in spec:
            n = len(c.draft_ids) + 1
            verified[c.seq.seq_id] = verify_greedy(c.draft_ids, argmax[at:at + n])
            at += n
        return verified

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, StepLayout]:
        """(input ids [T] on the device, the step's layout on the host)."""
        ids = [t for c in chunks
               for t in c.seq.token_ids[c.start:c.start + c.num_tokens - len(c.draft_ids)] + c.draft_ids]
        layout = StepLayout.build([c.num_tokens for c in chunks], [c.start for c in chunks],
                                  [c.seq.block_table for c in chunks], self.block_size)
        return torch.from_numpy(np.array(ids, dtype=np.int64)).to(self.device), layout


def _top(entry: dict[int, float], k: int, token: int) -> dict[int, float]:
    """The first k alternatives (entry is ordered best first) plus the sampled token."""
    items = list(entry.items())
    top = dict(items[:k])
    top[token] = entry[token]
    return top
