"""SDK waits survive Redis blips: a server restart and CLIENT KILL mid-wait (issue 22, item 3).

A real redis-server with AOF on its own port; results and token events are written the way
worker/service.py writes them (wire encode, names from producer/names.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from producer import Client
from producer.aio import AsyncClient
from producer.names import Names
from producer.wire import Completion, Result, TokenEvent, Usage, encode
from tests.redis_helpers import RedisServer

NUM_EVENTS = 6


@pytest.fixture
def aof_server(aof_redis_server):
    """conftest's AOF redis-server (data survives the restarts below)."""
    return aof_redis_server


def write_result(r, rid: str) -> None:
    result = Result(request_id=rid, completions=[Completion(index=0, token_ids=[5, 6], text="ab",
                                                            finish_reason="stop")],
                    usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    names = Names()
    r.set(names.result(rid), encode(result))
    r.publish(names.channel(rid), b"done")


def write_event(r, rid: str, index: int) -> None:
    """One token event as the worker publishes it: on the channel and into the replay record."""
    finished = index == NUM_EVENTS - 1
    data = encode(TokenEvent(request_id=rid, index=index, offset=index, token_ids=[100 + index], text=f"t{index}",
                             finished=finished, finish_reason="stop" if finished else None))
    names = Names()
    r.publish(names.channel(rid), data)
    r.xadd(names.events(rid), {"event": data})


def restart(server: RedisServer, down_s: float) -> None:
    server.kill()
    time.sleep(down_s)
    server.start()


def kill_clients(server: RedisServer) -> None:
    """CLIENT KILL every connection but the writer's own: the waiting SDK loses pub/sub and pool."""
    admin = server.client()
    admin.client_kill_filter(_type="pubsub")
    admin.client_kill_filter(_type="normal", skipme=True)
    admin.close()


def feed_events(server: RedisServer, rid: str, blip) -> None:
    """Half the events, a blip while the client waits, the rest (with a second blip)."""
    r = server.client()
    for i in range(NUM_EVENTS // 2):
        write_event(r, rid, i)
    time.sleep(0.3)
    blip(server)
    r = server.client()
    write_event(r, rid, NUM_EVENTS // 2)
    time.sleep(0.3)
    blip(server)
    r = server.client()
    for i in range(NUM_EVENTS // 2 + 1, NUM_EVENTS):
        write_event(r, rid, i)


def restart_then_write_result(server, rid: str) -> None:
    """While a client waits on `rid`: a 1 s outage, then the result is written after the restart."""
    time.sleep(0.3)
    restart(server, 1.0)
    write_result(server.client(), rid)


def in_background(fn, *args) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def test_result_survives_server_restart(aof_server):
    client = Client(aof_server.url)
    thread = in_background(restart_then_write_result, aof_server, "r1")
    result = client.result("r1", timeout=10)
    thread.join()
    assert result.token_ids == [5, 6] and result.text == "ab"
    client.close()


def test_stream_survives_client_kill(aof_server):
    client = Client(aof_server.url)
    thread = in_background(feed_events, aof_server, "s1", kill_clients)
    events = list(client.stream("s1", timeout=10))
    thread.join()
    assert [e.index for e in events] == list(range(NUM_EVENTS))   # no duplicate, no gap
    assert [e.token_ids[0] for e in events] == [100 + i for i in range(NUM_EVENTS)]
    client.close()


def test_stream_survives_server_restart(aof_server):
    client = Client(aof_server.url)
    thread = in_background(feed_events, aof_server, "s2", lambda s: restart(s, 0.5))
    events = list(client.stream("s2", timeout=15))
    thread.join()
    assert [e.index for e in events] == list(range(NUM_EVENTS))
    client.close()


def test_submit_retries_a_short_outage_then_raises(aof_server):
    client = Client(aof_server.url, submit_retry_s=5)
    aof_server.kill()
    in_background(lambda: (time.sleep(0.5), aof_server.start()))
    rid = client.submit("hello")
    assert aof_server.client().xlen(Names().stream) == 1
    aof_server.kill()
    quick = Client(aof_server.url, submit_retry_s=0.3)
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="Redis unreachable"):
        quick.submit("hello")
    assert time.monotonic() - started < 3
    assert rid
    client.close()
    quick.close()


def test_async_waits_survive_blips(aof_server):
    async def main():
        client = AsyncClient(aof_server.url)
        thread = in_background(restart_then_write_result, aof_server, "a1")
        result = await client.result("a1", timeout=10)
        thread.join()
        assert result.token_ids == [5, 6]
        thread = in_background(feed_events, aof_server, "a2", kill_clients)
        events = [e async for e in client.stream("a2", timeout=10)]
        thread.join()
        assert [e.index for e in events] == list(range(NUM_EVENTS))
        aof_server.kill()
        quick = AsyncClient(aof_server.url, submit_retry_s=0.3)
        with pytest.raises(redis.ConnectionError, match="Redis unreachable"):
            await quick.submit("hello")
        in_background(lambda: (time.sleep(0.3), aof_server.start()))
        await client.submit("hello")
        assert aof_server.client().xlen(Names().stream) == 1
        await client.aclose()
        await quick.aclose()

    asyncio.run(main())
