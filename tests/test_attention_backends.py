"""The attention backends against the torch reference on random paged batches, and the Triton
backend end to end (Triton's interpreter on the CPU): greedy output token-identical to HF."""

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from pravaha_core.attention import AttentionSpec, select_backend
from pravaha_core.attention.check import random_batch, run_backend
from pravaha_core.attention.torch_backend import TorchBackend
from pravaha_core.attention.triton_backend import TritonBackend
from tests.checkpoints import hf_greedy
from tests.conftest import FAMILIES

pytestmark = pytest.mark.skipif(TritonBackend.unsupported(AttentionSpec(
    4, 2, 64, 16, torch.device("cpu"), torch.float32, torch.float32, frozenset({None}))) is not None,
    reason="triton is not installed")

CPU = torch.device("cpu")
# (chunk lengths, cached tokens before each chunk): decode rows first, then prefill chunks
MIXED = ([1, 1, 1, 19, 7], [5, 40, 17, 0, 21])


def spec_for(group=4, head_dim=64, block_size=16, dtype=torch.float32, cache_dtype=None, window=None,
             softcap=False, kv_heads=2):
    return AttentionSpec(group * kv_heads, kv_heads, head_dim, block_size, CPU, dtype, cache_dtype or dtype,
                         frozenset({window}), softcap)


def assert_same(spec, backend, lens, starts, window=None, softcap=None, share_prefix=False, atol=2e-5):
    batch = random_batch(spec, lens, starts, seed=len(lens) + sum(starts), share_prefix=share_prefix)
    scale = spec.head_dim ** -0.5
    want = run_backend(TorchBackend(spec), *batch, scale, window, softcap)
    got = run_backend(backend, *batch, scale, window, softcap)
    for name, a, b in zip(("output", "k_cache", "v_cache"), want, got):
        torch.testing.assert_close(b.float(), a.float(), atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_triton_matches_torch_across_block_sizes_and_gqa_groups(block_size, group):
    spec = spec_for(group=group, block_size=block_size)
    assert_same(spec, TritonBackend(spec), *MIXED)


@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_triton_head_dims(head_dim):
    spec = spec_for(head_dim=head_dim, group=2)
    assert_same(spec, TritonBackend(spec), *MIXED)


@pytest.mark.parametrize("case", ["window", "chunked", "prefix_hits", "long_context", "softcap"])
def test_triton_cases(case):
    window = 7 if case == "window" else None
    softcap = 20.0 if case == "softcap" else None
    spec = spec_for(window=window, softcap=softcap is not None, block_size=4 if case == "long_context" else 16)
    lens, starts = {"chunked": ([1, 24, 9, 33], [3, 16, 57, 90]),         # chunks continuing sequences
                    "prefix_hits": ([1, 1, 13, 6], [48, 48, 32, 40]),      # shared full blocks (n>1, prefix cache)
                    "long_context": ([1, 1, 5], [301, 150, 260])}.get(case, MIXED)
    assert_same(spec, TritonBackend(spec), lens, starts, window=window, softcap=softcap,
                share_prefix=case == "prefix_hits")


@pytest.mark.parametrize("segments", [4, 16])
@pytest.mark.parametrize("window", [None, 50])
def test_triton_split_kv(segments, window):
    """Split-KV: segments of the context reduced afterwards; empty segments (a window, or
    contexts shorter than the split) weigh nothing."""
    spec = spec_for(window=window, group=8, kv_heads=1)
    assert_same(spec, TritonBackend(spec, num_segments=segments), [1, 1, 1], [200, 3, 77], window=window)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                               (torch.float32, torch.bfloat16)])
def test_triton_cache_dtypes(dtype, cache_dtype):
    spec = spec_for(dtype=dtype, cache_dtype=cache_dtype)
    batch = random_batch(spec, *MIXED)
    want = run_backend(TorchBackend(spec), *batch, 0.125)
    got = run_backend(TritonBackend(spec), *batch, 0.125)
    if cache_dtype is None:
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    else:   # narrowed on store: the GPU rounds to nearest like Tensor.to; the interpreter truncates
        for got_cache, want_cache in zip(got[1:], want[1:]):
            ulp = torch.finfo(cache_dtype).eps * want_cache.float().abs()
            assert bool(((got_cache.float() - want_cache.float()).abs() <= ulp).all())
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=3e-2, rtol=2e-2)


def test_split_kv_is_chosen_for_few_long_decode_rows_only():
    backend = TritonBackend(spec_for(kv_heads=8, group=4))
    assert backend._segments(num_seqs=4, max_query_len=1, max_seq_len=4096) > 1
    assert backend._segments(num_seqs=256, max_query_len=1, max_seq_len=4096) == 1   # the GPU is busy
    assert backend._segments(num_seqs=4, max_query_len=7, max_seq_len=4096) == 1     # prefill in the step
    assert backend._segments(num_seqs=4, max_query_len=1, max_seq_len=300) == 1      # short contexts


def test_cpu_backend_matches_torch(native):
    spec = spec_for(group=2)
    assert_same(spec, select_backend("cpu", spec, native), *MIXED)


def test_backend_choice_and_errors(native):
    spec = spec_for()
    assert select_backend("auto", spec, native).name == "cpu"
    assert select_backend("auto", spec, None).name == "torch"
    assert select_backend("auto", spec_for(softcap=True), native).name == "torch"
    assert select_backend("triton", spec, native).name == "triton"              # the interpreter serves it
    with pytest.raises(ValueError, match="attention_backend 'cpu': the native kernels are not built"):
        select_backend("cpu", spec, None)
    with pytest.raises(ValueError, match="soft-cap"):
        select_backend("cpu", spec_for(softcap=True), native)
    with pytest.raises(ValueError, match="attention_backend: 'flash' is not one of"):
        Engine("dummy:llama-tiny", kv_cache_bytes=1 << 20, attention_backend="flash")


PROMPTS = ["The quick brown fox", "Paged attention stores keys and values in fixed-size blocks. " * 2, "0",
           "def add(a, b):", "Grüße, señor! 你好"]


@pytest.mark.parametrize("family", FAMILIES + ["mistral-window"])
def test_triton_engine_greedy_matches_hf(checkpoint, family):
    """Through the Triton backend: chunked prefill (16 tokens a step), then the same prompts
    again as prefix-cache hits; token-identical to HF generate. Mistral also with a sliding
    window shorter than the prompts."""
    path = checkpoint("mistral", sliding_window=6) if family == "mistral-window" else checkpoint(family)
    engine = Engine(path, kv_cache_bytes=1 << 22, block_size=4, max_num_batched_tokens=16,
                    attention_backend="triton")
    assert engine.runner.attention.name == "triton"
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = engine.generate(prompts, params)
    second = engine.generate(prompts, params)
    assert engine.stats.num_cached_prompt_tokens > 0
    for ids, a, b in zip(prompts, first, second):
        assert a.token_ids == b.token_ids == hf_greedy(path, ids, 8)
