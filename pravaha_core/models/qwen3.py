"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k before rotary, an
explicit head_dim and no q/k/v bias. Its attention, parametrized, also serves Phi-3 (partial
rotary) and Gemma (its own norm, scale and soft cap)."""

from __future__ import annotations

from torch import nn

from ..attention import paged_attention
from .layers import RMSNorm
from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class QKNormAttention(LlamaAttention):
    """Llama attention with optional per-head norms on q and k (class `qk_norm`; None: none)
    and an optional attention-logit soft cap. Rotary runs in torch: the fused rotary rotates
    whole heads only and sees q/k before the norms."""

    qk_norm: type[nn.Module] | None = RMSNorm

    def __init__(self, cfg: dict, head_dim: int, rotary, window: int | None, native=None):
        super().__init__(cfg, head_dim, rotary, window, native)
        eps = cfg.get("rms_norm_eps", 1e-6)
        if self.qk_norm is not None:
            self.q_norm = self.qk_norm(head_dim, eps)
            self.k_norm = self.qk_norm(head_dim, eps)
        self.softcap: float | None = None

    def forward(self, x, positions, meta, kv_cache):
        if self.qk_norm is None and self.softcap is None and self.rotary.rotary_dim == self.head_dim:
            return super().forward(x, positions, meta, kv_cache)       # plain Llama (fused rotary)
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)                   # [T, H, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)                # [T, KVH, D]
        if self.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window,
                            softcap=self.softcap)
        return self.o_proj(o.reshape(t, self.q_size))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = QKNormAttention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Serves model_type qwen3."""

    layer_cls = Qwen3DecoderLayer
