"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's changes.

- RMSNorm scales by (1 + weight), in float32; norms before and after attention and the MLP;
- the embedding is multiplied by sqrt(hidden); the LM head is tied to it;
- GeGLU MLP (tanh-approximated GELU);
- attention scale query_pre_attn_scalar ** -0.5; sliding-window and global layers alternate;
- Gemma 2: attention logits and final logits soft-capped (cap * tanh(x / cap));
- Gemma 3: per-head q/k norms, and its own rope base (and scaling) for the sliding layers.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .layers import RMSNorm, RotaryEmbedding
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, rope_config
from .qwen3 import QKNormAttention

GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), in float32 then cast back, as HF's Gemma norms."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        assert residual is None, "Gemma layers add their own residuals"
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(LlamaMLP):
    glu_projection = None        # the packed GEMM's fused epilogue is SiLU's, not GELU's

    @staticmethod
    def check_activation(cfg: dict) -> None:
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in GELU_TANH:
            raise ValueError(f"hidden_activation {act!r} is not supported (supported: {', '.join(GELU_TANH)})")

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma2Attention(QKNormAttention):
    qk_norm = None

    def __init__(self, cfg: dict, head_dim: int, rotary, window: int | None, native=None):
        super().__init__(cfg, head_dim, rotary, window, native)
        self.scale = float(cfg["query_pre_attn_scalar"]) ** -0.5
        self.softcap = self.attention_softcap(cfg)

    @staticmethod
    def attention_softcap(cfg: dict) -> float | None:
        return cfg.get("attn_logit_softcapping")


class Gemma3Attention(Gemma2Attention):
    qk_norm = GemmaRMSNorm

    @staticmethod
    def attention_softcap(cfg: dict) -> float | None:
        return None                  # HF's Gemma 3 attention ignores attn_logit_softcapping


class Gemma2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Gemma2Attention
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: dict, head_dim: int, rotary, window: int | None, layer_idx: int = 0, native=None):
        super().__init__(cfg, head_dim, rotary, window, layer_idx, native)
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.pre_feedforward_layernorm = self.norm_cls(cfg["hidden_size"], eps)
        self.post_feedforward_layernorm = self.norm_cls(cfg["hidden_size"], eps)

    def make_mlp(self, cfg: dict, layer_idx: int, native=None) -> nn.Module:
        return GemmaMLP(cfg)         # GeGLU: no fused op

    def forward(self, x, residual, positions, meta, kv_cache):
        """x [T, hidden] -> (x after this layer, None): Gemma keeps no separate residual stream."""
        h = self.self_attn(self.input_layernorm(x), positions, meta, kv_cache)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), None


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Serves model_type gemma2."""

    layer_cls = Gemma2DecoderLayer
    sliding_window_pattern = 2       # configs without layer_types: every 2nd layer global
    local_rope_theta: float | None = None    # configs without rope_local_base_freq: the global rope

    def __init__(self, cfg: dict, max_len: int, native=None):
        cfg = dict(cfg, tie_word_embeddings=cfg.get("tie_word_embeddings", True))
        if cfg.get("layer_types") is None:
            pattern = (cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                       or self.sliding_window_pattern)
            cfg["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                  for i in range(cfg["num_hidden_layers"])]
        super().__init__(cfg, max_len, native)
        self.layer_types = cfg["layer_types"]
        self.final_softcap = cfg.get("final_logit_softcapping")
        self.embed_scale = cfg["hidden_size"] ** 0.5

    def make_rotaries(self, cfg: dict, max_len: int) -> list[RotaryEmbedding]:
        """Sliding layers rotate by their own rope where the config gives one (Gemma 3)."""
        rope = cfg.get("rope_parameters") or {}
        if "full_attention" in rope:                   # transformers v5: one rope per layer type
            ropes = {t: rope_config(dict(cfg, rope_parameters=rope.get(t) or rope["full_attention"]))
                     for t in ("full_attention", "sliding_attention")}
        else:                                          # earlier: rope_local_base_freq for sliding layers
            ropes = {"full_attention": rope_config(cfg)}
            theta = (cfg.get("rope_local_base_freq") or self.local_rope_theta
                     or ropes["full_attention"]["rope_theta"])
            ropes["sliding_attention"] = rope_config(dict(cfg, rope_parameters={"rope_theta": theta}))
        tables = {t: RotaryEmbedding(self.head_dim, max_len, r) for t, r in ropes.items()}
        return [tables[t] for t in cfg["layer_types"]]

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, _ = layer(x, None, positions, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Serves model_type gemma3_text (the text-only checkpoints, e.g. Gemma 3 1B)."""

    layer_cls = Gemma3DecoderLayer
    sliding_window_pattern = 6
    local_rope_theta = 10000.0
