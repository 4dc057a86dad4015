"""The reference backend: SDPA over K/V gathered out of the blocks.

Rows come in two groups: decode rows first, attended as one padded batch over their gathered
blocks; then prefill chunks. Prefill chunks that all start their sequences attend to their own
K/V as one padded batch while they are short, else one by one, unpadded (see SPAN_MIN_MEAN_TOKENS);
a chunk that continues a sequence gathers its earlier blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionSpec, StepLayout

# Prefill chunks that all start their sequences attend as one padded batch while they average
# fewer tokens than this (per-call overhead wins); longer ones one by one, unpadded and causal
# (padding a batch of lengths 16..256 to the longest wastes over half the attention FLOPs).
SPAN_MIN_MEAN_TOKENS = 64


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
class TorchMetadata:
    backend: AttentionBackend
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


class TorchBackend(AttentionBackend):
    name = "torch"

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self.device = spec.device

    # ---- metadata ------------------------------------------------------------------------
    def build_metadata(self, layout: StepLayout) -> TorchMetadata:
        decode, prefill = self._decode_group(layout, masks=True), self._prefill_group(layout)
        return TorchMetadata(self, layout.slot_mapping.to(self.device), layout.num_decode, decode, prefill)

    def _decode_group(self, layout: StepLayout, masks: bool) -> AttentionGroup | None:
        nd = layout.num_decode
        if not nd:
            return None
        q_pos = layout.starts[:nd][:, None]
        return self._group(torch.arange(nd)[:, None], None, layout.block_tables[:nd], q_pos,
                           layout.context_lens[:nd], masks=masks)

    def _prefill_group(self, layout: StepLayout) -> AttentionGroup | None:
        nd = layout.num_decode
        if nd == layout.num_seqs:
            return None
        lens, starts = layout.lens[nd:], layout.starts[nd:]
        offsets = layout.offsets[nd:] - layout.offsets[nd]
        q_rel = torch.arange(int(lens.max()))[None, :]
        valid = q_rel < lens[:, None]
        q_index = torch.where(valid, offsets[:, None] + q_rel, 0)
        q_pos = torch.where(valid, starts[:, None] + q_rel, 0)
        if bool((starts == 0).all()) and float(lens.float().mean()) < SPAN_MIN_MEAN_TOKENS:
            return self._group(q_index, None if bool(valid.all()) else valid, layout.block_tables[nd:], q_pos,
                               layout.context_lens[nd:], direct=True)
        return self._spans(lens.tolist(), starts.tolist(), offsets.tolist(), layout.block_tables[nd:])

    def _spans(self, lens: list[int], starts: list[int], offsets: list[int], tables) -> AttentionGroup:
        """Prefill chunks attend one by one, unpadded (see AttentionGroup); a chunk that starts
        its sequence under full attention needs no mask (causal)."""
        dev, group = self.device, self.spec.group
        spans = list(zip(offsets, lens, starts))
        masks = {w: [None if start == 0 and w is None else
                     build_mask(torch.arange(start, start + rows)[None, :], start + rows, w, group).to(dev)
                     for _, rows, start in spans] for w in self.spec.windows}
        context_lens = torch.tensor(starts) + torch.tensor(lens)
        return AttentionGroup(torch.zeros(0, dtype=torch.long, device=dev), None,
                              self._cut(tables, context_lens).to(dev), context_lens.to(dev), masks, spans=spans)

    def _group(self, q_index, q_valid, tables, q_pos, context_lens, masks: bool = True,
               direct: bool = False) -> AttentionGroup:
        """Padded batch; block tables cut to the blocks the longest context needs. With
        `direct`, keys are the chunks' own tokens, so masks span the longest chunk only."""
        tables = self._cut(tables, context_lens)
        num_keys = q_index.shape[1] if direct else tables.shape[1] * self.spec.block_size
        dev = self.device
        built = ({w: build_mask(q_pos, num_keys, w, self.spec.group).to(dev) for w in self.spec.windows}
                 if masks else {})
        return AttentionGroup(q_index.to(dev), None if q_valid is None else q_valid.to(dev),
                              tables.to(dev), context_lens.to(dev), built, direct)

    def _cut(self, tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        width = -(-int(context_lens.max()) // self.spec.block_size)
        return tables[:, :width].contiguous()

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window, softcap):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if meta.decode is not None:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta.decode, scale, window, softcap)
        if meta.prefill is not None:
            out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta.prefill, scale, window, softcap)
        return out

    def _decode(self, q, k_cache, v_cache, grp: AttentionGroup, scale, window, softcap):
        return attend(q.unsqueeze(1), *gather(k_cache, v_cache, grp), grp.masks[window], scale, softcap).squeeze(1)

    def _prefill(self, q, k, v, k_cache, v_cache, grp: AttentionGroup, scale, window, softcap):
        if grp.spans is None:
            keys, values = (k[grp.q_index], v[grp.q_index]) if grp.direct else gather(k_cache, v_cache, grp)
            padded = attend(q[grp.q_index], keys, values, grp.masks[window], scale, softcap)
            return padded[grp.q_valid] if grp.q_valid is not None else padded.flatten(0, 1)
        out = torch.empty_like(q)
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        for row, ((first, rows, start), mask) in enumerate(zip(grp.spans, grp.masks[window])):
            span = slice(first, first + rows)
            if mask is None:              # starts its sequence, full attention: plain causal
                out[span] = attend_causal(q[span], k[span], v[span], scale, softcap)
                continue
            ctx = start + rows
            blocks = grp.block_tables[row, :-(-ctx // block_size)]
            keys = k_cache.index_select(0, blocks).view(1, -1, num_kv_heads, head_dim)[:, :ctx]
            values = v_cache.index_select(0, blocks).view(1, -1, num_kv_heads, head_dim)[:, :ctx]
            out[span] = attend(q[span].unsqueeze(0), keys, values, mask, scale, softcap).squeeze(0)
        return out


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k/v [T, KVH, D] into their flat slots. The cache may be narrower than the model
    (kv_cache_dtype): stored rounded, read widened."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather(k_cache: torch.Tensor, v_cache: torch.Tensor, grp: AttentionGroup):
    """The group's blocks as [B, M * block_size, KVH, D] keys and values."""
    b, m = grp.block_tables.shape
    flat = grp.block_tables.flatten()
    shape = (b, m * k_cache.shape[1], k_cache.shape[2], k_cache.shape[3])
    return k_cache.index_select(0, flat).view(shape), v_cache.index_select(0, flat).view(shape)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  softcap: float | None = None) -> torch.Tensor:
    """One sequence's own tokens: q [L, H, D], k/v [L, KVH, D] -> [L, H, D]. K/V heads are
    repeated for GQA so that flash attention can skip the blocks above the diagonal."""
    group = q.shape[1] // k.shape[1]
    k, v = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) if group > 1 else (k, v)
    # 4-D: torch's CPU flash kernel takes [B, H, L, D] only (3-D falls back to the math path, 3x slower)
    out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, scale, softcap)
    return out[0].transpose(0, 1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float, softcap: float | None = None) -> torch.Tensor:
    """q: [B, Q, H, D], keys/values: [B, L, KVH, D] -> [B, Q, H, D]."""
    b, nq, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    keys, values = keys.to(q.dtype), values.to(q.dtype)            # no-op unless kv_cache_dtype differs
    group = num_heads // num_kv_heads
    # Heads h = kv * group + g share KV head kv: fold the group into the query axis.
    q = q.view(b, nq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(b, num_kv_heads, group * nq, head_dim)
    out = _sdpa(q, keys.transpose(1, 2), values.transpose(1, 2), mask, scale, softcap)
    out = out.view(b, num_kv_heads, group, nq, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, nq, num_heads, head_dim)


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float, softcap: float | None) -> torch.Tensor:
    """SDPA; `mask` None means causal. With `softcap`, logits become softcap * tanh(logits /
    softcap) before masking (Gemma 2), which SDPA cannot do: the math path, softmax in float32."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    logits = softcap * torch.tanh(logits / softcap)
    if mask is None:
        n, m = logits.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(logits.softmax(-1), v.float()).to(q.dtype)
