"""The engine's public API on tiny checkpoints and dummy presets."""

import json
import os

import pytest
import torch

from pravaha_core import Engine, SamplingParams
from tests.checkpoints import hf_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture
def engine(llama):
    return Engine(llama, kv_cache_bytes=1 << 21)


def test_generate_accepts_text_and_token_ids_in_prompt_order(engine):
    prompts = ["The quick brown fox", "0", "def add(a, b):"]
    by_text = engine.generate(prompts, GREEDY)
    by_ids = engine.generate([engine.tokenizer.encode(p) for p in prompts], GREEDY)
    assert [o.token_ids for o in by_text] == [o.token_ids for o in by_ids]
    for prompt, out in zip(prompts, by_text):
        assert out.prompt_token_ids == engine.tokenizer.encode(prompt)
        assert len(out.token_ids) == 12 and out.finish_reason == "length" and out.error is None
        assert out.text == engine.tokenizer.decode(out.token_ids)


def test_params_per_prompt(engine):
    outs = engine.generate(["a", "b"], [SamplingParams(max_tokens=3, temperature=0),
                                        SamplingParams(max_tokens=5, temperature=0)])
    assert [len(o.token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="params"):
        engine.generate(["a", "b"], [GREEDY])


def test_stream_deltas_concatenate_to_generate(engine):
    prompt = "Grüße, señor! 你好"
    whole = engine.generate([prompt], GREEDY)[0]
    deltas = list(engine.stream(prompt, GREEDY))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length"


def test_stop_token_ids_end_generation_and_stay_in_output(engine, llama):
    ids = engine.tokenizer.encode("The quick brown fox")
    ref = hf_greedy(llama, ids, 12)
    stop = ref[4]
    out = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == ref[:ref.index(stop) + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(llama, tmp_path):
    # Same weights, but the 3rd greedy token is declared EOS in generation_config.json.
    engine = Engine(llama, kv_cache_bytes=1 << 21)
    ids = engine.tokenizer.encode("The quick brown fox")
    ref = hf_greedy(llama, ids, 12)
    for name in os.listdir(llama):
        os.symlink(os.path.join(llama, name), tmp_path / name)
    os.unlink(tmp_path / "generation_config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ref[2]}))
    eos_engine = Engine(str(tmp_path), kv_cache_bytes=1 << 21)
    stopped = eos_engine.generate([ids], GREEDY)[0]
    assert stopped.token_ids == ref[:ref.index(ref[2]) + 1] and stopped.finish_reason == "stop"
    ignored = eos_engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


def test_requests_join_mid_generation_and_match_solo_runs(engine):
    prompts = ["The quick brown fox", "Paged attention stores keys", "0", "नमस्ते"]
    solo = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    got = {}
    engine.add_request("r0", prompts[0], GREEDY)
    for step in range(40):
        if step < len(prompts) - 1:
            engine.add_request(f"r{step + 1}", prompts[step + 1], GREEDY)  # one joins per step
        for delta in engine.step():
            got.setdefault(delta.request_id, []).extend(delta.token_ids)
        if not engine.has_unfinished():
            break
    assert [got[f"r{i}"] for i in range(len(prompts))] == solo


def test_abort_frees_blocks_and_reports_abort(engine):
    total = engine.kv_cache_info()["num_blocks"]
    engine.add_request("keep", "The quick brown fox", SamplingParams(max_tokens=8, temperature=0))
    engine.add_request("drop", "Paged attention " * 10, SamplingParams(max_tokens=50, temperature=0))
    engine.add_request("queued", "never started", GREEDY)
    engine.step()
    used = total - engine.kv_cache_info()["blocks_free"]
    assert engine.abort("drop") and engine.abort("queued")
    assert not engine.abort("no-such-request")
    assert total - engine.kv_cache_info()["blocks_free"] < used
    reports = {d.request_id: d for d in engine.step()}
    assert reports["drop"].finished and reports["drop"].finish_reason == "abort"
    assert reports["queued"].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_cache_info()["blocks_free"] == total


def test_request_that_can_never_fit_errors_instead_of_hanging(llama):
    engine = Engine(llama, kv_cache_bytes=1 << 21, max_model_len=64)
    too_long = engine.generate(["x " * 40], SamplingParams(max_tokens=30))[0]
    assert too_long.finish_reason == "error" and "context length (64)" in too_long.error
    small = Engine(llama, block_size=4, kv_cache_bytes=3 * Engine(llama, kv_cache_bytes=1 << 20).bytes_per_block // 4)
    assert small.kv_cache_info()["num_blocks"] == 3
    outs = small.generate(["The quick brown fox jumps", "0"], [SamplingParams(max_tokens=30),
                                                               SamplingParams(max_tokens=3, temperature=0)])
    assert outs[0].finish_reason == "error" and "whole cache holds 3" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 3


def test_bad_inputs_raise_clear_errors(engine):
    with pytest.raises(ValueError, match="prompt: is empty"):
        engine.add_request("a", "", GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [1, 10**6], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("a", [1.5], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("a", "hi", {"max_tokens": 0})
    with pytest.raises(ValueError, match="bogus"):
        engine.add_request("a", "hi", {"bogus": 1})
    engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("dup", "hi", GREEDY)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate(["x"], GREEDY)


def test_kv_cache_info_is_exact(llama):
    engine = Engine(llama, kv_cache_bytes=100_000, block_size=8)
    m = engine.runner.model
    per_block = 2 * m.num_layers * 8 * m.num_kv_heads * m.head_dim * 4
    info = engine.kv_cache_info()
    assert info["bytes_per_block"] == per_block
    assert info["num_blocks"] == 100_000 // per_block
    assert info["bytes_total"] == info["num_blocks"] * per_block == engine.runner.kv_cache.nbytes
    assert info["blocks_free"] == info["num_blocks"] and info["block_size"] == 8
    with pytest.raises(ValueError, match="less than one KV block"):
        Engine(llama, kv_cache_bytes=per_block - 1, block_size=8)


def test_default_kv_budget_is_a_fraction_of_free_memory(monkeypatch):
    import pravaha_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "free_memory_bytes", lambda device: 10 << 20)
    engine = Engine("dummy:llama-tiny")
    assert engine.kv_cache_info()["num_blocks"] == int((10 << 20) * 0.20) // engine.bytes_per_block


def test_default_cpu_kv_cache_holds_no_more_than_the_seats_can_use(monkeypatch):
    import pravaha_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "free_memory_bytes", lambda device: 1 << 40)   # a huge host
    engine = Engine("dummy:llama-tiny", max_num_seqs=3, max_model_len=40)
    assert engine.kv_cache_info()["num_blocks"] == 3 * 3          # 3 sequences x ceil(40 / 16) blocks
    assert Engine("dummy:llama-tiny", max_num_seqs=3, max_model_len=40,
                  kv_cache_bytes=1 << 22).kv_cache_info()["num_blocks"] > 9      # an explicit budget is kept


def test_engine_settings_are_validated_against_the_config_fields():
    from pravaha_core import EngineConfig

    with pytest.raises(ValueError, match="max_num_seq: unknown engine setting"):
        Engine("dummy:llama-tiny", max_num_seq=4)
    config = EngineConfig(kv_cache_bytes=1 << 20, max_num_seqs=4)
    with pytest.raises(ValueError, match="config: given together with max_num_seqs"):
        Engine(config=config, max_num_seqs=8)
    with pytest.raises(ValueError, match="config: given together with model"):
        Engine("dummy:gpt2-tiny", config=config)
    with pytest.raises(ValueError, match="config: expected an EngineConfig"):
        Engine(config={"max_num_seqs": 4})
    assert Engine(config=config).config is config
    assert Engine(model="dummy:llama-tiny", kv_cache_bytes=1 << 20, max_num_seqs=4).config == config
    with pytest.raises(ValueError, match="foo: unknown SamplingParams field"):
        SamplingParams(foo=1)
    with pytest.raises(ValueError, match="native_kernels: must be a bool"):
        EngineConfig(native_kernels="no")


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_dummy_presets_generate(preset):
    engine = Engine(f"dummy:{preset}", kv_cache_bytes=1 << 20)
    out = engine.generate(["hello", "प्रवाह"], SamplingParams(max_tokens=5, temperature=0.7, ignore_eos=True))
    assert all(len(o.token_ids) == 5 and all(0 <= t < engine.vocab_size for t in o.token_ids) for o in out)


def test_llama_135m_preset_has_smollm2_shape():
    engine = Engine("dummy:llama-135m", kv_cache_bytes=1 << 22, native_kernels=False)   # dense nn.Linear layers
    m = engine.runner.model
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (30, 9, 3, 64, 49152)
    assert m.tie_word_embeddings and m.lm_head is None
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert len(engine.generate(["hi"], SamplingParams(max_tokens=2))[0].token_ids) == 2


def test_unknown_preset_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="known: gpt2-tiny, llama-135m, llama-tiny"):
        Engine("dummy:nope")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported architecture BertModel; supported: LlamaForCausalLM"):
        Engine(str(tmp_path))


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ValueError, match="could not fetch model 'no-such-org/no-such-model'"):
        Engine("no-such-org/no-such-model")


def test_load_format_dummy_uses_config_with_random_weights(llama):
    real = Engine(llama, kv_cache_bytes=1 << 20)
    fake = Engine(llama, kv_cache_bytes=1 << 20, load_format="dummy")
    real_w, fake_w = real.runner.model.embed_tokens.weight, fake.runner.model.embed_tokens.weight
    assert real_w.shape == fake_w.shape and not torch.equal(real_w, fake_w)
    assert fake.tokenizer.encode("fox") == real.tokenizer.encode("fox")


def test_pytorch_bin_checkpoint_loads(tmp_path, llama):
    import shutil

    from safetensors.torch import load_file

    for name in os.listdir(llama):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(llama, name), tmp_path / name)
    torch.save(load_file(os.path.join(llama, "model.safetensors")), tmp_path / "pytorch_model.bin")
    bin_engine, st_engine = Engine(str(tmp_path), kv_cache_bytes=1 << 20), Engine(llama, kv_cache_bytes=1 << 20)
    assert bin_engine.generate(["fox"], GREEDY)[0].token_ids == st_engine.generate(["fox"], GREEDY)[0].token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes(llama, dtype):
    engine = Engine(llama, dtype=dtype, kv_cache_bytes=1 << 20)
    assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
    assert engine.bytes_per_block * 2 == Engine(llama, kv_cache_bytes=1 << 20).bytes_per_block
    outs = engine.generate(["The quick brown fox", "0"], GREEDY)
    assert all(len(o.token_ids) == 12 for o in outs)


def test_top_k_1_is_greedy_and_sampling_stays_in_vocab(engine):
    greedy = engine.generate(["The quick brown fox"], GREEDY)[0].token_ids
    top1 = engine.generate(["The quick brown fox"], SamplingParams(max_tokens=12, temperature=1.3, top_k=1))[0]
    assert top1.token_ids == greedy
    sampled = engine.generate(["The quick brown fox"] * 4, SamplingParams(max_tokens=12, top_p=0.9))
    assert all(0 <= t < engine.vocab_size for o in sampled for t in o.token_ids)


def test_num_admittable_counts_seats_and_blocks(llama):
    engine = Engine(llama, kv_cache_bytes=1 << 21, max_num_seqs=3)
    assert engine.num_admittable() == 3
    engine.add_request("a", "The quick brown fox", GREEDY)
    assert engine.num_admittable() == 2
    engine.step()
    assert engine.num_admittable() == 2
    tiny = Engine(llama, kv_cache_bytes=2 * engine.bytes_per_block, max_num_seqs=3)
    tiny.add_request("b", [5] * 20, GREEDY)   # 20 tokens: promised 2 blocks of 16
    assert tiny.num_admittable() == 0
