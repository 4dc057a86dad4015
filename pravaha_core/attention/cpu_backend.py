"""The CPU backend: the native C++ kernels (pravaha_core/kernels/paged_attention.cpp).

Decode rows read K/V in place through the block table. Where the kernel has its tile path
(head_dim 64, GQA groups 2-4), prompt tokens attend like decode rows too: each row reads its own
causal context, so no work is spent above the diagonal and nothing is padded or gathered; then
one native call writes the step's K/V and attends. Other prefill chunks take the torch paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionSpec, StepLayout
from .torch_backend import AttentionGroup, TorchBackend, TorchMetadata, store_kv

NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Prompt rows go through the kernel while every context is shorter than this: past it a row's
# context stops fitting in cache and the SDPA paths are faster (see kernels/README.md).
KERNEL_PREFILL_MAX_CONTEXT = 4096


@dataclass
class CpuMetadata(TorchMetadata):
    all_rows: bool = False            # every row of the step is a kernel row (decode group only)


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, spec: AttentionSpec, native):
        super().__init__(spec)
        self.kernel = native
        self.kernel_prefill = (getattr(native, "tile64", False) and spec.head_dim == 64 and 2 <= spec.group <= 4)

    @staticmethod
    def unsupported(spec: AttentionSpec, native) -> str | None:
        """Why this backend cannot serve `spec`, or None."""
        if spec.device.type != "cpu":
            return f"needs a CPU device, not {spec.device}"
        if native is None:
            return "the native kernels are not built (native_kernels=False, or no compiler)"
        if spec.softcap:
            return "the native kernels do not soft-cap attention logits (use 'torch')"
        if spec.cache_dtype not in NATIVE_CACHE_DTYPES:
            return f"no kernel for a {spec.cache_dtype} cache"
        return None

    def build_metadata(self, layout: StepLayout) -> CpuMetadata:
        dev = self.device
        slots = layout.slot_mapping.to(dev)
        if (self.kernel_prefill and layout.num_decode < layout.num_seqs
                and int(layout.positions.max()) < KERNEL_PREFILL_MAX_CONTEXT):
            # Every token, prompt or decode, is one kernel row over its causal context.
            rows = AttentionGroup(torch.zeros(0, dtype=torch.long, device=dev), None,
                                  layout.block_tables[layout.seq_idx].to(dev), (layout.positions + 1).to(dev), {})
            return CpuMetadata(self, slots, layout.num_tokens, rows, None, all_rows=True)
        decode, prefill = self._decode_group(layout, masks=False), self._prefill_group(layout)
        return CpuMetadata(self, slots, layout.num_decode, decode, prefill, all_rows=prefill is None)

    def forward(self, q, k, v, k_cache, v_cache, meta: CpuMetadata, scale, window, softcap):
        grp = meta.decode
        if meta.all_rows and q.dtype == torch.float32:
            # One native call writes the step's K/V (rounded to a narrower cache as Tensor.to
            # rounds) and attends.
            return self.kernel.paged_attention_step(q, k, v, k_cache, v_cache, meta.slot_mapping, grp.block_tables,
                                                    grp.context_lens, scale, window or -1)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if grp is not None:
            out[:nd] = self.kernel.paged_decode_attention(q[:nd].float(), k_cache, v_cache, grp.block_tables,
                                                          grp.context_lens, scale, window or -1).to(q.dtype)
        if meta.prefill is not None:
            out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill, scale, window, softcap)
        return out
