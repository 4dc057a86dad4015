"""The worker's Redis protocol end to end, against a real redis-server.

Workers run either as real `pravaha worker` subprocesses (`start_worker`) or as a
`worker.service.Worker` in a thread of this process (`thread_worker`), where the test needs
to look inside (the engine's KV blocks) or where start-up time matters.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from producer import AsyncClient, Client, Names, QueueFull
from producer.wire import Job, Result, TokenEvent, Usage, Completion, decode, encode
from tests.redis_helpers import ROOT, wait_until as wait_for
from worker.service import Worker
from worker.settings import WorkerConfig

NAMES = Names()
GREEDY = {"temperature": 0.0}


# ---- helpers ----------------------------------------------------------------------------


class ThreadWorker:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name=f"worker-{worker.config.consumer}", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
            raise

    def assert_alive(self) -> None:
        assert not self.errors, f"worker thread died: {self.errors!r}"
        assert self.thread.is_alive(), "worker thread exited"

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "worker did not stop"


@pytest.fixture
def thread_worker():
    """thread_worker(url, **WorkerConfig overrides) -> a serving ThreadWorker (stopped at teardown)."""
    started: list[ThreadWorker] = []

    def start(url: str, **overrides) -> ThreadWorker:
        config = dict(redis_url=url, consumer=f"thread-{len(started)}", kv_cache_bytes=8 << 20, block_ms=100,
                      drain_timeout_s=2.0, metrics_port=-1)
        config.update(overrides)
        tw = ThreadWorker(Worker(WorkerConfig.from_settings(**config)))
        started.append(tw)
        tw.thread.start()
        wait_for(lambda: tw.worker.ready or not tw.thread.is_alive(), 60, "the worker to serve")
        tw.assert_alive()
        return tw

    yield start
    for tw in started:
        tw.stop()
    for tw in started:
        assert not tw.errors, f"worker thread died: {tw.errors!r}"


@pytest.fixture
def client(redis_server):
    c = Client(redis_server.url)
    yield c
    c.close()


def events_of(r: redis.Redis, rid: str) -> list[TokenEvent]:
    return [decode(fields[b"event"], TokenEvent) for _, fields in r.xrange(NAMES.events(rid))]


def dead_letters(r: redis.Redis) -> list[dict]:
    return [{k.decode(): v for k, v in fields.items()} for _, fields in r.xrange(NAMES.dead_letter)]


def pending_count(r: redis.Redis) -> int:
    try:
        return r.xpending(NAMES.stream, NAMES.group)["pending"]
    except redis.ResponseError:   # no group yet
        return 0


def assert_drained(r: redis.Redis) -> None:
    """Everything acknowledged and deleted: no backlog, nothing pending."""
    wait_for(lambda: r.xlen(NAMES.stream) == 0 and pending_count(r) == 0, 30, "the stream to drain")


def assert_events_match(events: list[TokenEvent], result: Result) -> None:
    """The event record is complete and consistent with the final result."""
    assert [e.index for e in events] == list(range(len(events)))
    offset = 0
    for e in events:
        assert e.offset == offset
        offset += len(e.token_ids)
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason == result.finish_reason
    assert events[-1].error == result.error
    assert events[-1].usage == result.usage


# ---- 1. late subscribers replay everything ----------------------------------------------
def test_late_subscriber_replays_every_token(redis_server, client, thread_worker):
    thread_worker(redis_server.url)
    rid = client.submit("Once upon a time", {"max_tokens": 40, "ignore_eos": True, "temperature": 0.8})
    result = client.result(rid, timeout=60)
    assert result.finish_reason == "length" and len(result.token_ids) == 40
    assert result.usage == Usage(prompt_tokens=len("Once upon a time"), completion_tokens=40,
                                 total_tokens=len("Once upon a time") + 40)

    # Subscribing after the fact yields the whole record, from the first event.
    events = list(client.stream(rid, timeout=10))
    assert len(events) > 1
    assert_events_match(events, result)
    assert events == events_of(client.redis, rid)
    # Again, and once more after the record expired: the stored result stands in for it.
    assert list(client.stream(rid, timeout=10)) == events
    client.redis.delete(NAMES.events(rid))
    (only,) = list(client.stream(rid, timeout=10))
    assert only.finished and only.token_ids == result.token_ids and only.text == result.text
    assert only.finish_reason == "length"
    assert_drained(client.redis)


def test_event_record_ttl_is_set_on_the_first_event_refreshed_while_running_and_on_the_last(
        redis_server, client, thread_worker):
    tw = thread_worker(redis_server.url, result_ttl_s=100, reclaim_idle_s=0.9)   # housekeeping every 0.3 s
    engine_step = tw.worker.engine.step

    def slow_step():          # 500 tokens take 10 s: the request is surely running during the check
        time.sleep(0.02)
        return engine_step()

    tw.worker.engine.step = slow_step
    r = client.redis
    rid = client.submit("Tell me a long story", {"max_tokens": 500, "ignore_eos": True, **GREEDY})
    wait_for(lambda: r.xlen(NAMES.events(rid)) >= 3, 30, "generation to start")
    assert 0 < r.ttl(NAMES.events(rid)) <= 100                      # set with the first event
    r.expire(NAMES.events(rid), 10_000)                             # as if it had gone stale
    wait_for(lambda: r.ttl(NAMES.events(rid)) <= 100, 10, "housekeeping to refresh the record's TTL")
    assert not r.exists(NAMES.result(rid)), "the request finished before the check: make it longer"
    r.expire(NAMES.events(rid), 10_000)
    client.cancel(rid)
    result = client.result(rid, timeout=10)
    assert 0 < r.ttl(NAMES.events(rid)) <= 100                      # set again with the last event
    assert_events_match(list(client.stream(rid, timeout=5)), result)
    assert_drained(r)


# ---- 2. poison messages -----------------------------------------------------------------
def _job(rid: str, **overrides) -> bytes:
    fields = {"v": 1, "request_id": rid, "prompt": "hello", "params": {"max_tokens": 4}, "priority": 0,
              "deadline": None, "created_at": time.time()}
    fields.update(overrides)
    return msgspec.msgpack.encode(fields)


POISON = [
    # name, stream fields, readable request id, what the reason must mention
    ("random bytes", {"job": b"\xc1\xc1" + os.urandom(64)}, None, "undecodable"),
    ("msgpack list", {"job": msgspec.msgpack.encode([1, "two", 3.0])}, None, "undecodable"),
    ("no job field", {"payload": b"whatever"}, None, "undecodable"),
    ("wrong types", {"job": _job("poison-types", prompt=12345, created_at="yesterday")}, "poison-types", "prompt"),
    ("missing fields", {"job": msgspec.msgpack.encode({"v": 1, "request_id": "poison-missing"})},
     "poison-missing", "missing required field"),
    ("schema version", {"job": _job("poison-version", v=99)}, "poison-version", "schema version 99"),
    ("top_p 5", {"job": _job("poison-top-p", params={"top_p": 5})}, "poison-top-p", "top_p"),
    ("unknown param", {"job": _job("poison-unknown", params={"temprature": 0.5})}, "poison-unknown", "temprature"),
    ("brace in request_id", {"job": _job("bad{tag}id")}, None, "request_id"),
    ("token id outside vocab", {"job": _job("poison-vocab", prompt=[1, 2, 10**6])}, "poison-vocab", "vocabulary"),
    ("negative token id", {"job": _job("poison-negative", prompt=[5, -1])}, "poison-negative", "vocabulary"),
    ("empty prompt", {"job": _job("poison-empty", prompt="")}, "poison-empty", "prompt"),
    ("neither prompt nor messages", {"job": _job("poison-neither", prompt=None)}, "poison-neither", "prompt"),
    ("chat on a model without a template",
     {"job": _job("poison-chat", prompt=None, messages=[{"role": "user", "content": "hi"}])}, "poison-chat",
     "chat template"),
    ("params not a map", {"job": _job("poison-params", params="hot")}, "poison-params", "params"),
    ("prompt beyond context", {"job": _job("poison-huge", prompt=[65] * 5000)}, "poison-huge", "context"),
]


def test_poison_messages_are_dead_lettered_and_the_worker_keeps_serving(redis_server, client, start_worker):
    proc = start_worker(redis_server.url)
    r = client.redis
    readable = [rid for _, _, rid, _ in POISON if rid]
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(*[NAMES.channel(rid) for rid in readable])
    wait_for(lambda: all(n == 1 for _, n in r.pubsub_numsub(*[NAMES.channel(rid) for rid in readable])), 5,
             "the subscriptions to register")

    entry_ids = {}
    for name, fields, _, _ in POISON:
        entry_ids[r.xadd(NAMES.stream, fields).decode()] = name
    wait_for(lambda: r.xlen(NAMES.dead_letter) >= len(POISON), 60, "every poison message to be dead-lettered")
    assert proc.proc.poll() is None, proc.output()

    letters = {d["entry_id"].decode(): d for d in dead_letters(r)}
    assert set(letters) == set(entry_ids), "exactly the poison entries, each once"
    channel_events: dict[str, list[TokenEvent]] = {}
    deadline = time.monotonic() + 10
    while sum(map(len, channel_events.values())) < len(readable) and time.monotonic() < deadline:
        msg = listener.get_message(timeout=0.2)
        if msg:
            event = decode(msg["data"], TokenEvent)
            channel_events.setdefault(event.request_id, []).append(event)
    listener.close()

    for entry_id, name in entry_ids.items():
        _, fields, rid, fragment = next(p for p in POISON if p[0] == name)
        letter = letters[entry_id]
        reason = letter["reason"].decode()
        assert reason and fragment in reason, (name, reason)
        assert letter["job"] == fields.get("job", b""), name   # the payload is kept for inspection
        assert letter["request_id"].decode() == (rid or ""), name
        if rid is None:
            continue
        # The requester learns what went wrong: on its result key ...
        result = client._get_result(rid)
        assert result is not None, name
        assert (result.finish_reason, result.error, result.token_ids) == ("error", reason, []), name
        # ... on its channel, live ...
        (event,) = channel_events.get(rid, [None])
        assert event is not None and event.finished and event.finish_reason == "error", name
        assert event.error == reason, name
        # ... and in its replay record (what Client.stream reads).
        (streamed,) = list(client.stream(rid, timeout=5))
        assert streamed.finish_reason == "error" and streamed.error == reason, name

    # The brace id is unreadable as a request id: nothing is written under any key for it.
    assert not r.keys("*bad*")

    # The worker still serves.
    good = client.generate("still alive?", {"max_tokens": 6, "ignore_eos": True, **GREEDY}, timeout=30)
    assert good.finish_reason == "length" and len(good.token_ids) == 6 and good.error is None
    assert_drained(r)
    assert r.xlen(NAMES.dead_letter) == len(POISON)
    assert proc.proc.poll() is None, proc.output()


def test_more_samples_than_seats_is_poison_not_a_crash(redis_server, client, start_worker):
    proc = start_worker(redis_server.url, max_num_seqs=4)
    rid = client.submit("hi", {"n": 5, "max_tokens": 3})
    wait_for(lambda: client.redis.xlen(NAMES.dead_letter) or proc.proc.poll() is not None, 30,
             "the job to be dead-lettered (or the worker to die)")
    assert proc.proc.poll() is None, f"worker died:\n{proc.output()[-3000:]}"
    result = client.result(rid, timeout=10)
    assert result.finish_reason == "error" and result.error
    (letter,) = dead_letters(client.redis)
    assert letter["request_id"].decode() == rid
    good = client.generate("next", {"max_tokens": 4, "ignore_eos": True, "n": 2}, timeout=30)
    assert [c.finish_reason for c in good.completions] == ["length", "length"]
    assert_drained(client.redis)


def test_prompt_larger_than_the_whole_kv_cache_is_an_error(redis_server, client, thread_worker):
    tw = thread_worker(redis_server.url, kv_cache_bytes=4 * 8192)     # 4 blocks of 16 tokens
    assert tw.worker.engine.kv_cache_info()["num_blocks"] == 4
    rid = client.submit([65] * 200, {"max_tokens": 4})
    result = client.result(rid, timeout=30)
    assert result.finish_reason == "error" and result.token_ids == []
    assert "KV blocks" in result.error
    (letter,) = dead_letters(client.redis)
    assert letter["request_id"].decode() == rid and letter["reason"].decode() == result.error
    good = client.generate([65] * 10, {"max_tokens": 4, "ignore_eos": True}, timeout=30)
    assert good.finish_reason == "length" and len(good.token_ids) == 4
    assert_drained(client.redis)
    tw.assert_alive()


# ---- 3. cancellation ---------------------------------------------------------------------
def test_cancel_a_running_request(redis_server, client, thread_worker):
    tw = thread_worker(redis_server.url)
    engine = tw.worker.engine
    num_blocks = engine.kv_cache_info()["num_blocks"]
    rid = client.submit("Tell me a long story", {"max_tokens": 500, "ignore_eos": True, **GREEDY})
    wait_for(lambda: client.redis.xlen(NAMES.events(rid)) >= 3, 30, "generation to start")

    cancelled_at = time.monotonic()
    client.cancel(rid)
    result = client.result(rid, timeout=10)
    latency = time.monotonic() - cancelled_at
    assert result.finish_reason == "abort" and result.error is None
    assert 0 < len(result.token_ids) < 500
    assert latency < 3.0, f"cancel took {latency:.2f}s"
    events = list(client.stream(rid, timeout=5))
    assert_events_match(events, result)

    # The engine gave back every block; the request is gone from the worker.
    wait_for(lambda: engine.kv_cache_info()["blocks_free"] == num_blocks and not tw.worker.inflight, 10,
             "the engine to free the aborted request's blocks")
    assert not engine.has_unfinished()
    assert_drained(client.redis)
    assert client.redis.xlen(NAMES.dead_letter) == 0     # a cancel is not a failure

    # Later requests run normally, on the freed cache.
    rids = [client.submit(f"after cancel {i}", {"max_tokens": 12, "ignore_eos": True}) for i in range(4)]
    for rid in rids:
        after = client.result(rid, timeout=30)
        assert after.finish_reason == "length" and len(after.token_ids) == 12
    wait_for(lambda: engine.kv_cache_info()["blocks_free"] == num_blocks, 10, "blocks to be free again")
    tw.assert_alive()


def test_cancel_a_queued_request(redis_server, client, thread_worker):
    rid = client.submit("never started", {"max_tokens": 50})
    other = client.submit("keep me", {"max_tokens": 5, "ignore_eos": True})
    client.cancel(rid)              # no worker is listening: only the cancel key records it
    assert client.backlog() == 2
    thread_worker(redis_server.url)
    result = client.result(rid, timeout=30)
    assert result.finish_reason == "abort" and result.token_ids == [] and result.text == ""
    assert result.usage.completion_tokens == 0
    (event,) = events_of(client.redis, rid)
    assert event.finished and event.finish_reason == "abort" and event.token_ids == []
    kept = client.result(other, timeout=30)
    assert kept.finish_reason == "length" and len(kept.token_ids) == 5
    assert_drained(client.redis)


# ---- 4. deadlines ------------------------------------------------------------------------
def test_deadline_passed_before_pickup(redis_server, client, thread_worker):
    rid = client.submit("too late", {"max_tokens": 20}, deadline_s=0.2)
    job = decode(client.redis.xrange(NAMES.stream)[0][1][b"job"], Job)
    time.sleep(max(0.0, job.deadline - time.time()) + 0.05)   # only until the deadline has passed
    thread_worker(redis_server.url)
    result = client.result(rid, timeout=30)
    assert result.finish_reason == "error" and result.error == "deadline exceeded"
    assert result.token_ids == [] and result.usage.completion_tokens == 0
    (event,) = list(client.stream(rid, timeout=5))
    assert event.finish_reason == "error" and event.error == "deadline exceeded"
    assert_drained(client.redis)
    assert client.redis.xlen(NAMES.dead_letter) == 0   # an expired job is not poison

    # A deadline still in the future does not get in the way.
    ok = client.generate("in time", {"max_tokens": 4, "ignore_eos": True}, deadline_s=30, timeout=30)
    assert ok.finish_reason == "length" and len(ok.token_ids) == 4


# ---- 5. backpressure ---------------------------------------------------------------------
def test_backpressure_refuses_past_max_backlog_without_trimming(redis_server, thread_worker):
    client = Client(redis_server.url, max_backlog=3)
    try:
        rids = [client.submit(f"job {i}", {"max_tokens": 5, "ignore_eos": True}) for i in range(3)]
        with pytest.raises(QueueFull):
            client.submit("one too many", {"max_tokens": 5})
        assert client.redis.xlen(NAMES.stream) == 3 == client.backlog()
        with pytest.raises(QueueFull):
            client.submit("still full", {"max_tokens": 5})
        queued = [decode(fields[b"job"], Job).request_id for _, fields in client.redis.xrange(NAMES.stream)]
        assert queued == rids, "the queued jobs are the first three, untouched"

        thread_worker(redis_server.url)
        for rid in rids:
            result = client.result(rid, timeout=30)
            assert result.finish_reason == "length" and len(result.token_ids) == 5
        assert_drained(client.redis)
        # With the backlog gone, submissions are accepted again.
        assert client.generate("room again", {"max_tokens": 3, "ignore_eos": True}, timeout=30).finish_reason == "length"
    finally:
        client.close()


# ---- 6. many concurrent async subscriptions ----------------------------------------------
NUM_STREAMS = 300


async def _many_streams(client: AsyncClient) -> list[tuple[list[TokenEvent], Result]]:
    async def one(i: int):
        rid = await client.submit(f"prompt {i}", {"max_tokens": 3 + i % 4, "ignore_eos": True})
        events = [event async for event in client.stream(rid, timeout=90)]
        return events, await client.result(rid, timeout=30)

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(NUM_STREAMS))), 120)


def _check_many(outcomes) -> None:
    assert len(outcomes) == NUM_STREAMS
    for i, (events, result) in enumerate(outcomes):
        assert events and events[-1].finished, i
        assert result.finish_reason == "length" and len(result.token_ids) == 3 + i % 4, i
        assert_events_match(events, result)


def test_async_client_hundreds_of_concurrent_streams(redis_server, start_worker):
    start_worker(redis_server.url)

    async def main():
        client = AsyncClient(redis_server.url)
        try:
            return await _many_streams(client)
        finally:
            await client.aclose()

    _check_many(asyncio.run(main()))


def test_async_client_hundreds_of_concurrent_streams_with_a_large_pool(redis_server, start_worker):
    """The same load through a connection whose pool is big enough: the protocol itself holds up."""
    start_worker(redis_server.url)

    async def main():
        client = AsyncClient(connection=aioredis.Redis.from_url(redis_server.url, max_connections=4 * NUM_STREAMS))
        try:
            return await _many_streams(client)
        finally:
            await client.aclose()

    _check_many(asyncio.run(main()))
    assert_drained(redis_server.client())


# ---- 7. redelivery of finished work --------------------------------------------------------
def _stored_result(rid: str) -> bytes:
    return encode(Result(request_id=rid, completions=[Completion(index=0, token_ids=[72, 105], text="Hi",
                                                                 finish_reason="stop")],
                         usage=Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
                         worker="someone-else", finished_at=1.0))


@pytest.mark.parametrize("how", ["fresh entry", "reclaimed from a dead consumer"])
def test_redelivered_finished_request_is_acked_without_generating(redis_server, client, thread_worker, how):
    r = client.redis
    rid = "already-done"
    stored = _stored_result(rid)
    r.set(NAMES.result(rid), stored)
    listener = r.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(NAMES.channel(rid))
    wait_for(lambda: r.pubsub_numsub(NAMES.channel(rid))[0][1] == 1, 5, "the subscription to register")
    job = Job(request_id=rid, prompt="hello", params={"max_tokens": 8, "ignore_eos": True},
              created_at=time.time())
    r.xadd(NAMES.stream, {"job": encode(job)})
    overrides = {}
    if how != "fresh entry":
        # A worker read the entry, stored the result, and died before it acked.
        r.xgroup_create(NAMES.stream, NAMES.group, id="0", mkstream=True)
        (_, ((_, _),)), = r.xreadgroup(NAMES.group, "dead-consumer", {NAMES.stream: ">"}, count=1)
        assert pending_count(r) == 1
        overrides = {"reclaim_idle_s": 0.3}

    tw = thread_worker(redis_server.url, **overrides)
    assert_drained(r)
    # One more full loop of the worker, then check that it published nothing at all.
    assert listener.get_message(timeout=0.5) is None
    listener.close()
    assert r.get(NAMES.result(rid)) == stored
    assert not r.exists(NAMES.events(rid))
    assert r.xlen(NAMES.dead_letter) == 0
    assert not tw.worker.inflight and not tw.worker.engine.has_unfinished()
    assert tw.worker.engine.stats.num_steps == 0 and tw.worker.engine.stats.num_generated_tokens == 0
    tw.assert_alive()


def test_same_request_delivered_twice_in_one_batch(redis_server, client, thread_worker):
    """A producer retry (same request_id submitted twice) must not corrupt what subscribers see."""
    params = {"max_tokens": 10, "ignore_eos": True, **GREEDY}
    client.submit("retried", params, request_id="dup-1")
    client.submit("retried", params, request_id="dup-1")
    thread_worker(redis_server.url)
    assert_drained(client.redis)
    result = client.result("dup-1", timeout=30)
    assert result.finish_reason == "length" and len(result.token_ids) == 10
    record = events_of(client.redis, "dup-1")
    assert all(e.finish_reason != "error" for e in record), [(e.index, e.finish_reason, e.error) for e in record]
    assert_events_match(list(client.stream("dup-1", timeout=5)), result)


# ---- 8. pravaha submit -------------------------------------------------------------------
def test_cli_submit_streams_text(redis_server, client, start_worker):
    start_worker(redis_server.url)
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "submit", "--redis-url", redis_server.url,
                           "The capital of France is", "--max-tokens", "8", "--request-id", "cli-1",
                           "--timeout", "60"],
                          cwd=ROOT, capture_output=True, timeout=90)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result = client.result("cli-1", timeout=5)
    assert result.finish_reason in ("length", "stop") and 0 < len(result.token_ids) <= 8
    assert result.text                                  # the byte tokenizer renders every token
    assert proc.stdout.decode() == result.text + "\n"


# ---- 9. pravaha demo ---------------------------------------------------------------------
def _redis_pids_on_port(port: int) -> list[int]:
    """Live (non-zombie) redis-server processes whose command line names `port`.

    redis-server rewrites its title to "redis-server 127.0.0.1:PORT"; before that it is the
    argv ("--port", "PORT"); both match.
    """
    names_port = re.compile(rb"(?:^|[\s:])%d(?:\s|$)" % port)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").strip()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and b"redis-server" in cmdline.split(b" ", 1)[0] and names_port.search(cmdline):
            pids.append(int(entry))
    return pids


def _port_refuses(port: int) -> bool:
    try:
        redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        return True
    return False


EMBEDDED = re.compile(rb"Redis: embedded redis-server at redis://127\.0\.0\.1:(\d+)/0")


def test_demo_runs_and_cleans_up():
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "demo"], cwd=ROOT, capture_output=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"5 requests" in out and b"tokens/s" in out, out.decode(errors="replace")
    match = EMBEDDED.search(out)
    assert match, out.decode(errors="replace")
    port = int(match.group(1))
    assert _redis_pids_on_port(port) == []
    assert _port_refuses(port)


def test_demo_killed_takes_its_redis_with_it():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "demo", "--max-tokens", "400"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        os.set_blocking(proc.stdout.fileno(), False)
        while not (match := EMBEDDED.search(seen)):
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, seen.decode(errors="replace")
            if select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        port = int(match.group(1))
        (redis_pid,) = wait_for(lambda: _redis_pids_on_port(port), 10, "the embedded redis-server")
        assert proc.poll() is None, "the demo must still be running when it is killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: not _redis_pids_on_port(port), 10, "the embedded redis-server to die")
        assert _port_refuses(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
