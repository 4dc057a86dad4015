"""`pravaha quantize`: the checkpoints it writes load in the engine and compute what they say.

The reference dequantizes the written GPTQ tensors with this file's own unpacker (plain bit
arithmetic per the GPTQ layout) into a float32 HF model. With gptqmodel installed (the
`[gptq]` extra), a real GPTQ run is checked against transformers' own GPTQ loader.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from tests.checkpoints import make_checkpoint

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.2)
PROMPTS = ["The quick brown fox", "Paged attention stores", "def add(a, b):"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint("llama", str(tmp_path_factory.mktemp("src")), seed=3, **SHAPE)


def quantize(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "quantize", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in / per, out] -> [in, out]: row i * per + j is bits j*bits.. of word i."""
    per, mask = 32 // bits, (1 << bits) - 1
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows = [(words[i] >> (j * bits)) & mask for i in range(words.shape[0]) for j in range(per)]
    return torch.stack(rows)


def dequantized_state(path: str, bits: int) -> dict[str, torch.Tensor]:
    """The float32 weights a GPTQ v1 checkpoint encodes: (q - (stored_zero + 1)) * scale[g_idx]."""
    from safetensors.torch import load_file

    raw = load_file(os.path.join(path, "model.safetensors"))
    state = {}
    for name, tensor in raw.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            codes = unpack_rows(tensor, bits).float()                                # [in, out]
            zeros = unpack_rows(raw[prefix + ".qzeros"].t(), bits).t().float()       # [G, out]
            zeros = (zeros + 1) % (1 << bits)
            g = raw[prefix + ".g_idx"].long()
            scales = raw[prefix + ".scales"].float()
            state[prefix + ".weight"] = ((codes - zeros[g]) * scales[g]).t().contiguous()
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = tensor.float()
    return state


def reference_model(source: str, state: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def check_against(model, engine: Engine, bf16=None, max_tokens: int = 8) -> None:
    """The engine's top logprobs are within bfloat16 tolerance of the float32 reference, and its
    greedy tokens are the reference's argmax wherever the choice is not a near tie.

    The tolerance is measured, not guessed: the same reference run in bfloat16 (the kernels'
    activation dtype) on the same tokens gives the error bf16 itself causes; the engine may
    deviate by at most twice that. Teacher-forced: the reference scores the engine's tokens."""
    bf16 = bf16 if bf16 is not None else copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5, ignore_eos=True)
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, params)):
        prompt_ids = engine.tokenizer.encode(prompt)
        full = torch.tensor([prompt_ids + out.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1:-1].float(), -1)
            ref_bf16 = torch.log_softmax(bf16(full).logits[0, len(prompt_ids) - 1:-1].float(), -1)
        tol = 2 * (ref_bf16 - ref).abs().max().item() + 0.02
        for pos, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            for alt, logprob in entry.items():
                assert abs(logprob - ref[pos, alt].item()) <= tol, (pos, alt, logprob, ref[pos, alt].item(), tol)
            best = ref[pos].argmax().item()
            assert token == best or ref[pos, best] - ref[pos, token] <= tol, (pos, token, best)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True)])
def test_rtn_checkpoint_serves_what_it_encodes(source, tmp_path, bits, group, sym):
    out = str(tmp_path / "q")
    args = [source, out, "--bits", str(bits), "--group-size", str(group)] + ([] if sym else ["--asym"])
    run = quantize(*args)
    assert run.returncode == 0, run.stderr
    assert f"GPTQ {bits}-bit" in run.stdout
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == \
        ("gptq", bits, group, sym, "gptq")
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    reference = reference_model(source, dequantized_state(out, bits))
    for dtype in ("bfloat16", "float32"):
        engine = Engine(out, dtype=dtype, kv_cache_bytes=16 << 20)
        info = engine.model_info()
        assert info["quantization"] == "gptq"
        # 4-bit groups of 32/64 take torch's int4 kernel; 8-bit per-channel symmetric the int8 one.
        assert info["kernels"] == ({"int4pack_mm": 8} if bits == 4 else {"int8pack_mm": 8})
        check_against(reference, engine)


def test_quantize_refuses_bad_input(source, tmp_path):
    cases = [([source, str(tmp_path / "a"), "--group-size", "48"], "not a multiple of group_size 48"),
             ([str(tmp_path), str(tmp_path / "b")], "no config.json"),
             ([source, str(tmp_path / "c"), "--desc-act"], "apply to --method gptq only")]
    for args, message in cases:
        run = quantize(*args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    first = quantize(source, str(tmp_path / "d"), "--group-size", "32")
    assert first.returncode == 0
    again = quantize(str(tmp_path / "d"), str(tmp_path / "e"))
    assert again.returncode == 2 and "already quantized (gptq)" in again.stderr
    busy = quantize(source, str(tmp_path / "d"))
    assert busy.returncode == 2 and "not empty" in busy.stderr


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="the [gptq] extra is not installed")
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptqmodel_checkpoint_matches_transformers(source, tmp_path, desc_act):
    """A real GPTQ run (gptqmodel, CPU); transformers' GPTQ loader is the reference."""
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "g")
    run = quantize(source, out, "--method", "gptq", "--group-size", "32", *(["--desc-act"] if desc_act else []),
                   cwd=tmp_path)    # gptqmodel writes a logs/ folder into its working directory
    assert run.returncode == 0, run.stderr[-3000:]
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["desc_act"] is desc_act and qc["quant_method"] == "gptq"
    reference, bf16 = (AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=dtype).eval()
                       for dtype in (torch.float32, torch.bfloat16))
    engine = Engine(out, dtype="bfloat16", kv_cache_bytes=16 << 20)
    assert engine.model_info()["kernels"] == {"int4pack_mm": 8}
    check_against(reference, engine, bf16)
