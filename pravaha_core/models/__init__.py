"""Model families served by our own code, keyed by HF architecture name."""

from __future__ import annotations

from torch import nn

from .gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM
from .moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen3 import Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
               "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def model_class(hf_config: dict) -> type[nn.Module]:
    """The class for an HF config.json dict, or ValueError naming the supported ones."""
    names = list(hf_config.get("architectures") or [])
    if not names and hf_config.get("model_type") in MODEL_TYPES:
        names = [MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"model_type={hf_config.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)}")


def context_length(hf_config: dict) -> int:
    for key in ("max_position_embeddings", "n_positions"):
        if hf_config.get(key):
            return int(hf_config[key])
    raise ValueError("config.json gives no context length (max_position_embeddings / n_positions)")
