"""Speculative decoding building blocks: config validation, n-gram proposals, greedy and
rejection-sampling verification (chi-square against the target distribution), acceptance stats."""

import pytest
import torch

from pravaha_core.spec_decode import (AcceptanceStats, SpeculativeConfig, check_draft_vocab, ngram_propose,
                                      parse_speculative_config, verify_greedy, verify_sampled)

# Chi-square critical value for 4 degrees of freedom at p = 0.001 (5-token vocabulary).
CHI2_DF4_P001 = 18.467


def test_config_parses_dict_and_json():
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == \
        ("ngram", 4, 2, 4)
    draft = parse_speculative_config({"method": "draft_model", "model": "dummy:llama-tiny", "num_speculative_tokens": 2})
    assert draft.model == "dummy:llama-tiny"
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("settings, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "lookahead"),
    ("{not json", "not JSON"),
    ("[1]", "must be an object"),
])
def test_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(settings)


def test_draft_vocab_mismatch():
    check_draft_vocab(100, 100)
    with pytest.raises(ValueError, match="vocabulary"):
        check_draft_vocab(100, 101)


def test_ngram_proposes_continuation_of_latest_match():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 5, 6, 7]
    # Suffix [5, 6, 7] last occurred earlier at 5..7 followed by [1, 5, 6, 7].
    assert ngram_propose(tokens, 3, 2, 4) == [1, 5, 6]
    assert ngram_propose(tokens, 10, 2, 4) == [1, 5, 6, 7]
    assert ngram_propose([1, 2, 3, 4], 4, 2, 4) == []
    # The longest n-gram wins: suffix [3, 4] matches at two places, [2, 3, 4] only at the first.
    assert ngram_propose([2, 3, 4, 7, 0, 3, 4, 8, 2, 3, 4], 2, 2, 3) == [7, 0]
    assert ngram_propose([2, 3, 4, 7, 0, 3, 4, 8, 2, 3, 4], 2, 2, 2) == [8, 2]


def test_greedy_verification_matches_plain_greedy():
    assert verify_greedy([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert verify_greedy([1, 2, 3], [1, 9, 3, 4]) == [1, 9]
    assert verify_greedy([1, 2, 3], [7, 2, 3, 4]) == [7]
    assert verify_greedy([], [5]) == [5]


def _chi_square(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=probs.shape[0]).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(one_hot):
    """Each emitted position follows the target's row, whatever the draft proposed."""
    gen = torch.Generator().manual_seed(1234)
    target = torch.tensor([[0.10, 0.40, 0.20, 0.25, 0.05],
                           [0.30, 0.05, 0.15, 0.20, 0.30],
                           [0.20, 0.20, 0.20, 0.20, 0.20]])
    draft = torch.tensor([[0.50, 0.10, 0.10, 0.20, 0.10],
                          [0.05, 0.60, 0.05, 0.10, 0.20]])
    first, second, num_accepted = [], [], 0
    for _ in range(6000):
        if one_hot:  # n-gram: a fixed guess, q one-hot on it
            draft_ids, draft_probs = [1, 4], None
        else:
            draft_ids = [int(torch.multinomial(draft[i], 1, generator=gen)) for i in range(2)]
            draft_probs = draft
        kept = verify_sampled(draft_ids, target, draft_probs, torch.rand(2, generator=gen), torch.rand(3, generator=gen))
        assert 1 <= len(kept) <= 3
        num_accepted += len(kept) - 1
        first.append(kept[0])
        if len(kept) > 1:  # the second token exists only after the first draft was accepted
            second.append(kept[1])
    assert _chi_square(first, target[0]) < CHI2_DF4_P001
    assert _chi_square(second, target[1]) < CHI2_DF4_P001
    assert num_accepted > 0


def test_rejection_sampling_is_deterministic_in_its_uniforms():
    target = torch.softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), -1)
    u_accept, u_resample = torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.5, 0.7])
    runs = {tuple(verify_sampled([2, 5], target, None, u_accept, u_resample)) for _ in range(3)}
    assert len(runs) == 1


def test_acceptance_stats_and_policy():
    stats = AcceptanceStats(window=2, min_rate=0.5)
    stats.record("a", 4, 4)
    stats.record("a", 4, 0)
    assert stats.should_speculate("a")  # mean 0.5 is not under min_rate
    stats.record("a", 4, 1)
    assert not stats.should_speculate("a")  # last two: 0 and 0.25
    assert stats.should_speculate("b")
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (12, 5)
    assert stats.mean_acceptance_length == pytest.approx((5 + 3) / 3)
    stats.forget("a")
    assert stats.should_speculate("a")


# ---- in the engine ---------------------------------------------------------------------------
from pravaha_core import Engine, SamplingParams  # noqa: E402
from pravaha_core.block_manager import BlockManager  # noqa: E402
from pravaha_core.scheduler import ModelRunnerOutput, Scheduler  # noqa: E402
from pravaha_core.sequence import Sequence  # noqa: E402
from pravaha_core.spec_decode import NgramSpeculator  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
# Repeated spans, so prompt lookup finds matches (random weights also loop under greedy).
SPEC_PROMPTS = [[5, 9, 13, 17, 5, 9, 13, 17, 5, 9], [40, 41, 42, 43, 44, 40, 41, 42], [7, 8, 7, 8, 7, 8, 7],
                [100, 3, 200, 3, 100, 3]]


def _pair(path: str, params: SamplingParams, **settings):
    off = Engine(path, **settings).generate(SPEC_PROMPTS, params)
    engine = Engine(path, speculative_config=NGRAM, **settings)
    on = engine.generate(SPEC_PROMPTS, params)
    return off, on, engine


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2"])
def test_greedy_identical_with_ngram(checkpoint, family):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    off, on, engine = _pair(checkpoint(family), params, kv_cache_bytes=1 << 22, block_size=4)
    assert _tokens(on) == _tokens(off)
    assert [o.outputs[0].text for o in on] == [o.outputs[0].text for o in off]
    assert engine.stats.num_spec_accepted_tokens > 0, "nothing was accepted: the test proves nothing"
    assert engine.kv_cache_info()["blocks_free"] == engine.kv_cache_info()["num_blocks"]


def test_n2_requests_do_not_speculate_and_match(checkpoint):
    params = SamplingParams(max_tokens=20, temperature=0.0, n=2)
    off, on, engine = _pair(checkpoint("llama"), params, kv_cache_bytes=1 << 22, block_size=4,
                            max_num_batched_tokens=7)
    assert _tokens(on) == _tokens(off) and engine.stats.num_spec_steps == 0


@pytest.mark.parametrize("settings", [dict(max_num_batched_tokens=7), dict(kv_cache_bytes=None)],
                         ids=["chunked", "preempted"])
def test_greedy_identical_chunked_and_preempted(checkpoint, settings):
    path = checkpoint("llama")
    if settings.get("kv_cache_bytes", 1) is None:   # a cache of a few blocks forces preemption
        probe = Engine(path, kv_cache_bytes=1 << 20, block_size=4)
        settings = dict(kv_cache_bytes=10 * probe.bytes_per_block)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[41])
    off, on, engine = _pair(path, params, block_size=4, **dict({"kv_cache_bytes": 1 << 22}, **settings))
    assert _tokens(on) == _tokens(off)
    assert [c.finish_reason for o in on for c in o.outputs] == [c.finish_reason for o in off for c in o.outputs]
    assert engine.stats.num_spec_accepted_tokens > 0
    if "max_num_batched_tokens" not in settings:
        assert engine.stats.num_preemptions > 0


def test_stream_deltas_add_up_with_speculation(checkpoint):
    engine = Engine(checkpoint("llama"), speculative_config=NGRAM, kv_cache_bytes=1 << 22, block_size=4)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    deltas = list(engine.stream(SPEC_PROMPTS[0], params))
    whole = engine.generate([SPEC_PROMPTS[0]], params)[0].outputs[0]
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == whole.token_ids
    assert len(whole.token_ids) == 30 and len(deltas) < 30   # some steps emitted several tokens


def test_rollback_frees_exactly_the_rejected_blocks():
    """Hand-made verification result: 3 drafts, 1 accepted; the block past the kept tokens is freed."""
    bm = BlockManager(num_blocks=16, block_size=2)
    speculator = NgramSpeculator(SpeculativeConfig("ngram", 4))
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                          eos_token_ids={0}, speculator=speculator)
    seq = Sequence("r", [1, 2, 3, 1, 2, 3, 1], SamplingParams(max_tokens=20, temperature=0.0), seed=0)
    scheduler.add(seq)
    prefill = scheduler.schedule()
    scheduler.update(prefill, ModelRunnerOutput({seq.seq_id: 2}))        # 8 tokens, 7 computed
    assert len(seq.block_table) == 4
    plan = scheduler.schedule()
    chunk = plan.chunks[0]
    assert chunk.draft_ids == [3, 1, 2] and (chunk.start, chunk.num_tokens) == (7, 4)
    assert len(seq.block_table) == 6 and bm.num_free_blocks == 10          # rows up to position 10
    scheduler.update(plan, ModelRunnerOutput({}, spec_token_ids={seq.seq_id: [3, 9]}))
    assert seq.token_ids[8:] == [3, 9] and seq.num_computed_tokens == 9
    assert len(seq.block_table) == 5 and bm.num_free_blocks == 11          # positions 0..8 kept
    assert (speculator.stats.num_draft_tokens, speculator.stats.num_accepted_tokens) == (3, 1)
    plan = scheduler.schedule()                                             # [3, 9] never occurred
    assert not plan.chunks[0].draft_ids and plan.chunks[0].num_tokens == 1
    scheduler.update(plan, ModelRunnerOutput({seq.seq_id: 0}))              # EOS
    assert seq.is_finished and bm.num_free_blocks == 16


def test_worker_flag_and_env_take_json():
    import argparse
    from dataclasses import fields

    from pravaha_core.config import EngineConfig
    from worker.settings import add_config_flags

    selected = [f for f in fields(EngineConfig) if f.name == "speculative_config"]
    parser = argparse.ArgumentParser()
    add_config_flags(parser, EngineConfig, selected, {"PRAVAHA_SPECULATIVE_CONFIG": '{"method": "ngram", '
                                                      '"num_speculative_tokens": 3}'})
    assert parser.parse_args([]).speculative_config["num_speculative_tokens"] == 3
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    config = EngineConfig(speculative_config=args.speculative_config)
    assert config.speculative_config["num_speculative_tokens"] == 2
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 0})


def test_spec_decode_counters_reach_prometheus(checkpoint):
    """The worker's scrape-time collector exports the engine's speculation counters."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from worker.metrics import _EngineCollector

    _, _, engine = _pair(checkpoint("llama"), SamplingParams(max_tokens=24, temperature=0.0),
                         kv_cache_bytes=1 << 22, block_size=4)
    registry = CollectorRegistry()
    registry.register(_EngineCollector(SimpleNamespace(engine=engine)))
    text = generate_latest(registry).decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("pravaha_spec")}
    s = engine.stats
    assert values["pravaha_spec_decode_draft_tokens_total"] == s.num_spec_draft_tokens > 0
    assert values["pravaha_spec_decode_accepted_tokens_total"] == s.num_spec_accepted_tokens > 0
    assert values["pravaha_spec_decode_mean_acceptance_length"] == 1 + s.num_spec_accepted_tokens / s.num_spec_steps
