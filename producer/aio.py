"""AsyncClient: the Client's API as coroutines and async iterators, for asyncio services."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from pravaha_core.sampling_params import SamplingParams

from .client import (CANCEL_TTL_S, DEFAULT_MAX_BACKLOG, SUBMIT_SCRIPT, EventReader, QueueFull, build_job,
                     result_as_events, wait_budget)
from .names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM, Names, check_request_id
from .wire import Result, TokenEvent, decode, encode


class AsyncClient:
    """`AsyncClient(redis_url, stream="pravaha:requests")`; use `await client.aclose()` at the end."""

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0", stream: str = DEFAULT_STREAM, *,
                 group: str = DEFAULT_GROUP, prefix: str = DEFAULT_PREFIX,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, connection: aioredis.Redis | None = None):
        self.redis = connection or aioredis.Redis.from_url(redis_url)
        self.names = Names(stream, group, prefix)
        self.max_backlog = max_backlog
        self._submit = self.redis.register_script(SUBMIT_SCRIPT)

    async def submit(self, prompt: str | list[int] | None, params: SamplingParams | dict | None = None, *,
                     request_id: str | None = None, priority: int = 0, deadline_s: float | None = None,
                     messages: list[dict] | None = None) -> str:
        job = build_job(prompt, params, request_id, priority, deadline_s, messages)
        if await self._submit(keys=[self.names.stream], args=[self.max_backlog, encode(job)]) is None:
            raise QueueFull(f"{self.names.stream} holds {self.max_backlog} unprocessed jobs (max_backlog)")
        return job.request_id

    async def stream(self, request_id: str, timeout: float | None = None) -> AsyncIterator[TokenEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout
        reader = EventReader()
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.names.channel(request_id))
        try:
            while True:
                entries = await self.redis.xrange(self.names.events(request_id), reader.range_start(), "+")
                for event in reader.take(entries):
                    yield event
                if reader.done:
                    return
                if not entries and reader.last_id == "-":
                    result = await self._get_result(request_id)
                    if result is not None:
                        for event in result_as_events(result):
                            yield event
                        return
                await pubsub.get_message(timeout=wait_budget(deadline, request_id))
        finally:
            await pubsub.aclose()

    async def result(self, request_id: str, timeout: float | None = None) -> Result:
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.names.channel(request_id))
        try:
            while (result := await self._get_result(request_id)) is None:
                await pubsub.get_message(timeout=wait_budget(deadline, request_id))
            return result
        finally:
            await pubsub.aclose()

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
        await self.redis.aclose()

    async def _get_result(self, request_id: str) -> Result | None:
        data = await self.redis.get(self.names.result(request_id))
        return None if data is None else decode(data, Result)

