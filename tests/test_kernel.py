"""The native CPU decode-attention kernel against plain torch attention over the same blocks.

The kernel has specialised paths (head_dim 64 with GQA groups 1-4 in registers, on AVX-512
hosts in tiles of 16 keys; head_dim 64 and 128 as constants) and a generic one; every path is
compared here, with sliding windows, bfloat16 and float16 caches, block sizes 1 to 32 and
contexts from 1 token up. Greedy output of a head_dim-64 model is also
compared with HF generate through the engine.
"""

from __future__ import annotations

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from tests.checkpoints import hf_greedy, make_checkpoint

BLOCK = 16



def reference(q, k_cache, v_cache, tables, lens, scale, window):
    """Per sequence: gather its blocks, expand KV heads to query heads, softmax attention."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, :-(-n // k_cache.shape[1])]
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(heads // kv_heads, 1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(heads // kv_heads, 1)
        first = max(0, n - window) if window > 0 else 0
        scores = torch.einsum("hd,nhd->hn", q[b], k[first:]) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v[first:]))
    return torch.stack(out)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", [-1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch(native, head_dim, group, window, dtype):
    check_kernel(native, head_dim, group, window, dtype, BLOCK, [1, 2, 15, 16, 17, 70])


@pytest.mark.parametrize("block", [1, 8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [-1, 40])
def test_kernel_block_sizes_and_long_contexts(native, block, dtype, window):
    """Key tiles of 16 positions that straddle blocks of other sizes, and contexts of a few
    hundred tokens (many tiles, a partial last one), on the head_dim 64 register path."""
    check_kernel(native, 64, 3, window, dtype, block, [1, 31, 33, 129, 300, 517])


def check_kernel(native, head_dim, group, window, dtype, block, lengths):
    gen = torch.Generator().manual_seed(head_dim * 100 + group * 10 + (window > 0))
    kv_heads, batch = 2, len(lengths)
    heads = kv_heads * group
    lens = torch.tensor(lengths)
    width = int(-(-lens.max() // block))
    num_blocks = batch * width + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:batch * width].view(batch, width).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=gen)
    scale = head_dim ** -0.5
    got = native.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, window)
    want = reference(q, k_cache, v_cache, tables, lens, scale, window)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_head_dim_64_model_greedy_matches_hf(tmp_path, kv_heads):
    """A model on the register path (head_dim 64, groups 3 and 1) is token-identical to HF."""
    path = make_checkpoint("llama", str(tmp_path / "m"), seed=5, hidden_size=192, num_attention_heads=3,
                           num_key_value_heads=kv_heads, intermediate_size=256)
    engine = Engine(path, kv_cache_bytes=1 << 22)
    assert engine.runner.attention.name == "cpu" and engine.runner.model.head_dim == 64
    prompts = [engine.tokenizer.encode(p) for p in ("Paged attention stores keys", "0123456789 + -", "Grüße")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, prompt, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
def test_attention_step_writes_then_attends(native, group, dtype):
    """`paged_attention_step` (write the step's K/V, then attend, in one call) equals
    index_copy of `k.to(cache dtype)` into the cache followed by `paged_decode_attention`, on
    strided views of a fused qkv output; prompt rows of one sequence see the keys written in
    the same step; a slot outside the cache is an error, not a stray write."""
    gen = torch.Generator().manual_seed(group)
    kv_heads, head_dim, block = 2, 64, BLOCK
    heads = kv_heads * group
    num_blocks = 12
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen).to(dtype)
    # Rows: one decode row at position 40 (blocks 3, 7, 1), then a 5-token prompt at 0..4 (block 5).
    tables = torch.tensor([[3, 7, 1], [5, 0, 0], [5, 0, 0], [5, 0, 0], [5, 0, 0], [5, 0, 0]])
    lens = torch.tensor([41, 1, 2, 3, 4, 5])
    slots = torch.tensor([1 * block + 8, 5 * block + 0, 5 * block + 1, 5 * block + 2, 5 * block + 3, 5 * block + 4])
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(6, heads, head_dim), k.view(6, kv_heads, head_dim), v.view(6, kv_heads, head_dim)
    assert not q.is_contiguous()
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(dtype))
    v_want.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(dtype))
    want = native.paged_decode_attention(q.contiguous(), k_want, v_want, tables, lens, 0.125, -1)
    got = native.paged_attention_step(q, k, v, k_cache, v_cache, slots, tables, lens, 0.125, -1)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, reference(q.contiguous(), k_cache, v_cache, tables, lens, 0.125, -1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        native.paged_attention_step(q, k, v, k_cache, v_cache, slots + num_blocks * block, tables, lens, 0.125, -1)
