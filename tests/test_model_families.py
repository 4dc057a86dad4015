"""The newer families (Qwen3, Phi-3, Mixtral, Qwen3-MoE, Gemma 2 and 3): greedy output token-identical
to HF generate on tiny random checkpoints, plain, with chunked prefill, under preemption and with
prefix-cache hits."""

import json
import os
import re
import shutil

import pytest

from pravaha_core import Engine, SamplingParams
from pravaha_core.tokenizer import HFTokenizer
from tests.checkpoints import HF_CLASSES, hf_greedy
from tests.test_engine_hf import MAX_TOKENS, PROMPTS, assert_matches_hf, run_engine

FAMILIES = ["qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3"]


def kv_bytes_per_block(path: str, block_size: int) -> int:
    """K and V of every layer for one block, float32, from config.json."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * block_size * cfg["num_key_value_heads"] * head_dim * 4


@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_with_prefix_hits(checkpoint, family, native_kernels):
    """All eight prompts in one batch; then again, each finding its full blocks in the prefix cache."""
    path = checkpoint(family)
    engine, prompt_ids, outs, plans = run_engine(path, kv_cache_bytes=1 << 22, block_size=4,
                                                 native_kernels=native_kernels)
    with open(os.path.join(path, "config.json")) as f:
        assert type(engine.runner.model).__name__ == json.load(f)["architectures"][0]
    assert_matches_hf(engine, path, prompt_ids, outs)
    assert max(len(p) for p in plans) == len(PROMPTS), "all prompts should share one batch"
    hits = engine.stats.num_cached_prompt_tokens
    again = engine.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert engine.stats.num_cached_prompt_tokens - hits == sum((len(p) - 1) // 4 * 4 for p in prompt_ids)
    assert_matches_hf(engine, path, prompt_ids, again)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_with_chunked_prefill(checkpoint, family):
    path = checkpoint(family)
    engine, prompt_ids, outs, plans = run_engine(path, kv_cache_bytes=1 << 22, max_num_batched_tokens=7)
    assert any(start > 0 and n > 1 for plan in plans for start, n in plan), "no prefill was chunked"
    assert_matches_hf(engine, path, prompt_ids, outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_under_preemption(checkpoint, family):
    path = checkpoint(family)
    tokenizer = HFTokenizer(path, set())
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS) + MAX_TOKENS
    num_blocks = -(-longest // 4) + 2            # the longest request alone, far from all eight
    engine, prompt_ids, outs, _ = run_engine(path, block_size=4,
                                             kv_cache_bytes=num_blocks * kv_bytes_per_block(path, 4))
    assert engine.kv_cache_info()["num_blocks"] == num_blocks
    assert engine.stats.num_preemptions > 0
    assert_matches_hf(engine, path, prompt_ids, outs)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_sliding_layers_see_past_the_window(checkpoint, family):
    """The tiny Gemmas alternate 8-token sliding layers with global ones; most prompts are longer."""
    path = checkpoint(family)
    engine, prompt_ids, outs, _ = run_engine(path, kv_cache_bytes=1 << 22, block_size=4)
    assert engine.runner.model.sliding_windows == [8, None]
    assert sum(len(ids) + MAX_TOKENS > 2 * 8 for ids in prompt_ids) >= 6
    assert_matches_hf(engine, path, prompt_ids, outs)


def test_gemma2_logprobs_equal_hf_with_final_soft_cap(checkpoint):
    """Greedy output cannot see the final logit soft cap (tanh keeps the order); logprobs do."""
    import torch

    from tests.checkpoints import _hf_model

    path = checkpoint("gemma2")
    engine = Engine(path, kv_cache_bytes=1 << 22)
    ids = engine.tokenizer.encode(PROMPTS[5])
    out = engine.generate([ids], SamplingParams(max_tokens=3, temperature=0.0, logprobs=3))[0]
    model = _hf_model(path)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        with torch.no_grad():
            ref = model(torch.tensor([ids + out.token_ids[:step]])).logits[0, -1].log_softmax(-1)
        assert ref.exp().max() < 0.2, "the cap (2.0) should flatten the distribution"
        for tok, lp in entry.items():
            assert abs(lp - ref[tok].item()) < 1e-4


ROPES = {
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, factor=4.0,
                     short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[1.0, 2.0, 4.0, 9.0],
                     original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=500000.0, factor=8.0, original_max_position_embeddings=32,
                        beta_fast=16.0, beta_slow=2.0, mscale=0.9, mscale_all_dim=0.7, truncate=False),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
}


@pytest.mark.parametrize("kind", ROPES)
def test_rope_tables_match_hf(kind):
    """cos/sin as HF's rotary embedding computes them, short and long (longrope) positions alike."""
    import torch
    import transformers

    from pravaha_core.models.layers import RotaryEmbedding
    from pravaha_core.models.llama import rope_config

    family = "phi3" if kind == "longrope" else "llama"
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
    cfg = cfg_cls(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                  rope_parameters=dict(ROPES[kind]))
    hf = model_cls(cfg.__class__(**dict(cfg.to_dict(), num_hidden_layers=0))).model.rotary_emb
    ours = RotaryEmbedding(16, 256, rope_config(cfg.to_dict()))
    for length in (48, 200):        # within and past original_max_position_embeddings
        cos, sin = hf(torch.zeros(1), torch.arange(length)[None])
        rows = slice(64, length) if kind == "longrope" and length > 64 else slice(0, length)
        torch.testing.assert_close(ours.cos[rows], cos[0, rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.sin[rows], sin[0, rows], rtol=1e-5, atol=1e-6)


# Every decoder linear: attention, dense MLPs, experts; not the router (mlp.gate) nor the LM head.
LINEAR = re.compile(r"\.(self_attn|mlp|block_sparse_moe)\..*(_proj|w1|w2|w3)\.weight$")


def write_gptq_experts(source: str, out: str, reference: str) -> None:
    """`out`: `source` with every decoder linear (the experts' too, not the router) as 8-bit GPTQ
    (groups of 16); `reference`: `source`
    with those weights replaced by their dequantized values, for HF."""
    import torch
    from safetensors.torch import load_file, save_file

    from pravaha_core.quantization import QuantSpec, decode_gptq, pack_gptq, rtn

    tensors = load_file(os.path.join(source, "model.safetensors"))
    quantized, dequantized = {}, dict(tensors)
    for name, weight in tensors.items():
        if not LINEAR.search(name):
            quantized[name] = weight
            continue
        packed = pack_gptq(*rtn(weight, 8, 16, sym=False), bits=8)
        codes, zeros, scales, g_idx = decode_gptq(*packed.values(), QuantSpec("gptq", bits=8, group_size=16,
                                                                              zero_offset=1))
        dequantized[name] = (codes.float() - zeros[:, g_idx]) * scales[:, g_idx]
        assert not torch.equal(dequantized[name], weight), "premise: quantization changed the weight"
        quantized.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in packed.items()})
    for path, weights in ((out, quantized), (reference, dequantized)):
        shutil.copytree(source, path)
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 16, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_gptq_experts_match_hf_on_dequantized_weights(checkpoint, family, tmp_path):
    """GPTQ experts (8-bit: the exact dequant path), router in float: greedy token-identical to HF
    on the dequantized weights; a quantized router is refused."""
    import torch

    from pravaha_core.quantization import QuantLinear, pack_gptq, rtn

    out, reference = str(tmp_path / "gptq"), str(tmp_path / "reference")
    write_gptq_experts(checkpoint(family), out, reference)
    engine = Engine(out, kv_cache_bytes=1 << 22, block_size=4)
    model = engine.runner.model
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and "experts" in n]
    assert len(experts) == 2 * 4 * (2 if family == "mixtral" else 1)    # gate_up, down; 4 experts per MoE layer
    assert type(model.layers[0].mlp.gate.weight) is torch.nn.Parameter
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for ids, got in zip(prompt_ids, outs):
        assert got.token_ids == hf_greedy(reference, ids, MAX_TOKENS)
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(out, "model.safetensors"))
    router = next(n for n in weights if n.endswith(".gate.weight"))
    packed = pack_gptq(*rtn(weights.pop(router), 8, 16, sym=False), bits=8)
    weights.update({router.replace(".weight", f".{k}"): v for k, v in packed.items()})
    save_file(weights, os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match="quantized MoE router is not supported"):
        Engine(out, kv_cache_bytes=1 << 22)


@pytest.mark.parametrize("family", ["mixtral", "gemma2"])
def test_int8_on_load_tracks_hf(checkpoint, family):
    """int8 on load quantizes the experts (Mixtral) and the tied head / embedding (Gemma 2, soft
    caps included), never the router: logprobs stay within int8 noise of HF float32. Every token
    goes to all 4 experts here: with top-2, int8 noise flips near-tied routing choices (0.27 off
    at worst on these prompts, against 0.045 with all experts)."""
    import torch

    from pravaha_core.quantization import QuantLinear
    from tests.checkpoints import _hf_model

    path = checkpoint(family, **({"num_experts_per_tok": 4} if family == "mixtral" else {}))
    engine = Engine(path, kv_cache_bytes=1 << 22, quantization="int8")
    names = [n for n, m in engine.runner.model.named_modules() if isinstance(m, QuantLinear)]
    assert "lm_head" in names and (family != "mixtral" or sum("experts" in n for n in names) == 2 * 2 * 4)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:4]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    worst = 0.0
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = _hf_model(path)(torch.tensor([ids + out.token_ids])).logits[0].log_softmax(-1)
        for t, entry in enumerate(out.logprobs):
            worst = max(worst, *(abs(lp - float(ref[len(ids) - 1 + t, tok])) for tok, lp in entry.items()))
    assert worst < 0.1, f"largest logprob difference {worst:.4f}"


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gemma2_soft_cap_through_each_backend(checkpoint, backend):
    """Soft-capped layers: on the CPU `auto` takes the torch backend (the native kernels do not
    soft-cap); the Triton kernel caps in the kernel (its interpreter here). Both match HF."""
    path = checkpoint("gemma2", head_dim=64, query_pre_attn_scalar=64)
    engine, prompt_ids, outs, _ = run_engine(path, kv_cache_bytes=1 << 23, attention_backend=backend)
    assert engine.runner.attention.name == ("torch" if backend == "auto" else "triton")
    assert engine.runner.attention.spec.softcap
    assert_matches_hf(engine, path, prompt_ids, outs)


def test_gemma3_config_without_layer_types_or_nested_rope():
    """Gemma 3 configs written before transformers v5: sliding_window_pattern, rope_local_base_freq
    and rope_scaling (for the global layers) give the layers and rope tables HF derives from them."""
    import torch
    import transformers

    from pravaha_core.models.gemma import Gemma3ForCausalLM

    legacy = dict(model_type="gemma3_text", vocab_size=100, hidden_size=64, intermediate_size=64, head_dim=16,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128,
                  query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=3, rope_theta=1e6,
                  rope_local_base_freq=20000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  hidden_activation="gelu_pytorch_tanh")
    ours = Gemma3ForCausalLM(legacy, 128)
    assert ours.sliding_windows == [8, 8, None, 8, 8, None]
    hf_cfg = transformers.Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    hf = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf_cfg)
    for layer, kind in ((0, "sliding_attention"), (2, "full_attention")):
        cos, sin = hf(torch.zeros(1), torch.arange(128)[None], kind)
        rotary = ours.layers[layer].self_attn.rotary
        torch.testing.assert_close(rotary.cos, cos[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rotary.sin, sin[0], rtol=1e-5, atol=1e-6)
