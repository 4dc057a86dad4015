"""Greedy output of Engine.generate is token-identical to HF generate, one prompt at a time."""

import pytest

from pravaha_core import Engine, SamplingParams
from tests.checkpoints import hf_greedy
from tests.conftest import FAMILIES

PROMPTS = [
    "The quick brown fox",
    "Paged attention stores keys and values in fixed-size blocks. " * 3,
    "नमस्ते दुनिया",
    "def add(a, b):",
    "0",
    "Continuous batching keeps the accelerator busy while requests come and go. Pravaha means flow.",
    "Grüße, señor! 你好",
    "prompts flow in, tokens flow out " * 4,
]
MAX_TOKENS = 24


def run_engine(path, **engine_kwargs):
    engine = Engine(path, **engine_kwargs)
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    plans = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan: plans.append(
        [(c.start, c.num_tokens) for c in plan.chunks]) or execute(plan)
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return engine, prompt_ids, outs, plans


_references: dict[str, list[list[int]]] = {}


def references(path, prompt_ids):
    if path not in _references:
        _references[path] = [hf_greedy(path, ids, MAX_TOKENS) for ids in prompt_ids]
    return _references[path]


def assert_matches_hf(engine, path, prompt_ids, outs):
    assert len({len(p) for p in prompt_ids}) >= 6, "prompts should have mixed lengths"
    for ids, out, ref in zip(prompt_ids, outs, references(path, prompt_ids)):
        assert out.token_ids == ref, f"prompt of {len(ids)} tokens diverged"
        stopped = ref[-1] in engine.tokenizer.eos_token_ids
        assert out.finish_reason == ("stop" if stopped else "length")


@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf(checkpoint, family, native_kernels):
    path = checkpoint(family)
    engine, prompt_ids, outs, plans = run_engine(path, kv_cache_bytes=1 << 22, native_kernels=native_kernels)
    assert engine.runner.attention.name == ("cpu" if native_kernels else "torch")
    assert_matches_hf(engine, path, prompt_ids, outs)
    assert max(len(p) for p in plans) == len(PROMPTS), "all prompts should share one batch"
    assert engine.kv_cache_info()["blocks_free"] == engine.kv_cache_info()["num_blocks"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_under_preemption(checkpoint, family):
    path = checkpoint(family)
    probe = Engine(path, kv_cache_bytes=1 << 20, block_size=4)
    # Room for the longest request alone, but far from all eight at once.
    longest = max(len(probe.tokenizer.encode(p)) for p in PROMPTS) + MAX_TOKENS
    num_blocks = -(-longest // 4) + 2
    engine, prompt_ids, outs, _ = run_engine(path, block_size=4,
                                             kv_cache_bytes=num_blocks * probe.bytes_per_block)
    assert engine.kv_cache_info()["num_blocks"] == num_blocks
    assert engine.stats.num_preemptions > 0
    assert_matches_hf(engine, path, prompt_ids, outs)
    assert engine.kv_cache_info()["blocks_free"] == num_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_with_chunked_prefill(checkpoint, family):
    path = checkpoint(family)
    engine, prompt_ids, outs, plans = run_engine(path, kv_cache_bytes=1 << 22, max_num_batched_tokens=7)
    assert all(sum(n for _, n in plan) <= 7 for plan in plans)
    assert any(start > 0 and n > 1 for plan in plans for start, n in plan), "no prefill was chunked"
    assert_matches_hf(engine, path, prompt_ids, outs)


@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernel", "torch"])
def test_sliding_window_matches_hf(checkpoint, native_kernels):
    path = checkpoint("mistral", sliding_window=6)
    engine, prompt_ids, outs, _ = run_engine(path, kv_cache_bytes=1 << 22, native_kernels=native_kernels)
    assert engine.runner.model.sliding_windows == [6, 6]
    assert_matches_hf(engine, path, prompt_ids, outs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_cache_hits_leave_outputs_unchanged(checkpoint, family):
    path = checkpoint(family)
    engine = Engine(path, kv_cache_bytes=1 << 22, block_size=4)
    shared = engine.tokenizer.encode("Paged attention stores keys and values in fixed-size blocks. " * 2)
    prompts = [shared + engine.tokenizer.encode(tail) for tail in ("The quick brown fox", "0", "नमस्ते", "def")]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    first = engine.generate(prompts, params)
    hits_first = engine.stats.num_cached_prompt_tokens
    second = engine.generate(prompts, params)
    # The second pass finds every full prompt block (all but the last token) in the cache.
    expected = sum((len(p) - 1) // 4 * 4 for p in prompts)
    assert engine.stats.num_cached_prompt_tokens - hits_first == expected
    off = Engine(path, kv_cache_bytes=1 << 22, block_size=4, enable_prefix_caching=False).generate(prompts, params)
    for ids, a, b, c in zip(prompts, first, second, off):
        ref = hf_greedy(path, ids, MAX_TOKENS)
        assert a.token_ids == b.token_ids == c.token_ids == ref
