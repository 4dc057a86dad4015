"""Mixture-of-experts decoders: Mixtral (Llama attention) and Qwen3-MoE (Qwen3 attention).

Each token goes to its top-k experts. The experts run grouped: the (token, expert) pairs are
sorted by expert, and each expert that received tokens runs once, as one gate/up and one down
matmul over exactly its tokens. Every expert is a `LlamaMLP` of plain linears, so int8 and GPTQ
quantize experts like any other linear layer; the router stays in float (a GPTQ checkpoint keeps
it so), since a rounded router would send tokens elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from .qwen3 import QKNormAttention


class Router(nn.Module):
    """The router's [num_experts, hidden] weight, kept out of `nn.Linear` so that quantization
    and weight packing leave it alone."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoE(nn.Module):
    """Softmax over the router logits (float32), top-k, then (`renormalize`) the k weights
    divided by their sum, as HF's Mixtral always does and Qwen3-MoE does under norm_topk_prob."""

    def __init__(self, cfg: dict, intermediate_size: int, renormalize: bool):
        super().__init__()
        self.num_experts = cfg.get("num_local_experts") or cfg["num_experts"]
        self.top_k = cfg["num_experts_per_tok"]
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")
        self.renormalize = renormalize
        self.gate = Router(cfg["hidden_size"], self.num_experts)
        expert_cfg = dict(cfg, intermediate_size=intermediate_size)
        self.experts = nn.ModuleList(LlamaMLP(expert_cfg) for _ in range(self.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> weights [T, k] (float32), expert ids [T, k]."""
        probs = self.gate(x).softmax(-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        pairs = experts.flatten().argsort(stable=True)           # [T*k] (token, slot) pairs by expert
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        for expert, rows in zip(self.experts, pairs.split(counts)):
            if rows.numel() == 0:
                continue
            tokens = rows // self.top_k
            y = expert(x[tokens]) * weights.flatten()[rows, None]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: dict, layer_idx: int, native=None) -> nn.Module:
        return SparseMoE(cfg, cfg["intermediate_size"], renormalize=True)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = QKNormAttention

    def make_mlp(self, cfg: dict, layer_idx: int, native=None) -> nn.Module:
        step = cfg.get("decoder_sparse_step", 1)
        num_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
        if layer_idx in (cfg.get("mlp_only_layers") or []) or num_experts == 0 or (layer_idx + 1) % step:
            return LlamaMLP(cfg, native)
        return SparseMoE(cfg, cfg["moe_intermediate_size"], renormalize=bool(cfg.get("norm_topk_prob", False)))


def refuse_quantized_router(name: str) -> None:
    if name.endswith((".gate.qweight", ".gate.codes")):
        raise ValueError(f"checkpoint tensor {name!r}: a quantized MoE router is not supported (the "
                         "experts may be quantized; keep the router, mlp.gate, in float, e.g. in "
                         "modules_to_not_convert)")


class MixtralForCausalLM(LlamaForCausalLM):
    """Serves model_type mixtral. Checkpoint experts: block_sparse_moe.experts.E.w1 (gate),
    w3 (up), w2 (down)."""

    layer_cls = MixtralDecoderLayer
    stacked_params = LlamaForCausalLM.stacked_params + [("gate_up_proj", "w1", 0), ("gate_up_proj", "w3", 1)]

    def checkpoint_name(self, name: str) -> str | None:
        refuse_quantized_router(name)
        name = super().checkpoint_name(name)
        if name is None:
            return None
        return name.replace(".block_sparse_moe.", ".mlp.").replace(".w2.", ".down_proj.")


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Serves model_type qwen3_moe (experts named like Llama's MLP: mlp.experts.E.gate_proj ...)."""

    layer_cls = Qwen3MoeDecoderLayer

    def checkpoint_name(self, name: str) -> str | None:
        refuse_quantized_router(name)
        return super().checkpoint_name(name)
