"""Paged attention: write the step's K/V into blocks, then attend.

Per step the runner builds one `AttentionMetadata`; every layer reuses it. Tokens of the
flat batch come in two groups: single-token chunks (decode) first, then multi-token chunks
(prefill). Decode attends straight from the blocks with the native CPU kernel when it is
built, else as a padded batch over gathered blocks. Prefill chunks that start a sequence
attend to their own K/V; later chunks gather their earlier blocks. Where the kernel's AVX-512
tile path applies (see model_runner.KERNEL_PREFILL_MAX_CONTEXT), the runner makes every token
of the step a decode-style row instead: one kernel call, each row over its causal context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AttentionGroup:
    """Sequences attended together as one padded batch.

    q_index:      [B, Q]  rows of the group's tokens for each query (padding: row 0)
    q_valid:      [B, Q]  False on padding (None when no padding)
    block_tables: [B, M]  block ids per sequence (padding: block 0, masked out)
    context_lens: [B]     tokens each query row's sequence has in the cache after this step
    masks:        window -> [B, 1, G*Q, K] bool, True where a query may see a key
    direct:       keys are the group's own new tokens (every chunk starts its sequence)
    spans:        prefill chunks attended one by one, unpadded: (first row, rows, start) per
                  chunk, and masks[window] a list of [1, 1, G*rows, start+rows] masks, one per
                  chunk; None for a chunk that starts its sequence under full attention, which
                  attends causally to its own K/V without reading the cache
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor | None
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    masks: dict[int | None, torch.Tensor]
    direct: bool = False
    spans: list[tuple[int, int, int]] | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] flat cache slot for each token of the batch
    num_decode_tokens: int            # tokens [0, num_decode_tokens) form the decode group
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    kernel: object | None = None      # the native paged-decode module, when usable


def build_mask(q_pos: torch.Tensor, num_keys: int, window: int | None, group: int) -> torch.Tensor:
    """q_pos: [B, Q] absolute query positions -> [B, 1, group*Q, num_keys] causal (+window) mask."""
    k_pos = torch.arange(num_keys, device=q_pos.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]                     # [B, Q, K]
    if window is not None:
        mask &= k_pos[None, None, :] > (q_pos[:, :, None] - window)
    b, q, k = mask.shape
    return mask[:, None, None].expand(b, 1, group, q, k).reshape(b, 1, group * q, k)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], caches: [num_blocks, block_size, KVH, D] -> [T, H, D].
    `softcap`: scores become softcap * tanh(scores / softcap) (Gemma 2), in torch only."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if (meta.kernel is not None and softcap is None and meta.prefill is None and meta.decode is not None
            and q.dtype == torch.float32 and k_cache.dtype in NATIVE_CACHE_DTYPES):
        # Every row attends through the kernel (decode, or prompt rows where the kernel's tile
        # path serves prefill): one native call writes the step's K/V (rounded to a narrower
        # cache as Tensor.to rounds) and attends.
        grp = meta.decode
        return meta.kernel.paged_attention_step(q, k, v, k_cache, v_cache, meta.slot_mapping, grp.block_tables,
                                                grp.context_lens, scale, window or -1)
    # The cache may be narrower than the model (kv_cache_dtype): stored rounded, read widened.
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if meta.decode is not None:
        grp = meta.decode
        if softcap is not None:       # each row is one query at position context_len - 1
            mask = build_mask(grp.context_lens[:, None] - 1, grp.block_tables.shape[1] * k_cache.shape[1],
                              window, q.shape[1] // num_kv_heads)
            out[:nd] = _attend(q[:nd].unsqueeze(1), *_gather(k_cache, v_cache, grp), mask, scale,
                               softcap).squeeze(1)
        elif meta.kernel is not None:
            out[:nd] = meta.kernel.paged_decode_attention(
                q[:nd].float(), k_cache, v_cache, grp.block_tables, grp.context_lens, scale,
                window or -1).to(q.dtype)
        else:
            out[:nd] = _attend(q[:nd].unsqueeze(1), *_gather(k_cache, v_cache, grp), grp.masks[window],
                               scale).squeeze(1)
    if meta.prefill is not None and meta.prefill.spans is not None:
        grp = meta.prefill
        block_size = k_cache.shape[1]
        for row, ((first, rows, start), mask) in enumerate(zip(grp.spans, grp.masks[window])):
            span = slice(nd + first, nd + first + rows)
            if mask is None:              # starts its sequence, full attention: plain causal
                out[span] = _attend_causal(q[span], k[span], v[span], scale, softcap)
                continue
            ctx = start + rows
            blocks = grp.block_tables[row, :-(-ctx // block_size)]
            keys = k_cache.index_select(0, blocks).view(1, -1, num_kv_heads, head_dim)[:, :ctx]
            values = v_cache.index_select(0, blocks).view(1, -1, num_kv_heads, head_dim)[:, :ctx]
            out[span] = _attend(q[span].unsqueeze(0), keys, values, mask, scale, softcap).squeeze(0)
    elif meta.prefill is not None:
        grp = meta.prefill
        keys, values = ((k[nd:][grp.q_index], v[nd:][grp.q_index]) if grp.direct
                        else _gather(k_cache, v_cache, grp))
        padded = _attend(q[nd:][grp.q_index], keys, values, grp.masks[window], scale, softcap)
        out[nd:] = padded[grp.q_valid] if grp.q_valid is not None else padded.flatten(0, 1)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, grp: AttentionGroup):
    """The group's blocks as [B, M * block_size, KVH, D] keys and values."""
    b, m = grp.block_tables.shape
    flat = grp.block_tables.flatten()
    shape = (b, m * k_cache.shape[1], k_cache.shape[2], k_cache.shape[3])
    return k_cache.index_select(0, flat).view(shape), v_cache.index_select(0, flat).view(shape)


def _attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   softcap: float | None = None) -> torch.Tensor:
    """One sequence's own tokens: q [L, H, D], k/v [L, KVH, D] -> [L, H, D]. K/V heads are
    repeated for GQA so that flash attention can skip the blocks above the diagonal."""
    if softcap is not None:
        positions = torch.arange(q.shape[0], device=q.device)[None]
        mask = build_mask(positions, q.shape[0], None, q.shape[1] // k.shape[1])
        return _attend(q[None], k[None], v[None], mask, scale, softcap)[0]
    group = q.shape[1] // k.shape[1]
    k, v = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) if group > 1 else (k, v)
    # 4-D: torch's CPU flash kernel takes [B, H, L, D] only (3-D falls back to the math path, 3x slower)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scale: float, softcap: float | None = None) -> torch.Tensor:
    """q: [B, Q, H, D], keys/values: [B, L, KVH, D] -> [B, Q, H, D]."""
    b, nq, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    keys, values = keys.to(q.dtype), values.to(q.dtype)            # no-op unless kv_cache_dtype differs
    group = num_heads // num_kv_heads
    # Heads h = kv * group + g share KV head kv: fold the group into the query axis.
    q = q.view(b, nq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, num_kv_heads, group * nq, head_dim)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
    else:
        out = _softcapped(q, keys.transpose(1, 2), values.transpose(1, 2), mask, scale, softcap)
    out = out.view(b, num_kv_heads, group, nq, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, nq, num_heads, head_dim)


def _softcapped(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    """Attention as HF's eager Gemma 2: q [B, KVH, Q, D], k/v [B, KVH, K, D], mask [B, 1, Q, K]."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return probs @ v
