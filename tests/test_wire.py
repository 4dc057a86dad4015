"""Pure unit tests (no Redis): producer.names, producer.wire, worker.settings."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import fields

import msgspec
import pytest

from producer.client import build_job, result_as_events
from producer.names import Names, check_request_id
from producer.wire import (SCHEMA_VERSION, Completion, Job, Result, TokenEvent, Usage, decode, encode,
                           peek_request_id)
from pravaha_core.config import EngineConfig
from worker.settings import WorkerConfig, add_worker_flags, config_from_args


# ---- Redis Cluster hash slots, computed here from the spec ------------------------------
def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection, as in Redis Cluster."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def key_hash_slot(key: str | bytes) -> int:
    """HASH_SLOT per the Redis Cluster spec: hash only the first non-empty {...} tag if any."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end != -1 and end != start + 1:
            data = data[start + 1:end]
    return crc16_xmodem(data) % 16384


def test_crc16_and_hash_slot_match_redis_reference_values():
    assert crc16_xmodem(b"123456789") == 0x31C3          # the spec's check value
    # Reference values from `CLUSTER KEYSLOT` on a real redis-server 7.
    assert key_hash_slot("foo") == 12182
    assert key_hash_slot("somekey") == 11058
    assert key_hash_slot("{user1000}.following") == 3443 == key_hash_slot("{user1000}.followers")
    assert key_hash_slot("a{}b") == 13694                 # empty tag: the whole key is hashed
    assert key_hash_slot("{}{z}") == 10971
    assert key_hash_slot("pravaha:{abc-123}:tokens") == 12727


@pytest.mark.parametrize("names", [Names(), Names("jobs:high", "grp", "px"), Names(prefix="a:b:c")])
@pytest.mark.parametrize("rid", ["abc-123", "0f3c9b1e8d7a4e2b9c1d2e3f4a5b6c7d", "req:with:colons", "é-ünïcode",
                                 "x" * 256])
def test_all_names_of_one_request_share_the_request_id_hash_tag(names, rid):
    per_request = [names.channel(rid), names.events(rid), names.result(rid), names.cancelled(rid)]
    assert len(set(per_request)) == 4, "each per-request name must be distinct"
    slot = key_hash_slot(rid)
    for name in per_request:
        assert "{" + rid + "}" in name
        # The hash tag is the first {...} in the name, so the prefix cannot hijack it.
        assert name.index("{") == name.index("{" + rid + "}")
        assert key_hash_slot(name) == slot, name
    # Different requests land wherever their ids hash (not all on one slot).
    assert len({key_hash_slot(names.result(f"r{i}")) for i in range(50)}) > 40


def test_deployment_names():
    names = Names("s", "g", "p")
    assert names.dead_letter == "s:dead"
    assert names.cancel_channel == "p:cancel"
    assert Names().stream == "pravaha:requests" and Names().group == "pravaha-workers"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "{x}", "x" * 257, None, 5, b"bytes"])
def test_check_request_id_rejects(bad):
    with pytest.raises(ValueError, match="request_id"):
        check_request_id(bad)


def test_check_request_id_accepts():
    assert check_request_id("ok-1") == "ok-1"
    assert check_request_id("x" * 256) == "x" * 256


# ---- wire round trips --------------------------------------------------------------------
def test_job_round_trip():
    for prompt in ["Hello, wörld ✓", [1, 2, 3, 511]]:
        job = Job(request_id="r1", prompt=prompt, params={"max_tokens": 7, "stop": ["\n"], "top_p": 0.5},
                  priority=-3, deadline=123.5, created_at=100.25)
        data = encode(job)
        assert isinstance(data, bytes)
        assert decode(data, Job) == job
        raw = msgspec.msgpack.decode(data)
        assert raw["v"] == SCHEMA_VERSION and raw["prompt"] == prompt


def test_token_event_and_result_round_trip():
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    event = TokenEvent(request_id="r", sample=1, num_samples=2, index=4, offset=9, token_ids=[5, 6],
                       text="ab", finished=True, finish_reason="stop", usage=usage)
    assert decode(encode(event), TokenEvent) == event
    result = Result(request_id="r", usage=usage, worker="w1", finished_at=1.5, completions=[
        Completion(index=0, token_ids=[1, 256], text="\x01", finish_reason="stop"),
        Completion(index=1, token_ids=[], text="", finish_reason="error", error="boom")])
    back = decode(encode(result), Result)
    assert back == result
    assert (back.token_ids, back.text, back.finish_reason, back.error) == ([1, 256], "\x01", "stop", None)
    events = result_as_events(back)
    assert [(e.sample, e.finished, e.finish_reason, e.error, e.num_samples) for e in events] == [
        (0, True, "stop", None, 2), (1, True, "error", "boom", 2)]


@pytest.mark.parametrize("data, fragment", [
    (b"\xc1 not msgpack", "invalid Job"),
    (msgspec.msgpack.encode([1, 2, 3]), "invalid Job"),
    (msgspec.msgpack.encode({"v": 1, "request_id": "r", "prompt": "p"}), "created_at"),
    (msgspec.msgpack.encode({"v": 1, "request_id": "r", "prompt": 5, "created_at": 1.0}), "prompt"),
    (msgspec.msgpack.encode({"v": 1, "request_id": "r", "prompt": "p", "created_at": 1.0, "extra": 1}), "extra"),
    (msgspec.msgpack.encode({"v": 2, "request_id": "r", "prompt": "p", "created_at": 1.0}), "schema version 2"),
])
def test_decode_rejects_bad_input_with_value_error(data, fragment):
    with pytest.raises(ValueError, match=fragment):
        decode(data, Job)


def test_peek_request_id():
    enc = msgspec.msgpack.encode
    assert peek_request_id(enc({"request_id": "r-9", "prompt": 5})) == "r-9"
    assert peek_request_id(enc({"v": 7, "request_id": "r-9"})) == "r-9"
    assert peek_request_id(b"\xc1garbage") is None
    assert peek_request_id(b"") is None
    assert peek_request_id(enc([1, 2])) is None
    assert peek_request_id(enc({"request_id": 12})) is None
    assert peek_request_id(enc({"request_id": ""})) is None
    assert peek_request_id(enc({"request_id": "a{b"})) is None
    assert peek_request_id(enc({"request_id": "a}b"})) is None


def test_build_job_validates_and_seeds():
    job = build_job("hi", {"max_tokens": 3, "temperature": 0.7}, None, 2, 5.0)
    assert len(job.request_id) == 32 and job.priority == 2
    assert job.params["seed"] is not None            # fixed so a redelivery regenerates the same tokens
    assert 4.0 < job.deadline - job.created_at <= 5.0 + 1e-6
    assert abs(job.created_at - time.time()) < 5
    assert build_job([1, 2], {"temperature": 0.0}, "rid", 0, None).params["seed"] is None
    for kwargs, field in [({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1, True]}, "prompt"),
                          ({"params": {"top_p": 5}}, "top_p"), ({"params": {"nope": 1}}, "nope"),
                          ({"request_id": "a{b"}, "request_id"), ({"priority": 1.5}, "priority"),
                          ({"deadline_s": 0}, "deadline_s"), ({"deadline_s": -1}, "deadline_s")]:
        args = {"prompt": "p", "params": None, "request_id": None, "priority": 0, "deadline_s": None}
        args.update(kwargs)
        with pytest.raises(ValueError, match=field):
            build_job(**args)


# ---- worker settings from PRAVAHA_* ------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser()
    add_worker_flags(parser, os.environ)
    return config_from_args(parser.parse_args(argv))


def test_env_vars_fill_worker_flags(monkeypatch):
    env = {"PRAVAHA_REDIS_URL": "redis://example:6380/2", "PRAVAHA_MODEL": "dummy:gpt2-tiny",
           "PRAVAHA_STREAM": "s1", "PRAVAHA_GROUP": "g1", "PRAVAHA_PREFIX": "p1", "PRAVAHA_CONSUMER": "c1",
           "PRAVAHA_DTYPE": "bfloat16", "PRAVAHA_DEVICE": "cuda:1", "PRAVAHA_MAX_NUM_SEQS": "7",
           "PRAVAHA_MAX_NUM_BATCHED_TOKENS": "512", "PRAVAHA_KV_CACHE_BYTES": "1048576",
           "PRAVAHA_RECLAIM_IDLE_S": "2.5", "PRAVAHA_MAX_DELIVERIES": "3", "PRAVAHA_DRAIN_TIMEOUT_S": "0.5",
           "PRAVAHA_RESULT_TTL_S": "60", "PRAVAHA_BLOCK_MS": "50", "PRAVAHA_SEED": "42"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = _parse([])
    engine = EngineConfig(model="dummy:gpt2-tiny", dtype="bfloat16", device="cuda:1", max_num_seqs=7,
                          max_num_batched_tokens=512, kv_cache_bytes=1048576, seed=42)
    assert config == WorkerConfig(engine=engine, redis_url="redis://example:6380/2", stream="s1", group="g1",
                                  prefix="p1", consumer="c1", reclaim_idle_s=2.5, max_deliveries=3,
                                  drain_timeout_s=0.5, result_ttl_s=60, block_ms=50)
    assert type(config.engine.max_num_seqs) is int and type(config.reclaim_idle_s) is float
    assert type(config.engine.kv_cache_bytes) is int
    # A flag on the command line beats the environment.
    assert _parse(["--max-num-seqs", "9", "--stream", "s2"]).engine.max_num_seqs == 9
    assert _parse(["--stream", "s2"]).stream == "s2"


def test_every_engine_setting_is_a_worker_flag_and_variable_with_help(monkeypatch):
    """Flags and PRAVAHA_* are generated from the dataclasses: every field is settable, and
    every field has a help entry in its class docstring."""
    from pravaha_core.fields import field_help

    for cls in (EngineConfig, WorkerConfig):
        names = {f.name for f in fields(cls)} - {"engine"}
        assert names <= set(field_help(cls)), f"{cls.__name__}: fields without a docstring entry"
    monkeypatch.setenv("PRAVAHA_NATIVE_KERNELS", "false")
    monkeypatch.setenv("PRAVAHA_KV_CACHE_FRACTION", "0.05")
    monkeypatch.setenv("PRAVAHA_QUANTIZATION", "none")
    config = _parse(["--block-size", "32", "--no-enable-prefix-caching", "--max-model-len", "64"])
    assert config.engine == EngineConfig(native_kernels=False, kv_cache_fraction=0.05, block_size=32,
                                         enable_prefix_caching=False, max_model_len=64)
    parser = argparse.ArgumentParser()
    add_worker_flags(parser, {})
    helps = {a.dest: a.help for a in parser._actions}
    for f in fields(EngineConfig):
        assert f"env PRAVAHA_{f.name.upper()};" in helps[f.name], f.name
    assert helps["kv_cache_bytes"].startswith("KV-cache budget in bytes")


def test_bad_settings_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match="max_num_seq: unknown worker or engine setting"):
        WorkerConfig.from_settings(max_num_seq=3)
    monkeypatch.setenv("PRAVAHA_ENABLE_PREFIX_CACHING", "perhaps")
    with pytest.raises(ValueError, match="PRAVAHA_ENABLE_PREFIX_CACHING='perhaps'"):
        _parse([])
    monkeypatch.setenv("PRAVAHA_ENABLE_PREFIX_CACHING", "1")
    monkeypatch.setenv("PRAVAHA_BLOCK_SIZE", "sixteen")
    with pytest.raises(ValueError, match="PRAVAHA_BLOCK_SIZE='sixteen'"):
        _parse([])


def test_worker_flag_defaults_without_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PRAVAHA_"):
            monkeypatch.delenv(key)
    config = _parse([])
    default = WorkerConfig()
    for name in ("redis_url", "stream", "group", "prefix", "reclaim_idle_s", "max_deliveries",
                 "drain_timeout_s", "result_ttl_s", "block_ms"):
        assert getattr(config, name) == getattr(default, name), name
    assert config.engine == EngineConfig()
    assert config.consumer                           # <hostname>-<pid>


def test_env_values_are_validated(monkeypatch):
    monkeypatch.setenv("PRAVAHA_MAX_NUM_SEQS", "0")
    with pytest.raises(ValueError, match="max_num_seqs"):
        _parse([])


# ---- docs/wire-protocol.md stays true ----------------------------------------------------
def test_wire_protocol_page_lists_every_field_of_every_message():
    import re

    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "wire-protocol.md"), encoding="utf-8").read()
    sections = {"## Submitting a job": Job, "## Receiving tokens": TokenEvent, "## The result": Result}
    for heading, cls in sections.items():
        body = page[page.index(heading):]
        body = body[:body.find("\n## ", 1)]
        documented = set(re.findall(r"^\| `(\w+)` \|", body, re.M))
        assert documented == set(cls.__struct_fields__), (cls.__name__, documented ^ set(cls.__struct_fields__))
    assert f"must be `{SCHEMA_VERSION}`" in page
    names = Names()
    assert "XADD P:{RID}:events * event" in page and names.events("RID") == "pravaha:{RID}:events"
    assert "PUBLISH P:cancel <RID>" in page and names.cancel_channel == "pravaha:cancel"


@pytest.mark.parametrize("field", ["created_at", "deadline"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decode_rejects_non_finite_times(field, value):
    job = {"v": SCHEMA_VERSION, "request_id": "r", "prompt": "x", "created_at": 1.0, field: value}
    with pytest.raises(ValueError, match="finite"):
        decode(msgspec.msgpack.encode(job), Job)


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_sampling_params_reject_non_finite(name, value):
    from pravaha_core.sampling_params import SamplingParams

    with pytest.raises(ValueError, match="finite"):
        SamplingParams.from_dict({name: value})


def test_json_or_missing_job_says_what_was_expected():
    with pytest.raises(ValueError, match="looks like JSON"):
        decode(b'{"request_id": "r", "prompt": "x", "created_at": 1}', Job)
    with pytest.raises(ValueError, match="`job` field"):
        decode(b"", Job)
