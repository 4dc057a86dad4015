"""Structured outputs on random-weight models: the constraint carries the whole format."""

import json
import re

import jsonschema
import pytest

from pravaha_core import Engine, SamplingParams
from producer import openai_api

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                                   "kind": {"enum": ["home", "work"]}},
                    "required": ["zip", "kind"]},
        "contact": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5},
                              {"type": "boolean"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "address", "contact"],
}
# Strings of random bytes may need \uXXXX escapes: 6 tokens per character at worst.
MAX_TOKENS = 240


@pytest.fixture(scope="module")
def engine():
    return Engine("dummy:llama-tiny", kv_cache_bytes=1 << 24)


@pytest.fixture(scope="module")
def hf_engine(checkpoint):
    return Engine(checkpoint("llama"), kv_cache_bytes=1 << 23)


def constrained(spec: dict, seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", MAX_TOKENS), seed=seed, structured_outputs=spec, **kw)


def check_json(outputs, schema=SCHEMA) -> None:
    for out in outputs:
        for c in out.outputs:
            assert c.finish_reason == "stop", (c.finish_reason, c.text)
            jsonschema.validate(json.loads(c.text), schema)


@pytest.mark.parametrize("which", ["dummy", "hf"])
def test_json_schema_outputs_validate(which, request):
    eng = request.getfixturevalue("engine" if which == "dummy" else "hf_engine")
    outs = eng.generate(["Fill in the record: "] * 20, [constrained({"json": SCHEMA}, s) for s in range(20)])
    check_json(outs)
    assert len({o.outputs[0].text for o in outs}) > 10      # sampled, not one forced answer


def test_schema_as_string_and_json_object(engine):
    outs = engine.generate(["a", "b"], [constrained({"json": json.dumps(SCHEMA)}, 1),
                                        constrained({"json_object": True}, 2, max_tokens=400)])
    check_json(outs[:1])
    c = outs[1].outputs[0]
    # Any JSON object may nest without bound; a finished one parses, a cut one is a prefix of one.
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    assert c.text.startswith("{")


def test_regex_choice_and_grammar(engine):
    regex = r"[a-z]{2,6}@(mail|post)\.(com|org)"
    choices = ["yes", "no", "maybe so"]
    grammar = 'root ::= "(" expr ")"\nexpr ::= num | num "+" num\nnum ::= [1-9] [0-9]?'
    params = ([constrained({"regex": regex}, s) for s in range(20)]
              + [constrained({"choice": choices}, s) for s in range(20)]
              + [constrained({"grammar": grammar}, s) for s in range(20)])
    outs = engine.generate(["x"] * 60, params)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert all(re.fullmatch(regex, t) for t in texts[:20]), texts[:20]
    assert all(t in choices for t in texts[20:40]) and len(set(texts[20:40])) > 1, texts[20:40]
    assert all(re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)?\)", t) for t in texts[40:]), texts[40:]


@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "nonsense"}}, ["json", "nonsense"]),
    ({"json": "{not json"}, ["json", "not valid JSON"]),
    ({"json": {"$ref": "#/definitions/missing"}}, ["json", "missing"]),
    ({"regex": "(ab"}, ["regex", "parenthesis"]),
    ({"grammar": "root ::= undefined_rule"}, ["grammar", "undefined_rule"]),
    ({"choice": []}, ["choice"]),
    ({"json_object": 1}, ["json_object"]),
    ({"regex": "a", "choice": ["a"]}, ["exactly one"]),
    ({"xml": "<a/>"}, ["xml", "unknown"]),
    ("json", ["mapping"]),
])
def test_bad_specs_raise_naming_the_problem(spec, words):
    with pytest.raises(ValueError) as err:
        SamplingParams(structured_outputs=spec)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_response_format_maps_onto_structured_outputs():
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}
    assert SamplingParams.from_dict({"response_format": fmt}).structured_outputs == {"json": SCHEMA}
    assert SamplingParams.from_dict({"response_format": {"type": "json_object"}}).structured_outputs == {
        "json_object": True}
    assert SamplingParams.from_dict({"response_format": {"type": "text"}}).structured_outputs is None
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, "json"):
        with pytest.raises(ValueError, match="response_format"):
            SamplingParams.from_dict({"response_format": bad})


def test_grammar_end_finishes_with_stop_and_cache_hits():
    eng = Engine("dummy:llama-tiny", kv_cache_bytes=1 << 22)
    outs = eng.generate(["q"] * 3, [constrained({"choice": ["alpha", "beta"]}, s, ignore_eos=True) for s in range(3)])
    assert all(o.outputs[0].finish_reason == "stop" and o.outputs[0].text in ("alpha", "beta") for o in outs)
    stats = eng.stats
    assert stats.num_grammars_compiled == 1 and stats.num_grammar_cache_hits == 2
    assert stats.grammar_compile_time_s > 0
    eng.generate(["q"], [constrained({"choice": ["alpha", "beta"]}, 9)])
    assert eng.stats.num_grammars_compiled == 1 and eng.stats.num_grammar_cache_hits == 3


def test_mixed_batch_leaves_free_rows_alone(engine):
    free = [SamplingParams(max_tokens=24, seed=s, temperature=t) for s, t in ((1, 1.0), (2, 0.0), (3, 0.7))]
    alone = engine.generate(["p one", "p two", "p three"], free)
    cons = [constrained({"json": SCHEMA}, 0), constrained({"regex": "[a-z]{20,30}"}, 1),
            constrained({"choice": ["yes", "no"]}, 2)]
    mixed = engine.generate(["c", "p one", "p two", "c", "p three", "c"], cons[:1] + free[:2] + cons[1:2] + free[2:] + cons[2:])
    assert [mixed[i].outputs[0].token_ids for i in (1, 2, 4)] == [o.outputs[0].token_ids for o in alone]
    check_json(mixed[:1])
    assert re.fullmatch("[a-z]{20,30}", mixed[3].outputs[0].text) and mixed[5].outputs[0].text in ("yes", "no")


def test_seeded_constrained_request_is_batch_invariant(engine):
    p = constrained({"json": SCHEMA}, 42)
    alone = engine.generate(["record"], [p])[0]
    others = [constrained({"regex": "[0-9]{3,9}"}, s) for s in range(3)] + [SamplingParams(max_tokens=30, seed=7)]
    batched = engine.generate(["x", "y", "record", "z", "w"], others[:2] + [p] + others[2:])[2]
    assert batched.outputs[0].token_ids == alone.outputs[0].token_ids
    check_json([alone])


def test_n_samples_each_follow_the_grammar(engine):
    outs = engine.generate(["a", "b"], [constrained({"json": SCHEMA}, s, n=3) for s in (5, 6)])
    assert all(len(o.outputs) == 3 for o in outs)
    check_json(outs)
    assert len({c.text for o in outs for c in o.outputs}) == 6


def test_stop_string_ends_a_constrained_request(engine):
    regex = "[a-z]{6,12}"
    outs = engine.generate(["s"] * 20, [constrained({"regex": regex}, s, stop=["e"]) for s in range(20)])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert all("e" not in t and re.fullmatch("[a-z]*", t) for t in texts)
    cut = [t for t in texts if not re.fullmatch(regex, t)]
    assert cut and len(cut) < 20, texts     # some cut by the stop string, some by the grammar


def test_preemption_mid_json_recomputes_the_same_valid_output(engine):
    params = [constrained({"json": SCHEMA}, s) for s in range(8)]
    ample = engine.generate(["Fill in: "] * 8, params)
    blocks_per_request = (9 + MAX_TOKENS) // 16 + 1
    tight = Engine("dummy:llama-tiny", kv_cache_bytes=engine.bytes_per_block * blocks_per_request * 2)
    outs = tight.generate(["Fill in: "] * 8, params)
    assert tight.stats.num_preemptions > 0
    check_json(outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ample]


def test_openai_body_response_format_becomes_structured_outputs():
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA, "strict": True}}
    parsed = openai_api.parse_body(openai_api.CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                                    "response_format": fmt})
    assert parsed.params["structured_outputs"] == {"json": SCHEMA}
    parsed = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "a+"}})
    assert parsed.params["structured_outputs"] == {"regex": "a+"}
    for bad, word in [({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "nonsense"),
                      ({"type": "xml"}, "xml")]:
        with pytest.raises(openai_api.RequestError) as err:
            openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": "x", "response_format": bad})
        assert word in err.value.message and err.value.param in ("response_format", "structured_outputs")


def test_bulk_file_with_response_format_lines(tmp_path):
    from tests.test_bulk import bulk, by_line, check_completion_line, check_error_line, completion, read_output, \
        write_jsonl

    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}
    lines = [completion(f"json-{i}", f"record {i}", MAX_TOKENS, temperature=1.0, seed=i, response_format=fmt)
             for i in range(3)]
    lines += [completion("object", "any object", 200, seed=3, temperature=1.0, response_format={"type": "json_object"}),
              completion("bad", "x", 8, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 3}}}),
              completion("free", "plain text", 8)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", timeout=240)
    got = by_line(read_output(tmp_path / "out.jsonl"), len(lines))
    for i in range(3):
        choice = check_completion_line(got[i], f"json-{i}", MAX_TOKENS)["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)
    assert check_completion_line(got[3], "object", 200)["choices"][0]["text"].startswith("{")
    check_error_line(got[4], "bad", "invalid_request", "json")
    check_completion_line(got[5], "free", 8)


def test_job_carries_response_format_as_structured_outputs():
    from producer.client import build_job
    from producer.wire import Job, decode, encode

    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}
    job = decode(encode(build_job("p", {"response_format": fmt}, None, 0, None)), Job)
    assert job.params["structured_outputs"] == {"json": SCHEMA} and "response_format" not in job.params
    # A job written by another producer with OpenAI's field in its params still decodes and maps.
    raw = Job(request_id="r1", prompt="p", params={"response_format": {"type": "json_object"}}, created_at=0.0)
    params = SamplingParams.from_dict(decode(encode(raw), Job).params)
    assert params.structured_outputs == {"json_object": True}


def test_bitmask_kernel_masks_only_the_constrained_rows():
    import torch

    from pravaha_core.sampler import apply_token_bitmask_

    n, v = 5, 1000
    bitmask = torch.randint(-2**31, 2**31 - 1, (n, (v + 31) // 32), dtype=torch.int32)
    logits = torch.randn(n, v)
    got = logits.clone()
    apply_token_bitmask_(got, bitmask, [1, 3])
    allowed = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(1)[:, :v]
    want = logits.clone()
    want[[1, 3]] = logits[[1, 3]].masked_fill(~allowed[[1, 3]], float("-inf"))
    assert torch.equal(got, want)


def test_constrained_logprobs_come_from_the_unmasked_logits(engine):
    out = engine.generate(["q"], [constrained({"choice": ["yes", "no"]}, 1, logprobs=3)])[0].outputs[0]
    assert out.text in ("yes", "no") and len(out.logprobs) == len(out.token_ids)
    assert all(len(entry) >= 3 and all(lp > float("-inf") for lp in entry.values()) for entry in out.logprobs)


def test_readme_example_runs_as_written():
    from tests.test_readme import code_blocks, run_python

    block = next(b for b in code_blocks("python") if "structured_outputs" in b)
    result = run_python(block)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("stop") and "'age':" in result.stdout


def test_abort_while_waiting_for_the_grammar_and_min_tokens_refused(engine):
    engine.add_request("parked", "x", constrained({"regex": "[0-9]{40}"}, 1))
    assert engine.has_unfinished() and engine.abort("parked")
    (out,) = engine.step()
    assert out.request_id == "parked" and out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})


def test_output_prefix_resumes_a_constrained_request(engine):
    """A worker resuming a redelivered job feeds the streamed tokens back: the matcher catches up."""
    p = constrained({"json": SCHEMA}, 11)
    whole = engine.generate(["resume"], [p])[0].outputs[0]
    engine.add_request("resumed", "resume", p, output_prefix=whole.token_ids[:12])
    rest = []
    while engine.has_unfinished():
        for delta in engine.step():
            rest += delta.outputs[0].token_ids
            reason = delta.outputs[0].finish_reason
    assert whole.token_ids[:12] + rest == whole.token_ids and reason == "stop"
