"""Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm, rotary, GQA, SwiGLU.

Weights use HF's names but q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from ..attention import paged_attention
from .layers import RMSNorm, RotaryEmbedding, fusable
from .weights import load_named_weights


def rope_config(cfg: dict) -> dict:
    """HF's rope settings across config versions (`rope_parameters` in v5, else `rope_scaling`)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rope.setdefault("max_position_embeddings", cfg.get("max_position_embeddings"))
    if cfg.get("original_max_position_embeddings"):     # Phi-3 keeps it outside, and HF prefers it
        rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return rope


def sliding_windows(cfg: dict, num_layers: int) -> list[int | None]:
    """Per-layer sliding window (None: full attention), following HF's rules per family."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") in ("qwen2", "qwen3", "qwen3_moe"):
        if not cfg.get("use_sliding_window") or window is None:
            return [None] * num_layers
        if layer_types is None:
            start = cfg.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
    if window is None:
        return [None] * num_layers
    if layer_types is None:
        return [window] * num_layers
    return [window if t == "sliding_attention" else None for t in layer_types]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict, head_dim: int, rotary: RotaryEmbedding, window: int | None, native=None):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = head_dim
        qkv_bias = cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2"
        o_bias = cfg.get("attention_bias", False) and cfg.get("model_type") != "qwen2"
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.rotary = rotary
        self.window = window
        self.scale = head_dim ** -0.5
        self.native = native            # fused ops (CPU kernels or Triton ops), or None

    def forward(self, x, positions, meta, kv_cache):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        fused = fusable(self.native, qkv) and qkv.is_contiguous()
        if fused:                                       # rotate q and k in place, in one pass
            self.native.rotary_(qkv, positions, self.rotary.cos, self.rotary.sin,
                               self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if not fused:
            q, k = self.rotary(positions, q, k)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return self.o_proj(o.view(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict, native=None):
        super().__init__()
        self.check_activation(cfg)
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        bias = cfg.get("mlp_bias", False)
        self.inter = inter
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.native = native            # fused ops (CPU kernels or Triton ops), or None

    glu_projection = "gate_up_proj"   # pack_linears may fuse silu(gate) * up into its GEMM

    @staticmethod
    def check_activation(cfg: dict) -> None:
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (supported: silu)")

    def forward(self, x):
        if getattr(self.gate_up_proj, "glu", False):
            return self.down_proj(self.gate_up_proj(x))
        gate_up = self.gate_up_proj(x)
        if fusable(self.native, gate_up) and gate_up.dim() == 2:
            return self.down_proj(self.native.silu_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = LlamaAttention
    norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, cfg: dict, head_dim: int, rotary: RotaryEmbedding, window: int | None,
                 layer_idx: int = 0, native=None):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = self.norm_cls(cfg["hidden_size"], eps, native)
        self.self_attn = self.attention_cls(cfg, head_dim, rotary, window, native)
        self.post_attention_layernorm = self.norm_cls(cfg["hidden_size"], eps, native)
        self.mlp = self.make_mlp(cfg, layer_idx, native)

    def make_mlp(self, cfg: dict, layer_idx: int, native=None) -> nn.Module:
        return LlamaMLP(cfg, native)

    def forward(self, x, residual, positions, meta, kv_cache):
        """x: the previous layer's output, residual: the stream before it (None at layer 0) ->
        (this layer's output, the stream before it). The adds go into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Serves model_type llama, mistral and qwen2; the other Llama-like families subclass it.
    `native`: fused ops for the layers (the compiled CPU kernels for float32, or the Triton ops
    on CUDA), or None."""

    layer_cls: type[nn.Module] = LlamaDecoderLayer

    # (our fused parameter, HF's piece, shard index)
    stacked_params = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def __init__(self, cfg: dict, max_len: int, native=None):
        super().__init__()
        self.num_layers = cfg["num_hidden_layers"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.num_heads
        self.vocab_size = cfg["vocab_size"]
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.sliding_windows = sliding_windows(cfg, self.num_layers)
        rotaries = self.make_rotaries(cfg, max_len)
        self.embed_tokens = nn.Embedding(self.vocab_size, cfg["hidden_size"])
        self.layers = nn.ModuleList(self.layer_cls(cfg, self.head_dim, rotary, w, i, native)
                                    for i, (rotary, w) in enumerate(zip(rotaries, self.sliding_windows)))
        self.norm = self.layer_cls.norm_cls(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6), native)
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(cfg["hidden_size"], self.vocab_size,
                                                                       bias=False)

    def make_rotaries(self, cfg: dict, max_len: int) -> list[RotaryEmbedding]:
        """Each layer's rotary embedding (one shared by all here)."""
        return [RotaryEmbedding(self.head_dim, max_len, rope_config(cfg))] * self.num_layers

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, meta, kv_cache)
        return self.norm(x, residual)[0]

    @property
    def tied_embedding(self) -> nn.Module | None:
        """The embedding that doubles as the LM head, while no separate head is set."""
        return self.embed_tokens if self.lm_head is None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, weights, self.checkpoint_name, self.stacked_params, self.shard_sizes)

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter name for an HF checkpoint tensor's (None: not loaded)."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        return name.removeprefix("model.")

    def shard_sizes(self, name: str) -> list[int]:
        """Dim-0 sizes of the pieces stacked into the fused parameter `name`."""
        attn = self.layers[0].self_attn
        if "qkv_proj" in name:
            return [attn.q_size, attn.kv_size, attn.kv_size]
        return [self.get_submodule(name.rpartition(".")[0]).out_features // 2] * 2    # gate_up_proj
