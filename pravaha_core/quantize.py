"""`pravaha quantize`: write a GPTQ checkpoint that the engine (or any GPTQ loader) serves.

method "rtn": round to nearest per group, packed in GPTQ v1 layout by our own code; no extra
packages, seconds per model, no calibration data. method "gptq": the real GPTQ algorithm through
gptqmodel (`pip install 'pravaha[gptq]'`), with calibration text.
"""

from __future__ import annotations

import json
import os
import shutil

from .loader import iter_checkpoint, read_json
from .models import ARCHITECTURES, model_class
from .quantization import GPTQ_BITS, pack_gptq, rtn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Files copied next to the weights (tokenizer, generation settings, chat template).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")
CALIBRATION = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The committee will meet on Tuesday to review the budget for next year.",
    "Redis streams keep an append-only log of entries with consumer groups.",
    "She opened the window, and the smell of rain filled the small kitchen.",
    "Prices rose by three percent last quarter, led by energy and housing.",
]


def quantize_checkpoint(source: str, out: str, method: str = "rtn", bits: int = 4, group_size: int = 128,
                        sym: bool = True, desc_act: bool = False, calibration: str | None = None) -> str:
    """Quantize the HF checkpoint directory `source` into `out`; returns a one-line summary."""
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"source {source!r} is not a checkpoint directory (no config.json)")
    cfg = read_json(config_path)
    if cfg.get("quantization_config"):
        raise ValueError(f"source {source!r} is already quantized "
                         f"({cfg['quantization_config'].get('quant_method')})")
    if model_class(cfg) is not ARCHITECTURES["LlamaForCausalLM"]:
        raise ValueError("pravaha quantize supports Llama, Mistral and Qwen2 checkpoints")
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits: {bits} is not one of {GPTQ_BITS}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size: {group_size} is not a positive size or -1")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output directory {out!r} exists and is not empty")
    if method == "gptq":
        return _with_gptqmodel(source, out, bits, group_size, sym, desc_act, calibration)
    if method != "rtn":
        raise ValueError(f"method: {method!r} is not 'rtn' or 'gptq'")
    if desc_act or calibration:
        raise ValueError("--desc-act and --calibration apply to --method gptq only")
    return _rtn_checkpoint(source, out, cfg, bits, group_size, sym)


def _rtn_checkpoint(source: str, out: str, cfg: dict, bits: int, group_size: int, sym: bool) -> str:
    from safetensors.torch import save_file

    per_word = 32 // bits
    tensors, count = {}, 0
    for name, tensor in iter_checkpoint(source):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEARS and tensor.dim() == 2:
            out_features, in_features = tensor.shape
            if group_size != -1 and in_features % group_size:
                raise ValueError(f"{name}: in_features {in_features} is not a multiple of group_size {group_size}")
            if in_features % per_word or out_features % per_word:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not a multiple of {per_word} "
                                 f"(GPTQ packs {per_word} {bits}-bit values per int32)")
            codes, zeros, scales, g_idx = rtn(tensor, bits, group_size, sym)
            for key, value in pack_gptq(codes, zeros, scales, g_idx, bits, v1=True).items():
                tensors[f"{name[:-len('.weight')]}.{key}"] = value
            count += 1
        else:
            tensors[name] = tensor.clone().contiguous()     # clone: tied tensors may share storage
    if not count:
        raise ValueError(f"no linear layer weights ({', '.join(LINEARS)}) found in {source!r}")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": False, "sym": sym, "lm_head": False,
                                  "checkpoint_format": "gptq", "meta": {"quantizer": ["pravaha:rtn"]}}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    for side in SIDE_FILES:
        if os.path.isfile(os.path.join(source, side)):
            shutil.copy(os.path.join(source, side), os.path.join(out, side))
    return f"wrote {out}: {count} linear layers, GPTQ {bits}-bit, group_size {group_size}, round to nearest"


def _with_gptqmodel(source: str, out: str, bits: int, group_size: int, sym: bool, desc_act: bool,
                    calibration: str | None) -> str:
    # gptqmodel reads this once at import; on small machines its default is 1 worker.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    try:
        import torch
        from gptqmodel import BACKEND, GPTQConfig, GPTQModel
    except ImportError as exc:
        raise ValueError(f"--method gptq needs gptqmodel ({exc}): pip install 'pravaha[gptq]', "
                         "or use --method rtn") from exc
    texts = CALIBRATION
    if calibration is not None:
        with open(calibration, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"calibration file {calibration!r} has no text")
    qcfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, act_group_aware=False,
                      offload_to_disk=False, pack_impl="original")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(source, qcfg, device=device)
    model.quantize(texts, batch_size=1, backend=BACKEND.TORCH)
    model.save(out)
    return f"wrote {out}: GPTQ {bits}-bit, group_size {group_size}, desc_act {desc_act}, gptqmodel on {device}"
