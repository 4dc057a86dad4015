"""The decode-graph runner's logic without a GPU: bucket choice, padding and buffer updates run
eagerly through the same code (Triton's interpreter for the kernels), and greedy output through
it is token-identical to HF."""

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from pravaha_core.attention.base import StepLayout
from pravaha_core.attention.check import random_batch
from pravaha_core.cuda_graphs import DecodeGraphs, bucket_sizes
from tests.checkpoints import hf_greedy
from tests.test_attention_backends import spec_for


def test_bucket_sizes():
    assert bucket_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert bucket_sizes(4) == [1, 2, 4] and bucket_sizes(1) == [1]


def eager_graphs(engine, max_num_seqs=40):
    graphs = DecodeGraphs(engine.runner, max_num_seqs, max_blocks_per_seq=64, capture=False)
    engine.runner.decode_graphs = graphs
    return graphs


def test_buffers_take_the_step_and_pad_the_bucket(checkpoint):
    engine = Engine(checkpoint("llama"), kv_cache_bytes=1 << 20, block_size=4, attention_backend="triton")
    graphs = eager_graphs(engine)
    assert [graphs.bucket(n) for n in (1, 3, 8, 9, 17, 33, 40)] == [1, 4, 8, 16, 32, 40, 40]
    assert graphs.bucket(41) is None
    layout = StepLayout.build([1, 1, 1], [5, 9, 2], [[7, 3], [1, 2, 8], [4]], 4)
    assert graphs.fits(layout)
    assert not graphs.fits(StepLayout.build([1, 3], [5, 0], [[7, 3], [1]], 4))      # prefill: eager
    graphs.slots.fill_(123)                                                          # stale rows
    graphs.fill(torch.tensor([11, 12, 13]), layout, graphs.bucket(3))
    assert graphs.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert graphs.positions[:4].tolist() == [5, 9, 2, 0]
    assert graphs.slots[:4].tolist() == [3 * 4 + 1, 8 * 4 + 1, 4 * 4 + 2, -1]       # padding stores nothing
    assert graphs.seq_lens[:4].tolist() == [6, 10, 3, 1]
    assert graphs.block_tables[:4, :3].tolist() == [[7, 3, 0], [1, 2, 8], [4, 0, 0], [0, 0, 0]]
    meta = graphs.metadata(4)
    assert meta.num_seqs == 4 and meta.max_query_len == 1 and meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def test_padded_bucket_gives_the_unpadded_attention():
    """Three decode rows run in a bucket of 4 and match the plain Triton backend."""
    spec = spec_for(group=2)
    layout, q, k, v, k_cache, v_cache = random_batch(spec, [1, 1, 1], [40, 3, 17])
    from pravaha_core.attention.triton_backend import TritonBackend

    backend = TritonBackend(spec)
    want_cache = k_cache.clone(), v_cache.clone()
    want = backend.forward(q, k, v, *want_cache, backend.build_metadata(layout), 0.125, None, None)

    class Runner:                 # what DecodeGraphs reads off the model runner
        attention, device = backend, torch.device("cpu")

    graphs = DecodeGraphs(Runner(), 8, max_blocks_per_seq=16, capture=False)
    graphs.fill(torch.zeros(3, dtype=torch.long), layout, 4)
    qp = torch.cat([q, torch.zeros(1, *q.shape[1:])])
    kp, vp = torch.cat([k, torch.ones(1, *k.shape[1:])]), torch.cat([v, torch.ones(1, *v.shape[1:])])
    got_cache = k_cache.clone(), v_cache.clone()
    got = backend.forward(qp, kp, vp, *got_cache, graphs.metadata(4), 0.125, None, None)
    torch.testing.assert_close(got[:3], want, atol=2e-5, rtol=1e-4)
    assert torch.equal(got_cache[0], want_cache[0]) and torch.equal(got_cache[1], want_cache[1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_through_the_graph_runner_matches_hf(checkpoint, family):
    path = checkpoint(family)
    engine = Engine(path, kv_cache_bytes=1 << 22, block_size=4, attention_backend="triton")
    graphs = eager_graphs(engine)
    runs = []
    run = graphs.run
    graphs.run = lambda ids, layout: runs.append(layout.num_seqs) or run(ids, layout)
    prompts = [engine.tokenizer.encode(p) for p in ("The quick brown fox", "0", "def add(a, b):")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert runs and set(runs) == {3}
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, ids, 8)
