"""The Triton backend: every row of the step, decode or prefill, in one paged flash-attention
launch per layer (see triton_kernels), K/V read in place through the block table; no masks, no
gathers, no per-chunk Python loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionBackend, AttentionSpec, StepLayout

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Split-KV when the step is all decode rows and this few (sequence, KV head) programs would
# leave most of a GPU's SMs idle; each then takes 1/NUM_SEGMENTS of the context.
SPLIT_MAX_PROGRAMS = 256
SPLIT_MIN_CONTEXT = 1024
NUM_SEGMENTS = 16


@dataclass
class TritonMetadata:
    """query_start_loc: [B+1] first row of each sequence's chunk (int32)
    seq_lens:        [B]   tokens in the cache after this step (int32)
    block_tables:    [B, W] (int32)
    slot_mapping:    [T]   flat cache slot of each row (int64; -1: padding, not stored)"""

    backend: AttentionBackend
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    num_seqs: int
    max_query_len: int
    num_segments: int = 1


def launch_config(group: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, TILE): BLOCK_M rows per program hold BLOCK_Q query tokens x `group`
    heads; tl.dot needs at least 16 rows."""
    block_m = 16 if group <= 16 else triton_next_pow2(group)
    block_q = block_m // group
    tile = 64 if max_query_len == 1 else 32
    return block_m, block_q, tile


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, spec: AttentionSpec, num_segments: int | None = None):
        """`num_segments`: force split-KV with this many segments (a power of two), or 1 to
        disable it; None chooses per step."""
        super().__init__(spec)
        from . import triton_kernels

        self.kernels = triton_kernels
        self.forced_segments = num_segments

    @staticmethod
    def unsupported(spec: AttentionSpec) -> str | None:
        try:
            from . import triton_kernels
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        if spec.device.type != "cuda" and not triton_kernels.interpreted():
            return "needs a CUDA device (or Triton's interpreter, TRITON_INTERPRET=1, for tests on the CPU)"
        if spec.cache_dtype not in CACHE_DTYPES:
            return f"no kernel for a {spec.cache_dtype} cache"
        if spec.head_dim > 256:
            return f"head_dim {spec.head_dim} is over 256"
        return None

    @staticmethod
    def self_check(spec: AttentionSpec) -> str | None:
        """Compile and run the kernels once on a small paged batch and compare with the torch
        backend; the reason they cannot be used, or None."""
        from .check import compare_backends

        try:
            err = compare_backends(spec, TritonBackend(spec))
        except Exception as exc:  # noqa: BLE001 - any compile or launch failure means: don't use it
            return f"self-check failed: {type(exc).__name__}: {exc}"
        return None if err < 2e-2 else f"self-check: max error {err:.3g} against torch"

    def build_metadata(self, layout: StepLayout) -> TritonMetadata:
        dev = self.spec.device
        lens = layout.lens
        query_start_loc = torch.zeros(len(lens) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=query_start_loc[1:])
        seq_lens = layout.context_lens.to(torch.int32)
        max_query_len = int(lens.max())
        segments = self.forced_segments or self._segments(len(lens), max_query_len, int(seq_lens.max()))
        host = (layout.slot_mapping, query_start_loc, seq_lens, layout.block_tables.to(torch.int32))
        slots, qsl, sl, tables = (t.to(dev, non_blocking=True) for t in host)
        return TritonMetadata(self, slots, qsl, sl, tables, len(lens), max_query_len, segments)

    def _segments(self, num_seqs: int, max_query_len: int, max_seq_len: int) -> int:
        few = num_seqs * self.spec.num_kv_heads < SPLIT_MAX_PROGRAMS
        return NUM_SEGMENTS if max_query_len == 1 and few and max_seq_len >= SPLIT_MIN_CONTEXT else 1

    def graph_segments(self, num_seqs: int) -> int:
        """Split-KV for a captured decode graph of `num_seqs` rows, whose contexts vary from
        replay to replay: decided by the batch size alone (empty segments cost little)."""
        return NUM_SEGMENTS if num_seqs * self.spec.num_kv_heads < SPLIT_MAX_PROGRAMS else 1

    def forward(self, q, k, v, k_cache, v_cache, meta: TritonMetadata, scale, window, softcap):
        self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale, window, softcap)

    def store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """k/v [T, KVH, D] (rows contiguous) into their slots, converted to the cache's dtype."""
        t, kvh, d = k.shape
        k, v = _rows_contiguous(k), _rows_contiguous(v)
        assert k_cache.stride(2) == d and k_cache.stride(3) == 1, "cache rows must be contiguous"
        row = kvh * d
        self.kernels._store_kv[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                     k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                     BLOCK_SIZE=k_cache.shape[1], ROW=row, ROW_P=triton_next_pow2(row))

    def attend(self, q, k_cache, v_cache, meta: TritonMetadata, scale, window, softcap) -> torch.Tensor:
        t, num_heads, head_dim = q.shape
        if q.stride(2) != 1:
            q = q.contiguous()
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        block_m, block_q, tile = launch_config(group, meta.max_query_len)
        head_dim_p = triton_next_pow2(max(head_dim, 16))
        out = torch.empty(t, num_heads, head_dim, dtype=q.dtype, device=q.device)
        segments = meta.num_segments
        if segments > 1:
            part_acc = torch.empty(t * num_heads * segments * head_dim_p, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(t * num_heads * segments * 2, dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out                                  # unused
        grid = (t // block_q + meta.num_seqs, num_kv_heads, segments)
        self.kernels._paged_attention[grid](
            out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, part_acc, part_ml,
            float(scale), float(softcap or 0.0), int(window or 0), meta.num_seqs,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
            NUM_HEADS=num_heads, QPK=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_M=block_m, TILE=tile,
            USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None, NUM_SEGMENTS=segments,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            DOT_FP32=q.dtype == torch.bfloat16 and self.kernels.interpreted())
        if segments > 1:
            self.kernels._reduce_segments[(t, num_heads)](
                out, part_acc, part_ml, out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                HEAD_DIM_P=head_dim_p, NUM_SEGMENTS=segments)
        return out


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[T, KVH, D] with each token's KVH * D values contiguous (a view from a fused qkv is)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()
