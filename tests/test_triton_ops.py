"""The fused Triton ops (Triton's interpreter on the CPU) against their torch references."""

import pytest
import torch
import torch.nn.functional as F

from pravaha_core.models.layers import RMSNorm, RotaryEmbedding
from pravaha_core.triton_ops import TritonOps

DTYPES = [torch.float32, torch.float16]     # the interpreter multiplies bfloat16 wrongly; fp16 rounds alike


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 576), (3, 100)])
def test_rms_norm_and_residual_add(dtype, rows, hidden):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)
    x, stream = torch.randn(rows, hidden).to(dtype), (torch.randn(rows, hidden) * 3).to(dtype)
    torch.testing.assert_close(TritonOps.rms_norm(x, norm.weight, 1e-5), norm(x), atol=2e-3, rtol=2e-3)
    want_stream = stream.clone()
    want, _ = norm(x, want_stream)
    got_stream = stream.clone()
    got = TritonOps.add_rms_norm_(x, got_stream, norm.weight, 1e-5)
    assert torch.equal(got_stream, want_stream)                     # the add rounds as torch's does
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 172), (4, 1536), (2, 3)])
def test_silu_mul(dtype, rows, inter):
    x = torch.randn(rows, 2 * inter).to(dtype)
    gate, up = x.split(inter, dim=-1)
    torch.testing.assert_close(TritonOps.silu_mul(x), F.silu(gate) * up, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_in_place(dtype, head_dim):
    heads, kv_heads, tokens = 4, 2, 5
    rotary = RotaryEmbedding(head_dim, 256, {"rope_theta": 10000.0})
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([0, 7, 100, 3, 255])
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    want_q, want_k = rotary(positions, q, k)
    got = qkv.clone()
    TritonOps.rotary_(got, positions, rotary.cos, rotary.sin, heads + kv_heads, head_dim)
    torch.testing.assert_close(got[:, :heads * head_dim].view(tokens, heads, head_dim), want_q, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim),
                               want_k, atol=1e-3, rtol=1e-3)
    assert torch.equal(got[:, (heads + kv_heads) * head_dim:], qkv[:, (heads + kv_heads) * head_dim:])  # v untouched


def test_a_model_with_the_triton_ops_gives_hfs_greedy_output(checkpoint):
    """Layers take the Triton ops as their fused ops (on CUDA the loader passes them): through
    the interpreter, greedy output is token-identical to HF."""
    from pravaha_core import Engine, SamplingParams
    from tests.checkpoints import hf_greedy

    path = checkpoint("llama")
    engine = Engine(path, kv_cache_bytes=1 << 22, native_kernels=False, attention_backend="triton")
    for module in engine.runner.model.modules():
        if hasattr(module, "native"):
            module.native = TritonOps()
    prompts = [engine.tokenizer.encode(p) for p in ("The quick brown fox", "0123 4567")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, ids, 8)
