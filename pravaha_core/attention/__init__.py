"""Paged attention behind one seam: a backend builds the step's metadata once, every layer
calls `paged_attention`, which writes the step's K/V into the cache and attends.

Backends:
- `torch`: SDPA over blocks gathered from the cache (the reference; runs anywhere);
- `cpu`: the native C++ kernels (pravaha_core/kernels), decode and short prompts read the
  cache in place through the block table;
- `triton`: one paged flash-attention kernel for every row of the step (decode rows and
  prefill chunks alike), reading K/V in place; for CUDA, and for tests under Triton's
  interpreter (TRITON_INTERPRET=1) on the CPU.

`select_backend("auto", ...)` takes `triton` on CUDA and `cpu` on the CPU where they work,
else `torch`.
"""

from __future__ import annotations

import logging

import torch

from .base import AttentionBackend, AttentionSpec, StepLayout

log = logging.getLogger("pravaha.attention")

from ..config import ATTENTION_BACKENDS as BACKENDS


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta, scale: float, window: int | None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], caches: [num_blocks, block_size, KVH, D] -> [T, H, D].
    Writes the step's k/v into their slots, then attends through `meta`'s backend."""
    return meta.backend.forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)


def select_backend(name: str, spec: AttentionSpec, native=None) -> AttentionBackend:
    """The backend `name` for a model (`spec`) on `spec.device`; `native` is the compiled CPU
    kernels module (or None). Raises ValueError where an explicit choice cannot run."""
    from .cpu_backend import CpuBackend
    from .torch_backend import TorchBackend

    if name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    on_cpu = spec.device.type == "cpu"
    if name == "torch":
        return TorchBackend(spec)
    if name == "cpu":
        reason = CpuBackend.unsupported(spec, native)
        if reason:
            raise ValueError(f"attention_backend 'cpu': {reason}")
        return CpuBackend(spec, native)
    if name == "triton":
        from .triton_backend import TritonBackend

        reason = TritonBackend.unsupported(spec)
        if reason:
            raise ValueError(f"attention_backend 'triton': {reason}")
        return TritonBackend(spec)
    # auto
    if on_cpu:
        reason = CpuBackend.unsupported(spec, native)
        if not reason:
            return CpuBackend(spec, native)
        log.info("attention: torch backend (cpu backend: %s)", reason)
        return TorchBackend(spec)
    from .triton_backend import TritonBackend

    reason = TritonBackend.unsupported(spec) or TritonBackend.self_check(spec)
    if not reason:
        return TritonBackend(spec)
    log.warning("attention: torch backend (triton backend: %s)", reason)
    return TorchBackend(spec)


__all__ = ["AttentionBackend", "AttentionSpec", "BACKENDS", "StepLayout", "paged_attention", "select_backend"]
