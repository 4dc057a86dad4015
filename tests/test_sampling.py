"""Sampling pipeline: against HF's logits processors and models, and statistically."""

import math

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from pravaha_core.sampler import PenaltyInputs, SamplingBatch, apply_penalties, sample
from pravaha_core.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer
from tests.checkpoints import _hf_model, hf_greedy

PROMPTS = ["The quick brown fox", "Paged attention stores keys and values", "नमस्ते दुनिया", "0"]


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def engine(llama):
    return Engine(llama, kv_cache_bytes=1 << 21)


def batch_for(n, vocab, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """n rows of one fixed distribution, each row a different draw (distinct positions)."""
    return SamplingBatch(
        temperature=torch.full((n,), temperature), top_k=torch.full((n,), top_k or vocab),
        top_p=torch.full((n,), top_p), min_p=torch.full((n,), min_p),
        seed_keys=torch.full((n,), 1234), positions=torch.arange(n),
        all_greedy=False, needs_truncation=bool(top_k or top_p < 1 or min_p))


def hf_expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution HF's warpers leave (temperature, top-k, top-p, min-p, in that order)."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.0, top_k=3),
                                    dict(temperature=0.9, top_p=0.7), dict(temperature=1.2, min_p=0.15),
                                    dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)])
def test_sampled_frequencies_match_the_truncated_softmax(kwargs):
    logits = torch.tensor([2.0, 1.5, 1.2, 0.8, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    n = 40_000
    tokens = torch.tensor(sample(logits.expand(n, -1), batch_for(n, len(logits), **kwargs)).token_ids)
    observed = torch.bincount(tokens, minlength=len(logits)).double() / n
    expected = hf_expected(logits, **kwargs).double()
    assert torch.equal(observed > 0, expected > 0), (observed, expected)   # same support
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() <= 5 * sigma + 1e-12).all(), (observed, expected)


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    alone = [sample(logits[i:i + 1], batch_for(1, 50, temperature=0.9)).token_ids[0] for i in range(6)]
    batch = batch_for(6, 50, temperature=0.9)
    batch.positions = torch.zeros(6, dtype=torch.long)
    together = sample(logits, batch).token_ids
    assert together == alone


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=gen)
    prompt = torch.randint(0, 40, (3, 7), generator=gen)
    output = torch.randint(0, 40, (3, 5), generator=gen)
    pen = PenaltyInputs(repetition=torch.tensor([1.3, 1.3, 1.3]), presence=torch.zeros(3),
                        frequency=torch.zeros(3), prompt_ids=prompt, output_ids=output)
    ours = apply_penalties(logits.clone(), pen)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.cat([prompt, output], 1), logits.clone())
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_follow_the_openai_rule():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 30, generator=gen)
    output = torch.tensor([[3, 3, 3, 7, 30], [1, 2, 30, 30, 30]])   # 30 pads (vocab is 30)
    prompt = torch.tensor([[4, 5], [6, 30]])
    pen = PenaltyInputs(repetition=torch.ones(2), presence=torch.tensor([0.5, -1.0]),
                        frequency=torch.tensor([0.25, 1.5]), prompt_ids=prompt, output_ids=output)
    ours = apply_penalties(logits.clone(), pen)
    expected = logits.clone()
    for row, ids in enumerate(output.tolist()):
        for tok in set(ids) - {30}:
            count = ids.count(tok)
            expected[row, tok] -= pen.frequency[row] * count + pen.presence[row]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_greedy_with_repetition_penalty_matches_hf_generate(engine, llama):
    model = _hf_model(llama)
    for prompt in PROMPTS[:3]:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        out = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.5))[0]
        assert out.token_ids == ref


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.5, top_k=1))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_seeded_request_is_the_same_alone_and_in_any_batch(llama):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    alone = Engine(llama, kv_cache_bytes=1 << 21).generate([PROMPTS[1]], seeded)[0].token_ids
    others = [SamplingParams(max_tokens=15, temperature=0.8), SamplingParams(max_tokens=9, temperature=0),
              SamplingParams(max_tokens=20, temperature=1.3, seed=99)]
    crowded = Engine(llama, kv_cache_bytes=1 << 21, max_num_batched_tokens=6)      # chunked prefill
    outs = crowded.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]], [others[0], others[1], seeded, others[2]])
    assert outs[2].token_ids == alone
    probe = Engine(llama, kv_cache_bytes=1 << 20, block_size=4)
    tight = Engine(llama, block_size=4, kv_cache_bytes=16 * probe.bytes_per_block)  # forces preemption
    outs = tight.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others[0], seeded, others[2]])
    assert tight.stats.num_preemptions > 0
    assert outs[1].token_ids == alone
    unseeded = Engine(llama, kv_cache_bytes=1 << 21).generate([PROMPTS[1]] * 4, SamplingParams(max_tokens=20))
    assert len({tuple(o.token_ids) for o in unseeded}) > 1, "unseeded requests should differ"


def test_logprobs_equal_hf_log_softmax(engine, llama):
    model = _hf_model(llama)
    ids = engine.tokenizer.encode(PROMPTS[0])
    out = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0.7, seed=3, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    prefix = list(ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            ref = model(torch.tensor([prefix])).logits[0, -1].log_softmax(-1)
        top = ref.topk(5)
        assert list(entry)[:5] == top.indices.tolist()
        for tok, lp in entry.items():
            assert math.isclose(lp, ref[tok].item(), abs_tol=1e-4)
        assert token in entry and len(entry) in (5, 6)
        prefix.append(token)


def test_stop_string_split_across_tokens(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    free = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0))[0]
    pieces = [engine.tokenizer.decode([t]) for t in free.token_ids]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    start = free.text.find(stop)
    assert start != -1
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop, "never-appears"])
    out = engine.generate([ids], params)[0]
    assert out.finish_reason == "stop" and out.text == free.text[:start]
    assert free.token_ids[:len(out.token_ids)] == out.token_ids and len(out.token_ids) < len(free.token_ids)
    assert engine.tokenizer.decode(out.token_ids).startswith(out.text + stop)
    kept = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, stop=stop,
                                                 include_stop_str_in_output=True))[0]
    assert kept.text == free.text[:start] + stop
    deltas = list(engine.stream(ids, params))
    assert "".join(d.text for d in deltas) == out.text
    assert deltas[-1].finish_reason == "stop"


def test_min_tokens_suppresses_eos_stop_tokens_and_stop_strings(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    free = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0))[0]
    early = free.token_ids[1]
    stopped = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[early]))[0]
    assert len(stopped.token_ids) == 2
    held = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[early],
                                                 min_tokens=6))[0]
    assert len(held.token_ids) >= 6 and early not in held.token_ids[:6]
    assert held.token_ids[-1] == early or len(held.token_ids) == 16


def test_n_samples_share_prompt_blocks(llama):
    engine = Engine(llama, kv_cache_bytes=1 << 21, block_size=4)
    prompt = engine.tokenizer.encode(PROMPTS[1] * 2)
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=11)
    engine.add_request("r", prompt, params)
    outs, shared_seen = [], False
    while engine.has_unfinished():
        outs += engine.step()
        running = [s for s in engine.scheduler.running if s.request_id == "r"]
        if len(running) == 3:
            first = running[0].block_table[0]
            shared_seen |= all(s.block_table[0] == first for s in running)
            assert engine.block_manager.allocator.ref_counts[first] == 3
            full = (len(prompt) - 1) // 4
            assert all(s.block_table[:full] == running[0].block_table[:full] for s in running)
    assert shared_seen
    assert engine.kv_cache_info()["blocks_free"] == engine.kv_cache_info()["num_blocks"]
    whole = Engine(llama, kv_cache_bytes=1 << 21, block_size=4).generate([prompt], params)[0]
    assert [c.index for c in whole.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in whole.outputs)
    assert len({tuple(c.token_ids) for c in whole.outputs}) == 3, "samples should differ"
    streamed = {}
    for delta in outs:
        for c in delta.outputs:
            streamed.setdefault(c.index, []).extend(c.token_ids)
    assert [streamed[i] for i in range(3)] == [c.token_ids for c in whole.outputs]
    assert outs[-1].finished
    greedy = Engine(llama, kv_cache_bytes=1 << 21).generate([prompt], SamplingParams(n=2, max_tokens=8, temperature=0))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == hf_greedy(llama, prompt, 8)


UNICODE = "नमस्ते दुनिया — प्रवाह। Grüße, señor! 你好，世界。 🙂🚀 emoji 👩‍👩‍👧 done"


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_incremental_detokenizer_deltas_add_up_on_unicode(llama, kind):
    tok = HFTokenizer(llama, set()) if kind == "bpe" else ByteTokenizer(512)
    ids = tok.encode(UNICODE)
    detok = IncrementalDetokenizer(tok, tok.encode("prefix: "), skip_special_tokens=True)
    deltas = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == UNICODE
    assert not any("\ufffd" in d for d in deltas)
    if kind == "bytes":
        assert sum(1 for d in deltas if d == "") > 10   # bytes of split characters were held back


def test_streamed_text_equals_final_text_on_sampled_unicode(llama):
    engine = Engine(llama, kv_cache_bytes=1 << 21)
    for seed in range(4):
        params = SamplingParams(max_tokens=40, temperature=1.5, seed=seed)
        whole = engine.generate([UNICODE[:12]], params)[0]
        deltas = list(engine.stream(UNICODE[:12], params))
        assert "".join(d.text for d in deltas) == whole.text == engine.tokenizer.decode(whole.token_ids)
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1),
                                         ("n", 0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
                                         ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("logprobs", -1),
                                         ("logprobs", 21), ("min_tokens", -1), ("stop", [""]), ("stop", 5),
                                         ("seed", 1.5), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
                                         ("temperature", "hot")])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_wire_fields_are_rejected():
    with pytest.raises(ValueError, match="best_of: unknown sampling parameter"):
        SamplingParams.from_dict({"max_tokens": 4, "best_of": 2})
    assert SamplingParams.from_dict({"stop": "x", "n": 2}).stop == ["x"]
