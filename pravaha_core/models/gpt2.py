"""GPT-2: learned positions, LayerNorm, fused c_attn, GELU MLP, tied LM head."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from ..attention import paged_attention
from .weights import load_named_weights

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        hidden = cfg["n_embd"]
        self.num_heads = cfg["n_head"]
        self.head_dim = hidden // self.num_heads
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        scale = self.head_dim ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x, meta, kv_cache):
        t = x.shape[0]
        q, k, v = (p.view(t, self.num_heads, self.head_dim) for p in self.c_attn(x).chunk(3, dim=-1))
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, None)
        return self.c_proj(o.reshape(t, -1))


class GPT2Block(nn.Module):
    def __init__(self, cfg: dict, layer_idx: int):
        super().__init__()
        hidden, eps = cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5)
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"activation_function {act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        inner = cfg.get("n_inner") or 4 * hidden
        self.c_fc = nn.Linear(hidden, inner)
        self.c_proj = nn.Linear(inner, hidden)

    def forward(self, x, meta, kv_cache):
        x = x + self.attn(self.ln_1(x), meta, kv_cache)
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: dict, max_len: int, native=None):     # no native fast path (LayerNorm, GELU)
        super().__init__()
        self.num_layers = cfg["n_layer"]
        self.num_heads = self.num_kv_heads = cfg["n_head"]
        self.head_dim = cfg["n_embd"] // cfg["n_head"]
        self.vocab_size = cfg["vocab_size"]
        self.sliding_windows = [None] * self.num_layers
        self.wte = nn.Embedding(self.vocab_size, cfg["n_embd"])
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(self.num_layers))
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg.get("layer_norm_epsilon", 1e-5))
        self.lm_head = None     # tied to wte; quantization may set a separate head

    def forward(self, input_ids, positions, meta, kv_caches) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, n_embd]."""
        x = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, meta, kv_cache)
        return self.ln_f(x)

    @property
    def tied_embedding(self) -> nn.Module | None:
        return self.wte if self.lm_head is None else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.wte.weight)
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str | None:
            name = name.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                return None  # causal-mask buffers; the LM head is tied to wte
            return name.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj.")

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            # HF's Conv1D stores [in, out]; nn.Linear wants [out, in].
            conv1d = name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc"))
            return tensor.t() if conv1d else tensor

        load_named_weights(self, weights, rename, transform=transform)
