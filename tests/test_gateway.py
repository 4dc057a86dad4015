"""The OpenAI-compatible gateway end to end: the real `openai` SDK (sync and async) against
`pravaha serve` under uvicorn, a real redis-server and a real worker on a tiny checkpoint with
a chat template. Answers are checked against the Redis SDK's for the same greedy request.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import openai
import pytest
import redis

from producer import Client
from producer.names import Names
from tests.checkpoints import make_chat_checkpoint
from tests.gateway_helpers import GatewayProcess, get, metric, post_json
from tests.redis_helpers import ROOT, RedisServer, WorkerProcess, require_redis, wait_until
from worker.embedded import free_port

KEY = "sk-test-key"
IDLE_STREAM = "pravaha:idle"   # no worker reads it: jobs stay queued


class Stack:
    def __init__(self, tmp, model: str):
        self.redis = RedisServer(str(tmp)).start()
        self.metrics_port = free_port()
        self.worker = WorkerProcess(self.redis.url, str(tmp / "worker.log"), model=model, consumer="gw-worker",
                                    metrics_port=self.metrics_port, kv_cache_bytes=16 << 20)
        self.gateway = GatewayProcess(self.redis.url, str(tmp / "gateway.log"), str(tmp / "files"))
        # A second gateway: API keys, a 1 s timeout and a 3-job backlog on a stream nobody serves.
        self.strict = GatewayProcess(self.redis.url, str(tmp / "strict.log"), str(tmp / "files2"),
                                     "--api-key", KEY, "--stream", IDLE_STREAM, "--max-backlog", "3",
                                     "--request-timeout", "1")
        self.model = model

    def start(self):
        self.gateway.start()
        self.strict.start()
        self.worker.wait_ready()
        return self

    def stop(self):
        for part in (self.gateway, self.strict):
            part.kill()
        self.worker.stop()
        self.redis.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_redis()
    tmp = tmp_path_factory.mktemp("gateway")
    s = Stack(tmp, make_chat_checkpoint(str(tmp / "ckpt")))
    try:
        yield s.start()
    finally:
        s.stop()


@pytest.fixture
def oai(stack):
    return openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def sdk(stack):
    client = Client(stack.redis.url)
    yield client
    client.close()


def test_health_models_and_metrics(stack, oai):
    assert get(stack.gateway.url + "/health") == (200, b'{"status":"ok"}')
    wait_until(lambda: [m.id for m in oai.models.list().data] == [stack.model], 10, "the worker's model listed")
    assert oai.models.list().data[0].owned_by == "pravaha"
    status, text = get(stack.gateway.url + "/metrics")
    assert status == 200 and 'pravaha_gateway_requests_total{code="200",route="/v1/models"}' in text.decode()


def test_completion_matches_the_redis_sdk(stack, oai, sdk):
    prompt = "The quick brown fox"
    want = sdk.generate(prompt, {"max_tokens": 8, "temperature": 0}, timeout=60)
    got = oai.completions.create(model=stack.model, prompt=prompt, max_tokens=8, temperature=0)
    assert got.object == "text_completion" and got.model == stack.model and got.id.startswith("cmpl-")
    assert [c.text for c in got.choices] == [want.text]
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                      want.usage.completion_tokens)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stream_n2_and_usage(stack, oai):
    kwargs = dict(model=stack.model, prompt="Paged attention", max_tokens=6, n=2, temperature=0.9, seed=11)
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    # The same seed: streamed and whole answers are the same two samples.
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert len(whole.choices) == 2 and whole.usage.completion_tokens <= 12


def test_stop_string_ends_the_text(stack, oai):
    base = oai.completions.create(model=stack.model, prompt="Continuous batching", max_tokens=12,
                                  temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = base[4:6]
    assert stop and base.find(stop) >= 1, base
    got = oai.completions.create(model=stack.model, prompt="Continuous batching", max_tokens=12, temperature=0,
                                 stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert (got.text, got.finish_reason) == (base[:base.find(stop)], "stop")


def test_prompt_lists_token_ids_and_completion_logprobs(stack, oai, sdk):
    ids = [72, 105, 33]
    got = oai.completions.create(model=stack.model, prompt=["first prompt", "second prompt"], max_tokens=3,
                                 temperature=0, logprobs=2)
    assert [c.index for c in got.choices] == [0, 1]
    want = sdk.generate("second prompt", {"max_tokens": 3, "temperature": 0}, timeout=60)
    assert got.choices[1].text == want.text
    lp = got.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset[0] == 0 and all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    by_ids = oai.completions.create(model=stack.model, prompt=ids, max_tokens=2, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_async_streamed_and_not(stack):
    async def run():
        client = openai.AsyncOpenAI(base_url=stack.gateway.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
        whole = await client.chat.completions.create(model=stack.model, messages=messages, max_tokens=6,
                                                     temperature=0, logprobs=True, top_logprobs=2)
        stream = await client.chat.completions.create(model=stack.model, messages=messages, max_tokens=6,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    msg = whole.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens and "".join(t.token for t in content) == msg.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    # The template wraps the messages in "role: content" lines: the prompt is longer than them.
    assert whole.usage.prompt_tokens > len("Be brief.Hello there") // 4
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_unsupported_fields_and_bad_values_are_400(stack, oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools" and "not supported" in err.value.body["message"]
    assert set(err.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=stack.model, prompt="x", temperature=-1)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:   # the worker refuses it: the prompt is too long
        oai.completions.create(model=stack.model, prompt=[5] * 600, max_tokens=2)
    assert err.value.status_code == 400
    status, body, _ = post_json(stack.gateway.url + "/v1/completions", {"prompt": ""})
    assert status == 400 and body["error"]["param"] == "prompt"


LONG = 450      # tokens (the checkpoint's context is 512)


def test_disconnect_mid_stream_cancels_and_frees_kv_blocks(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": stack.model, "prompt": "A long story", "max_tokens": LONG, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    data = []
    while len(data) < 3:
        line = resp.readline()
        if line.startswith(b"data: "):
            data.append(json.loads(line[6:]))
    rid = data[0]["id"].removeprefix("cmpl-")
    conn.sock.close()   # the client goes away mid-stream
    conn.close()
    result = Client(stack.redis.url).result(rid, timeout=30)
    assert result.finish_reason == "abort" and len(result.token_ids) < LONG, (result.finish_reason,
                                                                             len(result.token_ids))
    scrape = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    wait_until(lambda: metric(get(scrape)[1].decode(), "pravaha_kv_blocks_used") == 0, 10, "the KV blocks freed")
    gw = get(stack.gateway.url + "/metrics")[1].decode()
    assert 'pravaha_gateway_cancelled_total{reason="disconnect"}' in gw
    assert metric(gw, "pravaha_gateway_open_streams") == 0


def test_disconnect_while_waiting_for_a_whole_answer_cancels(stack):
    """The worker is held still (SIGSTOP) until the client has gone and the cancel is stored,
    so the disconnect comes first on any host, however fast it generates."""
    r = redis.Redis.from_url(stack.redis.url)
    before = set(r.keys(Names().cancelled("*")))
    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway.port, timeout=0.5)
    os.kill(stack.worker.proc.pid, signal.SIGSTOP)
    try:
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": stack.model, "prompt": "Another long story", "max_tokens": LONG, "ignore_eos": True}),
            {"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.sock.close()   # gone before the answer
        conn.close()
        (key,) = wait_until(lambda: set(r.keys(Names().cancelled("*"))) - before, 10, "the request's cancel key")
    finally:
        os.kill(stack.worker.proc.pid, signal.SIGCONT)
    result = Client(stack.redis.url).result(key.decode().split("{")[1].split("}")[0], timeout=30)
    assert result.finish_reason == "abort" and len(result.token_ids) < LONG, (result.finish_reason,
                                                                             len(result.token_ids))


def test_401_504_and_429(stack):
    url, auth = stack.strict.url + "/v1", {"Authorization": f"Bearer {KEY}"}
    status, body, _ = post_json(url + "/completions", {"prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and set(body["error"]) == {
        "message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert get(stack.strict.url + "/health")[0] == 200   # probes need no key
    oai = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert oai.models.list().object == "list"

    # Nobody serves this stream: the request times out, answers 504, and its job is cancelled.
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        oai.completions.create(model="m", prompt="never served", max_tokens=2)
    assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
    assert time.monotonic() - started < 10
    r = redis.Redis.from_url(stack.redis.url)
    names = Names(stream=IDLE_STREAM)
    wait_until(lambda: r.keys(names.cancelled("*")), 5, "the timed-out job's cancel key")

    sdk = Client(stack.redis.url, stream=IDLE_STREAM)
    while sdk.backlog() < 3:
        sdk.submit("filler", {"max_tokens": 1})
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert err.value.response.headers["retry-after"] == "1" and err.value.body["code"] == "rate_limit_exceeded"
    sdk.close()
    scrape = get(stack.strict.url + "/metrics")[1].decode()
    assert metric(scrape, 'pravaha_gateway_errors_total{class="4xx"}') >= 3
    assert metric(scrape, 'pravaha_gateway_errors_total{class="5xx"}') >= 1   # the 504
    assert metric(scrape, "pravaha_gateway_queue_full_total") == 1


def test_readme_serve_command_and_openai_snippet(stack, tmp_path):
    """The README's `pravaha serve` line and openai snippet, run as written (URLs pointed here)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    line = next(ln for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for ln in block.splitlines()
                if ln.startswith("pravaha serve"))
    port = str(free_port())
    args = [a.replace("redis://127.0.0.1:6379/0", stack.redis.url).replace("8000", port)
            for a in shlex.split(line.split("#")[0])[1:]]
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 60, "the README's gateway")
        snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import" in b)
        ran = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                             capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
    finally:
        proc.kill()
        proc.wait()


def _up(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def test_response_format_json_schema_and_its_400(stack, oai):
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    got = oai.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Answer"}],
                                      max_tokens=40, seed=3, response_format=fmt)
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    again = oai.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Again"}],
                                        max_tokens=40, seed=4, response_format=fmt)
    jsonschema.validate(json.loads(again.choices[0].message.content), schema)
    worker = get(f"http://127.0.0.1:{stack.metrics_port}/metrics")[1].decode()
    assert metric(worker, "pravaha_grammar_compiles_total") == 1 and metric(worker, "pravaha_grammar_cache_hits_total") == 1
    assert metric(worker, "pravaha_grammar_compile_seconds_total") > 0
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert err.value.body["param"] == "response_format" and "nope" in err.value.body["message"]
