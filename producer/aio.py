"""AsyncClient: the Client's API as coroutines and async iterators, for asyncio services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from pravaha_core.sampling_params import SamplingParams

from .client import (CANCEL_TTL_S, DEFAULT_MAX_BACKLOG, POLL_S, SUBMIT_RETRY_S, SUBMIT_SCRIPT, Backoff,
                     EventReader, QueueFull, build_job, result_as_events, submit_delay, wait_budget)
from .names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM, Names, check_request_id
from .wire import Result, TokenEvent, decode, encode

REDIS_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError)
MAX_CONNECTIONS = 64


class _Wakeups:
    """One pub/sub connection per client, shared by every stream() and result() waiting on it:
    a message on a request's channel wakes that request's waiters (hundreds at once)."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self.pubsub = None
        self.task: asyncio.Task | None = None
        self.waiters: dict[str, set[asyncio.Event]] = {}

    async def register(self, channel: str) -> asyncio.Event:
        event = asyncio.Event()
        if self.pubsub is None:
            self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        if channel not in self.waiters:
            self.waiters[channel] = set()
            try:
                await self.pubsub.subscribe(channel)
            except BaseException:
                del self.waiters[channel]   # the caller retries the whole registration
                raise
        self.waiters[channel].add(event)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._dispatch())
        return event

    async def unregister(self, channel: str, event: asyncio.Event) -> None:
        events = self.waiters.get(channel)
        if events is None:
            return
        events.discard(event)
        if not events:
            del self.waiters[channel]
            try:
                await self.pubsub.unsubscribe(channel)
            except REDIS_DOWN:
                pass   # the connection is gone; nothing to undo

    async def _dispatch(self) -> None:
        while self.waiters:
            try:
                msg = await self.pubsub.get_message(timeout=POLL_S)
            except REDIS_DOWN:
                await asyncio.sleep(POLL_S)   # waiters fall back to polling until Redis returns
                await self._resubscribe()
                continue
            if msg is not None:
                channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                for event in self.waiters.get(channel, ()):
                    event.set()

    async def _resubscribe(self) -> None:
        try:
            await self.pubsub.aclose()
            self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            if self.waiters:
                await self.pubsub.subscribe(*self.waiters)
        except REDIS_DOWN:
            pass

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.pubsub is not None:
            await self.pubsub.aclose()


class AsyncClient:
    """`AsyncClient(redis_url, stream="pravaha:requests")`; use `await client.aclose()` at the end."""

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0", stream: str = DEFAULT_STREAM, *,
                 group: str = DEFAULT_GROUP, prefix: str = DEFAULT_PREFIX,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, connection: aioredis.Redis | None = None,
                 submit_retry_s: float = SUBMIT_RETRY_S):
        # A blocking pool: with hundreds of concurrent calls, commands wait for a connection
        # instead of failing; waiting on channels shares one pub/sub connection (_Wakeups).
        self.redis = connection or aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=MAX_CONNECTIONS, timeout=None))
        self.names = Names(stream, group, prefix)
        self.max_backlog = max_backlog
        self.submit_retry_s = submit_retry_s
        self._submit = self.redis.register_script(SUBMIT_SCRIPT)
        self._wakeups = _Wakeups(self.redis)

    async def submit(self, prompt: str | list[int] | None, params: SamplingParams | dict | None = None, *,
                     request_id: str | None = None, priority: int = 0, deadline_s: float | None = None,
                     messages: list[dict] | None = None) -> str:
        job = build_job(prompt, params, request_id, priority, deadline_s, messages)
        backoff = Backoff(time.monotonic() + self.submit_retry_s, f"submit {job.request_id!r}")
        while True:
            try:
                entry_id = await self._submit(keys=[self.names.stream], args=[self.max_backlog, encode(job)])
                break
            except REDIS_DOWN as exc:
                await asyncio.sleep(submit_delay(backoff, exc, self.submit_retry_s))
        if entry_id is None:
            raise QueueFull(f"{self.names.stream} holds {self.max_backlog} unprocessed jobs (max_backlog)")
        return job.request_id

    async def stream(self, request_id: str, timeout: float | None = None) -> AsyncIterator[TokenEvent]:
        """Token events from the first one, whenever called; ends after the last sample finishes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reader = EventReader()   # keeps the last entry id read: a retry resumes after it
        backoff = Backoff(deadline, f"request {request_id!r}")
        channel = self.names.channel(request_id)
        wakeup = await self._register(channel, backoff)
        try:
            while True:
                wakeup.clear()
                try:
                    entries = await self.redis.xrange(self.names.events(request_id), reader.range_start(), "+")
                    events = reader.take(entries)
                    fallback = not entries and reader.last_id == "-" and await self._get_result(request_id)
                except REDIS_DOWN as exc:
                    await asyncio.sleep(backoff.next_delay(exc))
                    continue
                backoff.reset()
                for event in events:
                    yield event
                if reader.done:
                    return
                if fallback:   # the record expired, the result is still here
                    for event in result_as_events(fallback):
                        yield event
                    return
                await _wait(wakeup, deadline, request_id)
        finally:
            await self._wakeups.unregister(channel, wakeup)

    async def result(self, request_id: str, timeout: float | None = None) -> Result:
        """Wait for the final result (TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(deadline, f"request {request_id!r}")
        channel = self.names.channel(request_id)
        wakeup = await self._register(channel, backoff)
        try:
            while True:
                wakeup.clear()
                try:
                    result = await self._get_result(request_id)
                except REDIS_DOWN as exc:
                    await asyncio.sleep(backoff.next_delay(exc))
                    continue
                if result is not None:
                    return result
                backoff.reset()
                await _wait(wakeup, deadline, request_id)
        finally:
            await self._wakeups.unregister(channel, wakeup)

    async def _register(self, channel: str, backoff: Backoff) -> asyncio.Event:
        """Subscribe for wake-ups, retrying through a Redis blip until the deadline."""
        while True:
            try:
                return await self._wakeups.register(channel)
            except REDIS_DOWN as exc:
                await asyncio.sleep(backoff.next_delay(exc))

    async def generate(self, prompt: str | list[int], params: SamplingParams | dict | None = None,
                       timeout: float | None = None, **submit_kwargs: Any) -> Result:
        return await self.result(await self.submit(prompt, params, **submit_kwargs), timeout=timeout)

    async def cancel(self, request_id: str) -> None:
        check_request_id(request_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.names.cancelled(request_id), 1, ex=CANCEL_TTL_S)
            pipe.publish(self.names.cancel_channel, request_id)
            await pipe.execute()

    async def backlog(self) -> int:
        return await self.redis.xlen(self.names.stream)

    async def aclose(self) -> None:
        await self._wakeups.aclose()
        await self.redis.aclose()

    async def _get_result(self, request_id: str) -> Result | None:
        data = await self.redis.get(self.names.result(request_id))
        return None if data is None else decode(data, Result)



async def _wait(wakeup: asyncio.Event, deadline: float | None, request_id: str) -> None:
    """Until a message on the request's channel, or the poll interval, or TimeoutError."""
    try:
        await asyncio.wait_for(wakeup.wait(), wait_budget(deadline, request_id))
    except asyncio.TimeoutError:
        wait_budget(deadline, request_id)   # raises once the deadline has passed
