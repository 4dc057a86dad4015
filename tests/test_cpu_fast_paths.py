"""The float32 CPU fast paths against plain torch: oneDNN-packed linear layers, the fused
native RMSNorm / SiLU-multiply / rotary steps, and long fresh prompts attending one by one
(causal, unpadded); then greedy output through all of them against HF generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pravaha_core import Engine, SamplingParams
from pravaha_core.attention.torch_backend import SPAN_MIN_MEAN_TOKENS
from pravaha_core.models.layers import PackedLinear, RMSNorm, RotaryEmbedding, pack_linears, panel_gemm_preferred
from tests.checkpoints import hf_greedy, make_checkpoint



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(64, 172), (576, 960), (13, 7)])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(*shape, bias=bias)
    packed = PackedLinear(layer)
    for rows in (1, 3, 17, 300):
        x = torch.randn(rows, shape[0])
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, layer.weight.detach())
    assert packed.nbytes >= layer.weight.numel() * 4


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(576, 960), (64, 17), (13, 7), (1, 1), (7, 16), (33, 100)])
def test_panel_linear_matches_linear(native, shape, bias):
    """The native panel GEMM: N not a multiple of the panels (16 wide on AVX2, 32 on AVX-512),
    row counts around its tiles (6 rows on AVX2, 12 on AVX-512, rows split evenly over them),
    none at all, a 3-D input, and (K 64, 1100 rows) more than one pass of rows."""
    if not native.panel_gemm:
        pytest.skip("the panel GEMM is compiled only for AVX2 + FMA hosts")
    torch.manual_seed(shape[1])
    layer = nn.Linear(*shape, bias=bias)
    packed = PackedLinear(layer, native)
    for rows in (0, 1, 5, 6, 7, 11, 12, 13, 25, 64, 301) + ((1100,) if shape[0] == 64 else ()):
        x = torch.randn(rows, shape[0])
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, shape[0])
    torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, layer.weight.detach())
    width = 32 if native.avx512 else 16
    assert packed.nbytes == -(-shape[1] // width) * width * shape[0] * 4
    with pytest.raises(RuntimeError, match="features"):
        packed(torch.randn(2, shape[0] + 1))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("inter,k", [(1536, 576), (17, 64), (8, 7), (1, 5)])
def test_panel_linear_glu_fuses_silu_mul(native, inter, k, bias):
    """A gate/up projection packed with `glu` returns silu(gate) * up from its GEMM epilogue:
    bit-identical to the unfused panels followed by the native silu_mul (same accumulation
    order per column), for intermediate sizes not a multiple of the half panels; its dense
    weight round-trips exactly."""
    if not native.panel_gemm:
        pytest.skip("the panel GEMM is compiled only for AVX2 + FMA hosts")
    torch.manual_seed(inter + k)
    layer = nn.Linear(k, 2 * inter, bias=bias)
    fused, plain = PackedLinear(layer, native, glu=True), PackedLinear(layer, native)
    for rows in (0, 1, 7, 13, 64, 301):
        x = torch.randn(rows, k)
        got = fused(x)
        assert got.shape == (rows, inter)
        assert torch.equal(got, native.silu_mul(plain(x)))
        gate, up = layer(x).chunk(2, dim=-1)
        torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert fused(torch.randn(2, 3, k)).shape == (2, 3, inter)
    assert torch.equal(fused.weight, layer.weight.detach())
    with pytest.raises(ValueError, match="even"):
        PackedLinear(nn.Linear(4, 5), native, glu=True)


def test_pack_linears_takes_panels_where_preferred(native):
    """Hosts with the panel GEMM (AVX2 + FMA, AVX-512 included) take it, others oneDNN's layout;
    with panels, every linear's weight is kept exactly."""
    engine = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20)
    head = engine.runner.model.lm_head
    assert isinstance(head, PackedLinear)
    assert (head.native is not None) == panel_gemm_preferred(native)
    assert panel_gemm_preferred(native) == native.panel_gemm
    assert not panel_gemm_preferred(None)
    if not native.panel_gemm:
        return
    model = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20, native_kernels=False).runner.model
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert pack_linears(model, native) == len(dense)
    for name, weight in dense.items():
        layer = model.get_submodule(name)
        assert layer.native is native and torch.equal(layer.weight, weight)
        assert layer.glu == name.endswith("mlp.gate_up_proj")


def test_pack_linears_packs_every_float32_layer_and_a_tied_head():
    engine = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20, native_kernels=False)
    model = engine.runner.model
    model.lm_head = None                        # make it tied: the head is the embedding
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert pack_linears(model) == len(dense) + 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for name, weight in dense.items():
        assert torch.equal(model.get_submodule(name).weight, weight)
    hidden = torch.randn(5, model.embed_tokens.weight.shape[1])
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.embed_tokens.weight.T,
                               rtol=1e-5, atol=1e-5)


def test_engine_uses_fast_paths_only_for_float32_cpu_with_kernels():
    fast = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20)
    layer = fast.runner.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, PackedLinear) and isinstance(fast.runner.model.lm_head, PackedLinear)
    assert layer.mlp.native is not None and layer.self_attn.native is not None and layer.input_layernorm.native is not None
    plain = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20, native_kernels=False)
    assert isinstance(plain.runner.model.layers[0].mlp.gate_up_proj, nn.Linear)
    assert plain.runner.model.layers[0].mlp.native is None
    half = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20, dtype="bfloat16")
    assert isinstance(half.runner.model.layers[0].mlp.gate_up_proj, nn.Linear)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(40, 140))]
    assert [o.token_ids for o in fast.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (300, 100), (2, 5)])
def test_fused_rms_norm(native, rows, hidden):
    torch.manual_seed(rows)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden)
    x = torch.randn(rows, hidden) * 4
    want = norm(x)
    norm.native = native
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (300, 100)])
def test_fused_add_rms_norm_carries_the_residual(native, rows, hidden):
    """norm(x, residual): the residual stream gains x in place (bit-exact: one float add per
    element either way) and the norm is of the sum, fused or not."""
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden)
    x, stream = torch.randn(rows, hidden), torch.randn(rows, hidden) * 3
    want_sum = stream + x
    plain_stream = stream.clone()
    want, back = norm(x, plain_stream)
    assert back is plain_stream and torch.equal(plain_stream, want_sum)
    norm.native = native
    fused_stream = stream.clone()
    got, back = norm(x, fused_stream)
    assert back is fused_stream and torch.equal(fused_stream, want_sum)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, norm(want_sum), rtol=0, atol=0)


@pytest.mark.parametrize("rows,inter", [(1, 172), (9, 1536), (300, 3)])
def test_fused_silu_mul(native, rows, inter):
    torch.manual_seed(inter)
    gate_up = torch.randn(rows, 2 * inter) * 8          # tails of the sigmoid both ways
    gate_up[0, :3] = torch.tensor([0.0, -100.0, 100.0])
    want = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    torch.testing.assert_close(native.silu_mul(gate_up), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (2, 1, 80)])
def test_fused_rotary_in_place(native, heads, kv_heads, head_dim):
    torch.manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, 300, {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
                                             "original_max_position_embeddings": 64})
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 300, (tokens,))
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    want_q, want_k = rotary(positions, q, k)
    got = qkv.clone()
    native.rotary_(got, positions, rotary.cos, rotary.sin, heads + kv_heads, head_dim)
    torch.testing.assert_close(got[:, :heads * head_dim].view(tokens, heads, head_dim), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim),
                               want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, (heads + kv_heads) * head_dim:], qkv[:, (heads + kv_heads) * head_dim:])  # v untouched
    with pytest.raises(RuntimeError, match="position out of range"):
        native.rotary_(got, torch.tensor([300] * tokens), rotary.cos, rotary.sin, heads + kv_heads, head_dim)


@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_long_fresh_prompts_match_hf(tmp_path, family, native_kernels):
    """Prompts long enough (on average) to attend one by one, causal and unpadded, in the
    first step, next to a short one; greedy output token-identical to HF generate."""
    path = make_checkpoint(family, str(tmp_path / family), seed=11)
    engine = Engine(path, kv_cache_bytes=1 << 22, native_kernels=native_kernels)
    texts = ["The river carries silt down to the delta, " * 4, "Paged attention keeps keys in blocks; " * 5, "Hi"]
    prompts = [engine.tokenizer.encode(t) for t in texts]
    assert sum(map(len, prompts)) / len(prompts) >= SPAN_MIN_MEAN_TOKENS
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, prompt, 10)


@pytest.mark.parametrize("family,heads,kv_heads,window", [("llama", 4, 2, None), ("llama", 4, 1, None),
                                                          ("qwen2", 6, 2, None), ("mistral", 4, 1, 24)])
def test_prompt_rows_through_the_kernel_match_hf(tmp_path, family, heads, kv_heads, window):
    """head_dim 64 with GQA groups 2-4: where the kernel has a tile path (AVX-512 or AVX2), every
    prompt token is a kernel row over its causal context (KERNEL_PREFILL_MAX_CONTEXT). Fresh
    prompts, later chunks of a chunked prompt, prefix-cache hits and a sliding window: greedy
    output token-identical to HF."""
    extra = {} if window is None else {"sliding_window": window}
    path = make_checkpoint(family, str(tmp_path / family), seed=3, hidden_size=64 * heads, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, intermediate_size=256, **extra)
    engine = Engine(path, kv_cache_bytes=1 << 24, max_num_batched_tokens=48)
    attention = engine.runner.attention
    assert attention.name == "cpu" and attention.spec.head_dim == 64 and 2 <= attention.spec.group <= 4
    assert attention.kernel_prefill == bool(attention.kernel.tile64)
    tok = engine.tokenizer
    shared = tok.encode("Blocks of sixteen tokens hold the keys and values of every layer. " * 2)
    prompts = [shared + tok.encode(" The first question is short."), tok.encode("0123456789 " * 9),
               shared + tok.encode(" A second question reuses the shared prefix."), tok.encode("Hi")]
    assert max(map(len, prompts)) > 48                                           # chunked
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts[:2], params) + engine.generate(prompts[2:], params)
    assert engine.stats.num_cached_prompt_tokens >= 16                           # a prefix-cache hit
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, prompt, 12)


def test_bench_warns_when_the_native_gemm_is_far_below_onednn():
    from benchmarks.throughput import slow_native_gemm

    assert slow_native_gemm({"torch.matmul": 104.0, "oneDNN packed": 122.0, "native panels": 46.5}).startswith(
        "warning: the native panel GEMM runs at 46 GFLOP/s, 38% of oneDNN's 122")
    assert slow_native_gemm({"torch.matmul": 158.0, "oneDNN packed": 128.0, "native panels": 152.0}) is None
    assert slow_native_gemm({"torch.matmul": 158.0, "oneDNN packed": 128.0}) is None      # no native build
    assert slow_native_gemm({"torch.matmul": 158.0, "native panels": 20.0}) is None       # no oneDNN to compare


def test_bench_flops_split_into_phases_and_decode_bytes_count_weights_per_step_and_each_context():
    from benchmarks.throughput import Request, decode_bytes, model_flops, phase_flops

    cfg = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 16, "vocab_size": 32}
    reqs = [Request(list(range(5)), 3), Request(list(range(2)), 1)]
    prefill, decode = phase_flops(cfg, reqs)
    # per layer: qkv 8x(8+2*4), o 8x8, gate/up/down 3x8x16 -> 576 weights; attention 4*8 per context
    linear, attn, head = 2 * 576, 4 * 2 * 8, 2 * 8 * 32      # weights of both layers, per-context FLOPs, LM head
    assert prefill == (7 * 2 * linear + attn * (sum(range(1, 6)) + sum(range(1, 3))) + 2 * head)
    assert decode == 2 * 2 * linear + attn * (6 + 7) + 2 * head      # positions 5 and 6; the 1-token request has none
    assert model_flops(cfg, reqs) == prefill + decode
    assert model_flops(cfg, reqs, cached_prefix=2) == prefill + decode - 4 * 2 * linear - attn * 3 * 2
    weights = (2 * 576 + 8 * 32) * 4
    assert decode_bytes(cfg, reqs) == 2 * weights + (6 + 7) * 2 * 2 * 4 * 4   # 2 steps; K and V of 2 layers
    assert decode_bytes(cfg, [Request([1], 1)]) == 0


def test_bench_reports_the_fastest_of_interleaved_runs_and_rejects_zero_repeats():
    from benchmarks.throughput import fastest_run, run
    from worker.cli import main

    runs = [{"tokens": 100, "seconds": 12.4, "steps": 9}, {"tokens": 100, "seconds": 11.9, "steps": 9}]
    assert fastest_run(runs) == {"tokens": 100, "seconds": 11.9, "steps": 9, "runs_seconds": [12.4, 11.9]}
    with pytest.raises(ValueError, match="no runs"):
        fastest_run([])
    with pytest.raises(ValueError, match="repeats: must be at least 1"):
        run(quick=True, repeats=0)
    assert main(["bench", "--repeats", "0"]) == 2


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_weights_and_kv_cache_on_huge_pages_change_no_output(tmp_path):
    """The loader moves large weights into one buffer on transparent huge pages, and the KV
    cache is advised before it is zeroed. Here every tensor is moved (min_bytes=0): greedy output
    is still HF's, tied tensors stay tied, and the byte counts stand."""
    from pravaha_core import kernels
    from pravaha_core.models.layers import onto_huge_pages
    from pravaha_core.quantization import linear_weight_bytes, weight_bytes

    assert kernels.advise_huge_pages(torch.empty(1000)) == 0                     # under one huge page
    if not _thp_available():
        pytest.skip("no transparent huge pages on this host")
    assert kernels.advise_huge_pages(torch.empty(3 << 20)) >= 2 << 20           # 12 MiB: at least one
    path = make_checkpoint("llama", str(tmp_path / "llama"), seed=5, tie_word_embeddings=True, hidden_size=512,
                           intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)    # 6+ MiB
    engine = Engine(path, kv_cache_bytes=1 << 24)
    model = engine.runner.model
    tok = engine.tokenizer
    prompts = [tok.encode("Huge pages hold the same numbers."), tok.encode("A second prompt")]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    before = [o.token_ids for o in engine.generate(prompts, params)]
    sizes = (weight_bytes(model), linear_weight_bytes(model))
    tied = model.embed_tokens.weight
    moved = onto_huge_pages(model, min_bytes=0)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert moved >= sum(p.nbytes for p in model.parameters()) + sum(m.nbytes for m in packed) > 4 << 20
    assert all(m.packed.untyped_storage().nbytes() > moved for m in packed)          # all in the one buffer
    assert model.embed_tokens.weight is tied and model.embed_tokens.weight.untyped_storage().nbytes() > moved
    assert (weight_bytes(model), linear_weight_bytes(model)) == sizes
    assert [o.token_ids for o in engine.generate(prompts, params)] == before
    for prompt, out in zip(prompts, before):
        assert out == hf_greedy(path, prompt, 10)


def test_cpu_setup_is_one_step_the_engine_passes_down(native):
    """The native module reaches the layers through their constructors; nothing is patched
    into classes, and an engine without kernels leaves every layer on plain torch."""
    from pravaha_core import kernels
    from pravaha_core.models.layers import RMSNorm

    off = kernels.setup_cpu(native_kernels=False, huge_pages=False)
    assert off == kernels.CpuPlatform(None, False, False)
    on = kernels.setup_cpu()
    assert on.native is native
    assert not hasattr(RMSNorm, "native") and RMSNorm(4, 1e-6).native is None
    engine = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20)
    norms = [m for m in engine.runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.native is native for m in norms)
