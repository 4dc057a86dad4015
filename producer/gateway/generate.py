"""POST /v1/completions and /v1/chat/completions: submit one job per prompt, then answer with
one JSON body or with server-sent events from the jobs' token channels.

A client that goes away cancels its jobs (the worker frees their KV blocks within a step); so
does the request timeout, which answers 504 (or, once a stream has begun, an error event).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..aio import AsyncClient
from ..client import QueueFull
from ..openai_api import ParsedRequest, RequestError, chunk, error_body, parse_body, response_body, stream_chunk
from ..wire import Result, TokenEvent, Usage
from .config import GatewayConfig
from .metrics import GatewayMetrics

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


@dataclass
class Gateway:
    """What every route shares: the config, the Redis client, the metrics, background tasks."""

    config: GatewayConfig
    client: AsyncClient
    metrics: GatewayMetrics
    batches: object = None   # the BatchManager
    tasks: set = field(default_factory=set)

    def cancel_later(self, rids: list[str], reason: str) -> None:
        """Cancel jobs from a finally block of a cancelled task (where nothing may be awaited)."""
        self.metrics.cancelled.labels(reason).inc()
        self.spawn(asyncio.gather(*(self.client.cancel(r) for r in rids), return_exceptions=True))

    def spawn(self, awaitable) -> None:
        """Run `awaitable` in the background, holding a reference until it is done."""
        task = asyncio.ensure_future(awaitable)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def generate(gw: Gateway, request: Request, url: str) -> Response:
    """The handler of both generation routes."""
    started = time.perf_counter()
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        return error_response(400, f"the body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    parsed = parse_body(url, body)   # RequestError -> 400 (the app's handler)
    deadline = time.monotonic() + gw.config.request_timeout_s
    rids = await _submit(gw, parsed)
    if isinstance(rids, Response):
        return rids
    try:
        if parsed.stream:
            return await _stream(gw, request, parsed, rids, deadline, started)
        return await _wait(gw, request, parsed, rids, deadline)
    except ClientGone:
        gw.cancel_later(rids, "disconnect")
        return Response(status_code=499)
    except TimeoutError:
        gw.cancel_later(rids, "timeout")
        return error_response(504, f"no answer within the request timeout ({gw.config.request_timeout_s:g}s); "
                                   "the request was cancelled", "timeout_error", code="timeout")


async def _submit(gw: Gateway, parsed: ParsedRequest) -> list[str] | Response:
    """One job per prompt; on a full queue, 429 (and the jobs already submitted are cancelled)."""
    rids: list[str] = []
    try:
        for prompt in parsed.prompts:
            rids.append(await gw.client.submit(prompt, parsed.params, messages=parsed.messages,
                                               deadline_s=gw.config.request_timeout_s))
    except QueueFull as exc:
        gw.metrics.queue_full.inc()
        if rids:
            gw.cancel_later(rids, "queue_full")
        return error_response(429, f"the request queue is full, retry later ({exc})", "rate_limit_error",
                              code="rate_limit_exceeded", headers={"Retry-After": str(gw.config.retry_after_s)})
    return rids


async def until_disconnect(request: Request, awaitable):
    """Await `awaitable`, or raise ClientGone as soon as the client disconnects."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)   # settled before anyone reuses its generator
    if work not in done:
        raise ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(gw: Gateway, request: Request, parsed: ParsedRequest, rids: list[str], deadline: float) -> Response:
    timeout = max(0.001, deadline - time.monotonic())
    results = await until_disconnect(request, asyncio.gather(*(gw.client.result(r, timeout=timeout) for r in rids)))
    failed = _failure(results)
    if failed is not None:
        return failed
    return JSONResponse(response_body(parsed.chat, parsed.model, list(results), top_k=parsed.params.get("logprobs")))


def _failure(results: list[Result]) -> Response | None:
    """The error answer when a job did not complete (the worker refused or aborted it)."""
    for result in results:
        for c in result.completions:
            if c.finish_reason in ("error", "abort"):
                return _finish_error(c.finish_reason, c.error)
    return None


def _finish_error(reason: str, error: str | None) -> Response:
    if error == "deadline exceeded":
        return error_response(504, "the request waited in the queue past its timeout", "timeout_error",
                              code="timeout")
    if reason == "abort":
        return error_response(500, "the request was cancelled", "server_error", code="cancelled")
    return error_response(400, error or "the worker could not run this request")


# ---- streaming ---------------------------------------------------------------------------
@dataclass
class _StreamState:
    """Per choice: whether its role was sent, its text offset; per prompt: usage parts."""

    n: int
    sent_role: set = field(default_factory=set)
    offsets: dict = field(default_factory=dict)
    prompt_tokens: dict = field(default_factory=dict)
    completion_tokens: int = 0

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                     total_tokens=prompt + self.completion_tokens)


async def _stream(gw: Gateway, request: Request, parsed: ParsedRequest, rids: list[str], deadline: float,
                  started: float) -> Response:
    events = _merged(gw.client, rids, deadline)
    try:   # the first event before the headers: a refused job still gets its status code
        first = await until_disconnect(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    gw.metrics.ttft.observe(time.perf_counter() - started)
    if first[1].finish_reason in ("error", "abort"):
        await events.aclose()
        return _finish_error(first[1].finish_reason, first[1].error)
    body = _sse(gw, parsed, rids, first, events)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse(gw: Gateway, parsed: ParsedRequest, rids: list[str], first, events) -> AsyncIterator[bytes]:
    created, rid, n = int(time.time()), rids[0], parsed.params.get("n", 1)
    state, finished = _StreamState(n), False
    gw.metrics.open_streams.inc()
    try:
        yield _event_bytes(gw, parsed, rid, created, state, *first)
        async for prompt_index, event in events:
            if event.finish_reason in ("error", "abort"):
                gw.cancel_later(rids, "error")   # the other samples and prompts, if any
                yield _data(error_body(event.error or "the request was cancelled", "server_error"))
                break
            yield _event_bytes(gw, parsed, rid, created, state, prompt_index, event)
        else:
            if parsed.include_usage:
                yield _data(chunk(parsed.chat, rid, parsed.model, created, [], state.usage(), True))
        yield DONE
        finished = True
    except TimeoutError:
        yield _data(error_body("no answer within the request timeout; the request was cancelled",
                               "timeout_error", code="timeout"))
        yield DONE
        gw.cancel_later(rids, "timeout")
        finished = True
    finally:   # nothing awaited here: a disconnect cancels this task, and would cancel the await too
        gw.metrics.open_streams.dec()
        if not finished:   # the client went away mid-stream
            gw.cancel_later(rids, "disconnect")
        gw.spawn(events.aclose())


def _event_bytes(gw: Gateway, parsed: ParsedRequest, rid: str, created: int, state: _StreamState,
                 prompt_index: int, event: TokenEvent) -> bytes:
    index = prompt_index * state.n + event.sample
    first = index not in state.sent_role
    state.sent_role.add(index)
    offset = state.offsets.get(index, 0)
    out = stream_chunk(parsed.chat, rid, parsed.model, created, index, event, first,
                       parsed.params.get("logprobs"), offset, parsed.include_usage)
    if event.logprob_texts:
        state.offsets[index] = offset + sum(len(event.logprob_texts.get(t, "")) for t in event.token_ids)
    state.completion_tokens += len(event.token_ids)
    if event.usage is not None:
        state.prompt_tokens[prompt_index] = event.usage.prompt_tokens
    return _data(out)


def _data(obj: dict) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def _merged(client: AsyncClient, rids: list[str], deadline: float) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(prompt index, event) from every job, each job's events in order; TimeoutError at the deadline."""
    if len(rids) == 1:
        async for event in client.stream(rids[0], timeout=max(0.001, deadline - time.monotonic())):
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, rid: str) -> None:
        try:
            async for event in client.stream(rid, timeout=max(0.001, deadline - time.monotonic())):
                await queue.put((i, event, None))
            await queue.put((i, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, rid)) for i, rid in enumerate(rids)]
    try:
        open_jobs = len(rids)
        while open_jobs:
            i, event, exc = await queue.get()
            if exc is not None:
                raise exc
            if event is None:
                open_jobs -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


def bad_request(exc: RequestError) -> JSONResponse:
    return error_response(400, exc.message, param=exc.param, code=exc.code)
