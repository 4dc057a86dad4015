"""Random paged batches, and a backend compared against the torch reference on one: used by the
tests, by `scripts/gpu_check.py`, and by `select_backend` before it trusts the Triton kernels."""

from __future__ import annotations

import torch

from .base import AttentionSpec, StepLayout
from .torch_backend import TorchBackend


def random_batch(spec: AttentionSpec, lens: list[int], starts: list[int], seed: int = 0,
                 share_prefix: bool = False, num_spare_blocks: int = 3):
    """A step over len(lens) sequences: chunk b has lens[b] new tokens after starts[b] cached
    ones (decode chunks, of length 1, first). Block ids are shuffled; with `share_prefix`,
    every sequence's full blocks before its chunk are sequence 0's (a prefix-cache hit, or
    n>1 siblings). Returns (layout, q, k, v, k_cache, v_cache), caches filled at random."""
    gen = torch.Generator().manual_seed(seed)
    bs = spec.block_size
    needed = [-(-(s + n) // bs) for s, n in zip(starts, lens)]
    pool = torch.randperm(sum(needed) + num_spare_blocks, generator=gen).tolist()
    tables: list[list[int]] = []
    for b, (start, count) in enumerate(zip(starts, needed)):
        shared = min(start, starts[0]) // bs if share_prefix and b else 0
        prefix = tables[0][:shared] if shared else []
        tables.append(prefix + [pool.pop() for _ in range(count - shared)])
    layout = StepLayout.build(lens, starts, tables, bs)
    num_blocks = max(max(t) for t in tables) + 1 + num_spare_blocks
    shape = (num_blocks, bs, spec.num_kv_heads, spec.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(spec.cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(spec.cache_dtype)
    t = layout.num_tokens
    q = torch.randn(t, spec.num_heads, spec.head_dim, generator=gen).to(spec.dtype)
    k = torch.randn(t, spec.num_kv_heads, spec.head_dim, generator=gen).to(spec.dtype)
    v = torch.randn(t, spec.num_kv_heads, spec.head_dim, generator=gen).to(spec.dtype)
    dev = spec.device
    return layout, q.to(dev), k.to(dev), v.to(dev), k_cache.to(dev), v_cache.to(dev)


def run_backend(backend, layout: StepLayout, q, k, v, k_cache, v_cache, scale: float,
                window: int | None = None, softcap: float | None = None):
    """(attention output, K cache, V cache) after one layer's forward, on copies of the caches."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    meta = backend.build_metadata(layout)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    return out, k_cache, v_cache


def compare_backends(spec: AttentionSpec, backend, window: int | None = None, softcap: float | None = None,
                     lens: list[int] | None = None, starts: list[int] | None = None) -> float:
    """Max abs difference between `backend` and the torch backend (outputs and caches) on a
    small mixed step: decode rows, a fresh prompt and a chunk continuing a sequence."""
    lens = lens or [1, 1, 1, 19, 7]
    starts = starts or [5, 40, 17, 0, 21]
    batch = random_batch(spec, lens, starts)
    scale = spec.head_dim ** -0.5
    want = run_backend(TorchBackend(spec), *batch, scale, window, softcap)
    got = run_backend(backend, *batch, scale, window, softcap)
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(want, got))
