"""The client SDK: submit prompt jobs, stream their tokens, wait for results, cancel."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from pravaha_core.sampling_params import SamplingParams

from .names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM, Names, check_request_id
from .wire import Completion, Job, Result, TokenEvent, Usage, decode, encode

DEFAULT_MAX_BACKLOG = 100_000
CANCEL_TTL_S = 24 * 3600
POLL_S = 1.0   # safety poll while waiting for a pub/sub wake-up
SUBMIT_RETRY_S = 5.0   # submit() rides out a Redis restart this long, then raises
# A restart, failover or CLIENT KILL: waits retry with capped backoff until their own timeout.
REDIS_BLIPS = (redis.ConnectionError, redis.TimeoutError)   # BusyLoadingError is a ConnectionError

# Atomically: refuse when the backlog (entries not yet acknowledged and deleted) is at the
# limit, else append. Nothing is ever trimmed.
SUBMIT_SCRIPT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
"""


class QueueFull(Exception):
    """The request stream's backlog is at the configured limit; retry later."""


def build_job(prompt: str | list[int] | None, params: SamplingParams | dict | None, request_id: str | None,
              priority: int, deadline_s: float | None, messages: list[dict] | None = None) -> Job:
    """Validate a submission and turn it into a wire Job (`messages` instead of `prompt` for chat)."""
    if isinstance(params, SamplingParams):
        params = params.to_dict()
    sp = SamplingParams.from_dict(dict(params or {}))
    if sp.seed is None and sp.temperature > 0:
        # A fixed seed makes a redelivered job regenerate the same tokens on another worker.
        sp.seed = random.getrandbits(63)
    check_prompt(prompt, messages)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError("priority: must be an integer")
    if deadline_s is not None and (not isinstance(deadline_s, (int, float)) or deadline_s <= 0):
        raise ValueError("deadline_s: must be a positive number of seconds")
    now = time.time()
    rid = check_request_id(request_id) if request_id is not None else uuid.uuid4().hex
    return Job(request_id=rid, prompt=prompt, messages=messages, params=sp.to_dict(), priority=priority,
               deadline=now + deadline_s if deadline_s else None, created_at=now)


def check_prompt(prompt: object, messages: object) -> None:
    """Exactly one of a non-empty prompt (text or token ids) and chat messages."""
    if messages is not None:
        if prompt is not None:
            raise ValueError("prompt: give either prompt or messages, not both")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise ValueError("messages: must be a non-empty list of {role, content} objects")
    elif not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise ValueError("prompt: must be a non-empty string or list of token ids")


def result_as_events(result: Result) -> list[TokenEvent]:
    """One finished event per sample, for a request whose event record has expired."""
    return [TokenEvent(request_id=result.request_id, sample=c.index, index=0, offset=0,
                       token_ids=c.token_ids, text=c.text, finished=True, finish_reason=c.finish_reason,
                       error=c.error, usage=result.usage, num_samples=len(result.completions))
            for c in result.completions]


class Backoff:
    """Sleeps between retries after a Redis blip: 0.05 s doubling up to 1 s, never past the deadline."""

    FIRST_S, MAX_S = 0.05, 1.0

    def __init__(self, deadline: float | None, what: str):
        self.deadline, self.what = deadline, what
        self.delay = self.FIRST_S

    def next_delay(self, exc: Exception) -> float:
        """Seconds to sleep before the next try; raises once the deadline has passed."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"{self.what}: Redis unreachable until the timeout ({exc})") from exc
        delay = self.delay if left is None else min(self.delay, left)
        self.delay = min(self.delay * 2, self.MAX_S)
        return delay

    def reset(self) -> None:
        self.delay = self.FIRST_S


class EventReader:
    """Reads a request's event record in order, from the first event, deduplicated."""

    def __init__(self):
        self.last_id = "-"
        self.finished: set[int] = set()
        self.num_samples = 1
        self.seen: set[tuple[int, int]] = set()   # (sample, index): a retried write may repeat one

    def range_start(self) -> str:
        return self.last_id if self.last_id == "-" else f"({self.last_id}"

    def take(self, entries: list) -> list[TokenEvent]:
        events = []
        for entry_id, fields in entries:
            self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            event = decode(fields[b"event"], TokenEvent)
            if (event.sample, event.index) in self.seen:
                continue
            self.seen.add((event.sample, event.index))
            self.num_samples = event.num_samples
            if event.finished:
                self.finished.add(event.sample)
            events.append(event)
        return events

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.num_samples


CONNECT_TIMEOUT_S = 5.0


class Client:
    """Synchronous client. `Client(redis_url, stream="pravaha:requests")`."""

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0", stream: str = DEFAULT_STREAM, *,
                 group: str = DEFAULT_GROUP, prefix: str = DEFAULT_PREFIX,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, connection: redis.Redis | None = None,
                 submit_retry_s: float = SUBMIT_RETRY_S):
        # A bounded connect: an unreachable Redis fails within seconds instead of a TCP timeout.
        self.redis = connection or redis.Redis.from_url(redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S)
        self.names = Names(stream, group, prefix)
        self.max_backlog = max_backlog
        self.submit_retry_s = submit_retry_s
        self._submit = self.redis.register_script(SUBMIT_SCRIPT)

    def submit(self, prompt: str | list[int] | None, params: SamplingParams | dict | None = None, *,
               request_id: str | None = None, priority: int = 0, deadline_s: float | None = None,
               messages: list[dict] | None = None) -> str:
        """Enqueue one job; returns its request id. Raises QueueFull past the backlog limit.
        For chat, pass `prompt=None, messages=[...]`: the worker applies the model's template."""
        job = build_job(prompt, params, request_id, priority, deadline_s, messages)
        backoff = Backoff(time.monotonic() + self.submit_retry_s, f"submit {job.request_id!r}")
        while True:
            try:   # a retried XADD after a lost reply may enqueue twice; workers drop duplicate ids
                entry_id = self._submit(keys=[self.names.stream], args=[self.max_backlog, encode(job)])
                break
            except REDIS_BLIPS as exc:
                time.sleep(submit_delay(backoff, exc, self.submit_retry_s))
        if entry_id is None:
            raise QueueFull(f"{self.names.stream} holds {self.max_backlog} unprocessed jobs (max_backlog)")
        return job.request_id

    def stream(self, request_id: str, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Token events from the first one, whenever called; ends after the last sample finishes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reader = EventReader()   # keeps the last entry id read: a retry resumes after it
        backoff = Backoff(deadline, f"request {request_id!r}")
        pubsub = None
        try:
            while True:
                try:
                    pubsub = pubsub or self._subscribe(request_id)
                    entries = self.redis.xrange(self.names.events(request_id), reader.range_start(), "+")
                    events = reader.take(entries)
                    fallback = not entries and reader.last_id == "-" and self._get_result(request_id)
                except REDIS_BLIPS as exc:
                    pubsub = close_quietly(pubsub)
                    time.sleep(backoff.next_delay(exc))
                    continue
                backoff.reset()
                yield from events
                if reader.done:
                    return
                if fallback:   # the record expired, the result is still here
                    yield from result_as_events(fallback)
                    return
                try:
                    pubsub.get_message(timeout=wait_budget(deadline, request_id))
                except REDIS_BLIPS:
                    pubsub = close_quietly(pubsub)   # the next read retries with backoff
        finally:
            close_quietly(pubsub)

    def result(self, request_id: str, timeout: float | None = None) -> Result:
        """Wait for the final result (TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(deadline, f"request {request_id!r}")
        pubsub = None
        try:
            while True:
                try:
                    pubsub = pubsub or self._subscribe(request_id)
                    if (result := self._get_result(request_id)) is not None:
                        return result
                    backoff.reset()
                    pubsub.get_message(timeout=wait_budget(deadline, request_id))
                except REDIS_BLIPS as exc:
                    pubsub = close_quietly(pubsub)
                    time.sleep(backoff.next_delay(exc))
        finally:
            close_quietly(pubsub)

    def generate(self, prompt: str | list[int], params: SamplingParams | dict | None = None,
                 timeout: float | None = None, **submit_kwargs: Any) -> Result:
        """Submit and wait for the result."""
        return self.result(self.submit(prompt, params, **submit_kwargs), timeout=timeout)

    def cancel(self, request_id: str) -> None:
        """Stop the request: a running one within one engine step, a queued one when picked up."""
        check_request_id(request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.names.cancelled(request_id), 1, ex=CANCEL_TTL_S)
        pipe.publish(self.names.cancel_channel, request_id)
        pipe.execute()

    def backlog(self) -> int:
        """Jobs on the stream not yet finished and acknowledged."""
        return self.redis.xlen(self.names.stream)

    def close(self) -> None:
        self.redis.close()

    def _subscribe(self, request_id: str) -> redis.client.PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.names.channel(request_id))
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    def _get_result(self, request_id: str) -> Result | None:
        data = self.redis.get(self.names.result(request_id))
        return None if data is None else decode(data, Result)


def close_quietly(pubsub) -> None:
    """Close a pub/sub connection that may already be dead; returns None to clear the caller's."""
    if pubsub is not None:
        try:
            pubsub.close()
        except REDIS_BLIPS:
            pass


def submit_delay(backoff: Backoff, exc: Exception, retry_s: float) -> float:
    """The next backoff of a submit; a clear ConnectionError once its retry time is spent."""
    try:
        return backoff.next_delay(exc)
    except TimeoutError:
        raise redis.ConnectionError(f"Redis unreachable for {retry_s:g} s, job not submitted: {exc}") from exc


def wait_budget(deadline: float | None, request_id: str) -> float:
    """Seconds to wait for the next wake-up; TimeoutError once the deadline has passed."""
    if deadline is None:
        return POLL_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"request {request_id!r}: no result within the timeout")
    return min(POLL_S, left)


__all__ = ["Client", "Completion", "QueueFull", "Result", "TokenEvent", "Usage"]
