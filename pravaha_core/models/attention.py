"""Paged attention in plain torch: write the step's K/V into blocks, gather, attend.

Per step the runner builds one `AttentionMetadata`; every layer reuses it. Tokens of the
flat batch come in two groups: single-token chunks (decode) first, then multi-token chunks
(prefill), each group attended as a padded batch over its sequences' gathered blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended together as one padded batch.

    q_index:      [B, Q]  rows of the group's tokens for each query (padding: row 0)
    q_valid:      [B, Q]  False on padding (None when no padding)
    block_tables: [B, M]  block ids per sequence (padding: block 0, masked out)
    masks:        window -> [B, 1, G*Q, M*block_size] bool, True where a query may see a key
    """

    q_index: torch.Tensor
    q_valid: torch.Tensor | None
    block_tables: torch.Tensor
    masks: dict[int | None, torch.Tensor]

    @property
    def num_queries(self) -> int:
        return self.q_index.shape[1]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] flat cache slot for each token of the batch
    num_decode_tokens: int            # tokens [0, num_decode_tokens) form the decode group
    decode: AttentionGroup | None
    prefill: AttentionGroup | None


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
                    meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], caches: [num_blocks, block_size, KVH, D] -> [T, H, D]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if meta.decode is not None:
        out[:nd] = _attend_group(q[:nd], k_cache, v_cache, meta.decode, scale, window).squeeze(1)
    if meta.prefill is not None:
        grp = meta.prefill
        q_pre = q[nd:]
        padded = _attend_group(q_pre[grp.q_index], k_cache, v_cache, grp, scale, window)
        out[nd:] = padded[grp.q_valid] if grp.q_valid is not None else padded.flatten(0, 1)
    return out


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  grp: AttentionGroup, scale: float, window: int | None) -> torch.Tensor:
    """q: [B, Q, H, D] (or [B, H, D] for decode) -> [B, Q, H, D]."""
    if q.dim() == 3:
        q = q.unsqueeze(1)
    b, nq, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = k_cache[grp.block_tables].flatten(1, 2).transpose(1, 2)      # [B, KVH, L, D]
    values = v_cache[grp.block_tables].flatten(1, 2).transpose(1, 2)    # [B, KVH, L, D]
    # Heads h = kv * group + g share KV head kv: fold the group into the query axis.
    q = q.view(b, nq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, num_kv_heads, group * nq, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=grp.masks[window], scale=scale)
    out = out.view(b, num_kv_heads, group, nq, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, nq, num_heads, head_dim)
