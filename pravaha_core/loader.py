"""Resolve a model spec (directory, hub id, dummy:<preset>) into weights, config and tokenizer."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels, quantization
from .config import EngineConfig
from .models import context_length, model_class
from .models.layers import onto_huge_pages, pack_linears, panel_gemm_preferred
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger("pravaha.loader")
_BYTE_VOCAB_EXTRA = {"bos_token_id": ByteTokenizer.BOS, "eos_token_id": ByteTokenizer.EOS}

PRESETS: dict[str, dict] = {
    "gpt2-tiny": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 512,
                  "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "llama-tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
                   "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 172, "max_position_embeddings": 2048,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
    # SmolLM2-135M's shape.
    "llama-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
                   "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True},
}
for _preset in PRESETS.values():
    _preset.update(_BYTE_VOCAB_EXTRA)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    hf_config: dict
    max_model_len: int
    quant: quantization.QuantSpec | None = None


def load_model(config: EngineConfig, cpu: kernels.CpuPlatform | None = None) -> LoadedModel:
    """Build our model for `config.model`, with weights on `config.device` in `config.dtype`;
    on the CPU, `cpu` (from kernels.setup_cpu) gives the native kernels and huge pages."""
    if config.model.startswith("dummy:"):
        hf_config, path = _preset(config.model), None
    else:
        path = resolve_checkpoint(config.model)
        hf_config = read_json(os.path.join(path, "config.json"))
    cls = model_class(hf_config)
    max_len = _max_model_len(hf_config, config.max_model_len)
    dummy = path is None or config.load_format == "dummy"
    spec = quantization.resolve(config.quantization, hf_config, from_preset=dummy)
    packed = spec is not None and spec.method in ("gptq", "awq")
    dtype = DTYPES[config.dtype]
    native = cpu.native if cpu is not None and dtype == torch.float32 else None
    if torch.device(config.device).type == "cuda":
        native = _triton_ops(torch.device(config.device), dtype)
    torch.manual_seed(config.seed)
    with torch.device(config.device):
        model = cls(hf_config, max_len, native)
    model.to(dtype)
    if dummy:
        init_dummy_weights(model, config.seed)
        tokenizer: Tokenizer = (ByteTokenizer(hf_config["vocab_size"]) if path is None
                                else HFTokenizer(config.tokenizer or path, eos_ids(path, hf_config)))
    else:
        if packed:
            quantization.prepare(model, spec)
        weights = iter_checkpoint(path)
        with torch.no_grad():
            model.load_weights(quantization.decode_checkpoint(weights, spec) if packed else weights)
        tokenizer = HFTokenizer(config.tokenizer or path, eos_ids(path, hf_config))
    with torch.no_grad():
        if spec is not None and dummy and packed:
            quantization.quantize_rtn(model, spec, dtype)
        elif spec is not None:
            quantization.finalize(model, spec, dtype)
    if config.native_kernels and cpu is not None and dtype == torch.float32:
        log.info("packed float32 linear layers (%s): %d", "native panel GEMM" if panel_gemm_preferred(native)
                 else "oneDNN", pack_linears(model, native))
        moved = onto_huge_pages(model) if cpu.huge_pages else 0
        if moved:
            log.info("weights on transparent huge pages: %d MiB", moved >> 20)
    model.eval()
    return LoadedModel(model, tokenizer, hf_config, max_len, spec)


def _triton_ops(device: torch.device, dtype: torch.dtype):
    """The fused Triton ops for the layers on CUDA, where Triton works; else None (plain torch)."""
    try:
        from .triton_ops import TritonOps, self_check
    except ImportError as exc:
        log.info("fused Triton ops off: %s", exc)
        return None
    reason = self_check(device, dtype)
    if reason:
        log.warning("fused Triton ops off: %s", reason)
        return None
    return TritonOps()


def _preset(spec: str) -> dict:
    name = spec.removeprefix("dummy:")
    if name not in PRESETS:
        raise ValueError(f"unknown dummy preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def _max_model_len(hf_config: dict, requested: int | None) -> int:
    native = context_length(hf_config)
    if requested is not None and requested > native:
        raise ValueError(f"max_model_len: {requested} exceeds the model's context length {native}")
    return requested or native


def resolve_checkpoint(spec: str) -> str:
    """A local directory as is; otherwise an HF hub id fetched through the normal HF cache."""
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"model directory {spec!r} has no config.json")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/")):
        raise ValueError(f"model path {spec!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken"]
    try:
        return snapshot_download(spec, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ValueError(f"could not fetch model {spec!r} from the HF hub (or its cache): {exc}") from exc


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from *.safetensors, else pytorch_model*.bin (weights_only)."""
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if shards:
        from safetensors.torch import safe_open

        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path!r}")
    for shard in bins:
        yield from torch.load(shard, map_location="cpu", weights_only=True, mmap=True).items()


def eos_ids(path: str, hf_config: dict) -> set[int]:
    """EOS ids as HF generate sees them: generation_config.json first, then config.json."""
    gen_path = os.path.join(path, "generation_config.json")
    for source in (read_json(gen_path) if os.path.isfile(gen_path) else {}, hf_config):
        eos = source.get("eos_token_id")
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {int(eos)}
    return set()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights like HF's init: N(0, 0.02) matrices, unit norms, zero biases."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if name.endswith("weight") else 0.0)  # norm scales; biases
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
