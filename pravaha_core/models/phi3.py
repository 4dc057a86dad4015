"""Phi-3 / Phi-4-mini: the Llama decoder with q/k/v and gate/up already fused in the checkpoint
(`qkv_proj`, `gate_up_proj`, our own layout), optionally partial rotary, longrope scaling."""

from __future__ import annotations

from .llama import LlamaDecoderLayer, LlamaForCausalLM
from .qwen3 import QKNormAttention


class Phi3Attention(QKNormAttention):
    qk_norm = None


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi3Attention


class Phi3ForCausalLM(LlamaForCausalLM):
    """Serves model_type phi3. The checkpoint's fused names are ours, so nothing is stacked."""

    layer_cls = Phi3DecoderLayer
    stacked_params = []
