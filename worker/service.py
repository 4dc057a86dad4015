"""The worker: bulk reads from the request stream, drives the engine, publishes, acks.

Delivery is at-least-once. A request's events go to its pub/sub channel and to its replay
stream in the same transaction; the final result is stored, then the entry is acked and
deleted. A redelivered request resumes after the tokens its event record already holds, so
what a subscriber saw always matches the final result.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from redis.client import Pipeline

from pravaha_core import Engine, SamplingParams
from pravaha_core.outputs import append_delta
from producer.names import Names, check_request_id
from producer.wire import Completion, Job, Result, TokenEvent, Usage, decode, encode, peek_request_id

from .metrics import HealthServer, WorkerMetrics
from .settings import WorkerConfig

log = logging.getLogger("pravaha.worker")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
MODEL_TTL_S = 30   # several housekeeping periods: a live worker's model never drops out


@dataclass
class Inflight:
    """A request the engine is working on, and what has been published of it."""

    request_id: str
    entry_id: str
    payload: bytes                      # the job as it came off the stream
    num_samples: int
    prompt_tokens: int
    created_at: float = 0.0             # the producer's clock: latencies include queueing
    first_token_at: float | None = None
    completions: dict[int, Completion] = field(default_factory=dict)
    next_index: dict[int, int] = field(default_factory=dict)
    replayed: dict[int, list[int]] = field(default_factory=dict)   # sample -> [tokens, chars] to skip
    events_ttl_set: bool = False        # the event record's TTL: set on our first event, kept fresh
                                        # by housekeeping, set again on the last one

    def completion(self, sample: int) -> Completion:
        return self.completions.setdefault(sample, Completion(index=sample, token_ids=[], text="",
                                                              finish_reason=None))

    def usage(self) -> Usage:
        generated = sum(len(c.token_ids) for c in self.completions.values())
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=generated,
                     total_tokens=self.prompt_tokens + generated)

    @property
    def finished(self) -> bool:
        ended = [c for c in self.completions.values() if c.finish_reason is not None]
        return len(ended) >= self.num_samples


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None,
                 connection: redis.Redis | None = None):
        self.config = config
        self.names = Names(config.stream, config.group, config.prefix)
        # Bound before the model loads: a taken port fails at once, not after minutes of loading.
        self.health = (HealthServer(self, config.metrics_port, drain_token=config.drain_token)
                       if config.metrics_port >= 0 else None)
        self.engine = engine or Engine(config=config.engine)
        self.redis = connection or redis.Redis.from_url(config.redis_url, socket_timeout=30,
                                                        socket_connect_timeout=5, health_check_interval=10)
        self.inflight: dict[str, Inflight] = {}
        # Writes not yet in Redis, flushed in one transaction: (request id or None, a function
        # that queues the write on a pipeline). A request's entries are dropped if it is lost.
        self.pending_writes: list[tuple[str | None, Callable[[Pipeline], object]]] = []
        self.stopping = False
        self.ready = False
        self._cancels = None
        self._next_housekeeping = 0.0
        self._backoff = 0.1
        self._lease_ttl = max(1, int(config.reclaim_idle_s + 0.999))
        self.metrics = WorkerMetrics(self)
        self.last_loop_at = time.monotonic()
        self._preemptions_seen = 0

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM/stop(); then drain in-flight requests and return."""
        health = self.health.start() if self.health else None
        drain_until = None
        while True:
            now, stalled = time.monotonic(), time.monotonic() - self.last_loop_at > self._lease_ttl / 2
            self.last_loop_at = now
            if self.stopping:
                drain_until = drain_until or now + self.config.drain_timeout_s
                if not self.inflight or now > drain_until:
                    break
            try:
                # Paused, or cut off from Redis, past our leases: others may own our work now, and
                # the events queued meanwhile must not reach raw subscribers a second time.
                if (stalled or not self.ready) and self.inflight:
                    self._drop_lost_requests()
                self._flush()
                if not self.ready:
                    self._connect()
                if not self.stopping:
                    self._admit(self._read(), reclaimed=False)
                self._housekeeping()
                self._apply_cancels()
                if self.engine.has_unfinished():
                    self._publish(self._step())
                self._backoff = 0.1
            except REDIS_DOWN as exc:
                self._wait_for_redis(exc, drain_until)
            except redis.ResponseError as exc:   # e.g. the stream or group was deleted under us
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                self._wait_for_redis(exc, drain_until)
        self._release_unfinished()
        if health:
            health.stop()

    def _step(self):
        started = time.perf_counter()
        outputs = self.engine.step()
        self.metrics.step_time.observe(time.perf_counter() - started)
        preemptions = self.engine.stats.num_preemptions
        self.metrics.preemptions.inc(preemptions - self._preemptions_seen)
        self._preemptions_seen = preemptions
        return outputs

    def stop(self, *_signal_args) -> None:
        """Stop reading new work; finish what is in flight (within the drain timeout)."""
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    # ---- Redis plumbing --------------------------------------------------------------
    def _connect(self) -> None:
        try:
            self.redis.xgroup_create(self.names.stream, self.names.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self._cancels is None:
            self._cancels = self.redis.pubsub(ignore_subscribe_messages=True)
        self._cancels.subscribe(self.names.cancel_channel)
        self._check_cancel_keys()   # cancels published while we could not listen
        self._announce_model()
        self.ready = True
        log.info("worker %s serving %s (group %s)", self.config.consumer, self.names.stream, self.names.group)

    def _wait_for_redis(self, exc: Exception, drain_until: float | None) -> None:
        log.warning("redis unavailable (%s); retrying in %.1fs", exc, self._backoff)
        self.ready = False
        if self._cancels is not None:
            self._cancels.close()
            self._cancels = None
        pause = self._backoff * (0.5 + random.random())
        if drain_until is not None:   # draining: never sleep past the drain deadline
            pause = max(0.0, min(pause, drain_until - time.monotonic()))
        time.sleep(pause)
        self._backoff = min(self._backoff * 2, 5.0)

    def _read(self) -> list:
        count = self.engine.num_admittable()
        if count <= 0:
            return []
        block = None if self.engine.has_unfinished() else self.config.block_ms
        reply = self.redis.xreadgroup(self.names.group, self.config.consumer, {self.names.stream: ">"},
                                      count=count, block=block)
        return reply[0][1] if reply else []

    def _flush(self) -> None:
        """Write everything pending in one transaction; kept for retry if Redis is down."""
        if not self.pending_writes:
            return
        pipe = self.redis.pipeline(transaction=True)
        for _, write in self.pending_writes:
            write(pipe)
        pipe.execute()
        self.pending_writes = []

    def _housekeeping(self) -> None:
        """Every few seconds: keep our pending entries fresh, check cancel keys, reclaim."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + min(5.0, self.config.reclaim_idle_s / 3)
        self._announce_model()
        if self.inflight:   # reset idle time so no one reclaims work we are still doing
            self._drop_lost_requests()
        if self.inflight:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xclaim(self.names.stream, self.names.group, self.config.consumer, 0,
                        [r.entry_id for r in self.inflight.values()], justid=True)
            for rid in self.inflight:
                pipe.set(self.names.lease(rid), self.config.consumer, ex=self._lease_ttl)
                pipe.expire(self.names.events(rid), self.config.result_ttl_s)
            pipe.execute()
            self._check_cancel_keys()
        if not self.stopping:
            self._reclaim()
        for info in self.redis.xinfo_groups(self.names.stream):
            if _id(info["name"]) == self.names.group:
                self.metrics.lag.set(info.get("lag") or 0)
                self.metrics.pending.set(info.get("pending") or 0)

    def _announce_model(self) -> None:
        """List our model for the gateways' GET /v1/models until MODEL_TTL_S after our last refresh."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.names.models, {self.config.engine.model: now + MODEL_TTL_S})
        pipe.zremrangebyscore(self.names.models, "-inf", now)
        pipe.execute()

    def _drop_lost_requests(self) -> None:
        """Requests whose lease another worker now holds (we stalled past it) are theirs:
        stop them here and write nothing more for them."""
        rids = list(self.inflight)
        owners = self.redis.mget([self.names.lease(r) for r in rids])
        results = self.redis.mget([self.names.result(r) for r in rids])
        mine = self.config.consumer.encode()
        lost = {rid for rid, owner, result in zip(rids, owners, results)
                if result is not None or (owner is not None and owner != mine)}
        for rid in lost:
            log.warning("request %s was taken over by another worker while this one stalled; dropping it", rid)
            self.engine.abort(rid)
            del self.inflight[rid]
        if lost:
            self.pending_writes = [(rid, write) for rid, write in self.pending_writes if rid not in lost]

    def _reclaim(self) -> None:
        count = self.engine.num_admittable()
        if count <= 0:
            return
        min_idle = int(self.config.reclaim_idle_s * 1000)
        _, entries, deleted = self.redis.xautoclaim(self.names.stream, self.names.group, self.config.consumer,
                                                    min_idle, "0-0", count=count)
        if deleted:
            self.redis.xack(self.names.stream, self.names.group, *deleted)
        entries = [(eid, fields) for eid, fields in entries if fields is not None]
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for eid, _ in entries:
            pipe.xpending_range(self.names.stream, self.names.group, eid, eid, 1)
        counts = [(info[0]["times_delivered"] if info else 1) for info in pipe.execute()]
        fresh = []
        for (eid, fields), deliveries in zip(entries, counts):
            if deliveries > self.config.max_deliveries:
                reason = f"delivered {deliveries} times (max_deliveries {self.config.max_deliveries})"
                payload = fields.get(b"job", b"")
                self._reject(_id(eid), peek_request_id(payload), payload, reason, deliveries, "max_deliveries")
            else:
                fresh.append((eid, fields))
        log.info("reclaimed %d entries from dead consumers", len(entries))
        self._admit(fresh, reclaimed=True)

    # ---- admission -------------------------------------------------------------------
    def _admit(self, entries: list, reclaimed: bool) -> None:
        """Start decoded jobs; reclaimed entries take over the lease of their dead worker."""
        jobs = []
        for eid, fields in entries:
            payload = fields.get(b"job", b"")
            try:
                job = decode(payload, Job)
                check_request_id(job.request_id)
                jobs.append((_id(eid), job, payload))
            except ValueError as exc:
                self._reject(_id(eid), peek_request_id(payload), payload, f"undecodable job: {exc}", 1,
                             "undecodable")
        self.metrics.received.inc(len(entries))
        for eid, job, _ in jobs:
            if job.request_id in self.inflight:   # a duplicate of a live id: ack it, or it is reclaimed
                log.info("acked duplicate entry %s of running request %s", eid, job.request_id)
                self.pending_writes.append((None, lambda p, e=eid: self._ack(p, e)))
        jobs = [j for j in jobs if j[1].request_id not in self.inflight]
        if not jobs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for _, job, _ in jobs:
            rid = job.request_id
            pipe.exists(self.names.result(rid))
            pipe.exists(self.names.cancelled(rid))
            pipe.xrange(self.names.events(rid))
            pipe.set(self.names.lease(rid), self.config.consumer, nx=not reclaimed, ex=self._lease_ttl)
        state = pipe.execute()
        for i, (eid, job, payload) in sorted(enumerate(jobs), key=lambda x: -x[1][1].priority):
            has_result, cancelled, prior, leased = state[4 * i: 4 * i + 4]
            if has_result or not leased:   # finished already, or a duplicate another worker is running
                self.pending_writes.append((None, lambda p, e=eid: self._ack(p, e)))
            else:
                self._start(eid, job, payload, bool(cancelled), prior)

    def _start(self, entry_id: str, job: Job, payload: bytes, cancelled: bool, prior_entries: list) -> None:
        rid = job.request_id
        try:
            params = SamplingParams.from_dict(job.params)
            prompt = self._prompt_ids(job)
            prior = [decode(fields[b"event"], TokenEvent) for _, fields in prior_entries]
            req = Inflight(rid, entry_id, payload, params.n, len(prompt), created_at=job.created_at)
            if cancelled or (job.deadline is not None and time.time() > job.deadline):
                self._finish_now(req, "abort" if cancelled else "error", None if cancelled else "deadline exceeded")
                return
            prefix = self._resume(req, params, prior)
            if prefix is None:
                return
            self.engine.add_request(rid, prompt, params, output_prefix=prefix)
            self.inflight[rid] = req
            self.metrics.prompt_tokens.inc(len(prompt))
        except ValueError as exc:
            self._reject(entry_id, rid, payload, str(exc), 1, "invalid")

    def _prompt_ids(self, job: Job) -> list[int]:
        if (job.prompt is None) == (job.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        if job.messages is not None:
            return self.engine.tokenizer.apply_chat_template(job.messages)
        return self.engine.tokenizer.encode(job.prompt) if isinstance(job.prompt, str) else job.prompt

    def _resume(self, req: Inflight, params: SamplingParams, prior: list[TokenEvent]) -> list[int] | None:
        """Carry on after the events an earlier delivery published. One sample: the engine
        continues from those tokens (returned as its output prefix; None: nothing left to
        do). Several: they are generated again from their fixed seeds and what was already
        published is not published twice."""
        self._absorb_prior(req, prior)
        if not prior:
            return []
        streamed = req.completion(0)
        if req.num_samples > 1:
            req.replayed = {i: [len(c.token_ids), len(c.text)] for i, c in req.completions.items()}
            return []
        if len(streamed.token_ids) >= params.max_tokens:
            self._finish_now(req, "length", None)
            return None
        log.info("resuming %s after %d tokens", req.request_id, len(streamed.token_ids))
        return streamed.token_ids

    def _absorb_prior(self, req: Inflight, prior: list[TokenEvent]) -> None:
        for event in sorted(prior, key=lambda e: (e.sample, e.index)):
            if event.index < req.next_index.get(event.sample, 0):
                continue   # a write that was retried
            req.next_index[event.sample] = event.index + 1
            completion = req.completion(event.sample)
            append_delta(completion, event.token_ids, event.text, event.logprobs)
            _merge_texts(completion, event.logprob_texts)
            if event.finished:
                completion.finish_reason, completion.error = event.finish_reason, event.error

    # ---- output ----------------------------------------------------------------------
    def _publish(self, outputs) -> None:
        """Queue one step's deltas: events for every changed sample, results for finished requests."""
        for out in outputs:
            req = self.inflight.get(out.request_id)
            if req is None:
                continue
            for c in out.outputs:
                token_ids, text, logprobs = self._unpublished(req, c)
                if token_ids or text or c.finish_reason is not None:
                    self._emit(req, c.index, token_ids, text, c.finish_reason, c.error, logprobs)
            if out.finished:
                self._complete(req)

    def _unpublished(self, req: Inflight, c):
        """The part of a regenerated sample's delta not published by an earlier delivery."""
        skip = req.replayed.get(c.index)
        if skip is None:
            return c.token_ids, c.text, c.logprobs
        if req.completion(c.index).finish_reason is not None and c.finish_reason is None:
            return [], "", None   # this sample had finished before: nothing new until the end
        k, m = min(skip[0], len(c.token_ids)), min(skip[1], len(c.text))
        skip[0] -= k
        skip[1] -= m
        return c.token_ids[k:], c.text[m:], None if c.logprobs is None else c.logprobs[k:]

    def _emit(self, req: Inflight, sample: int, token_ids, text, finish_reason, error, logprobs=None) -> None:
        completion = req.completion(sample)
        event = TokenEvent(request_id=req.request_id, sample=sample, num_samples=req.num_samples,
                           index=req.next_index.get(sample, 0), offset=len(completion.token_ids),
                           token_ids=list(token_ids), text=text, finished=finish_reason is not None,
                           finish_reason=finish_reason, error=error, logprobs=logprobs,
                           logprob_texts=self._token_texts(logprobs))
        req.next_index[sample] = event.index + 1
        append_delta(completion, token_ids, text, logprobs)
        _merge_texts(completion, event.logprob_texts)
        if token_ids:
            self.metrics.generated_tokens.inc(len(token_ids))
            if req.first_token_at is None:
                req.first_token_at = time.time()
                self.metrics.ttft.observe(max(0.0, req.first_token_at - req.created_at))
        completion.finish_reason, completion.error = finish_reason, error
        if event.finished:
            event.usage = req.usage()
        rid, data = req.request_id, encode(event)
        # An EXPIRE per event would be a third of the step's commands: the TTL is set on our
        # first event and on each sample's last, and housekeeping refreshes it in between.
        expire = event.finished or not req.events_ttl_set
        req.events_ttl_set = True
        self.pending_writes.append((rid, lambda p: (p.publish(self.names.channel(rid), data),
                                            p.xadd(self.names.events(rid), {"event": data}),
                                            expire and p.expire(self.names.events(rid), self.config.result_ttl_s))))

    def _token_texts(self, logprobs) -> dict[int, str] | None:
        """The text of every token id in these logprobs (the gateway has no tokenizer)."""
        if logprobs is None:
            return None
        decode_one = self.engine.tokenizer.decode
        return {t: decode_one([t], skip_special_tokens=False) for entry in logprobs for t in entry}

    def _complete(self, req: Inflight) -> None:
        """Store the result, then ack; an engine-side error (e.g. too long) also dead-letters."""
        rid = req.request_id
        self.inflight.pop(rid, None)
        result = Result(request_id=rid, completions=[req.completions[i] for i in sorted(req.completions)],
                        usage=req.usage(), worker=self.config.consumer, finished_at=time.time())
        data, eid = encode(result), req.entry_id
        self.pending_writes.append((rid, lambda p: (p.set(self.names.result(rid), data, ex=self.config.result_ttl_s),
                                            self._ack(p, eid), p.delete(self.names.lease(rid)))))
        first = result.completions[0]
        self._observe_finish(req, first)
        if first.finish_reason == "error" and first.error != "deadline exceeded":
            self.metrics.failed.labels("engine_error").inc()
            self.pending_writes.append((rid, self._dead_letter_write(eid, rid, req.payload, first.error, 1)))

    def _observe_finish(self, req: Inflight, first: Completion) -> None:
        now = time.time()
        self.metrics.finished.labels(first.finish_reason or "unknown").inc()
        if req.created_at:
            self.metrics.e2e.observe(max(0.0, now - req.created_at))
        if req.first_token_at is not None and len(first.token_ids) > 1:
            self.metrics.tpot.observe((now - req.first_token_at) / (len(first.token_ids) - 1))

    def _finish_now(self, req: Inflight, reason: str, error: str | None) -> None:
        for sample in range(req.num_samples):
            self._emit(req, sample, [], "", reason, error)
        self._complete(req)

    def _reject(self, entry_id: str, rid: str | None, payload: bytes, reason: str, deliveries: int,
                category: str) -> None:
        """Bad input or too many deliveries: the requester (when its id can be read) gets an
        error result, and the entry moves to the dead-letter stream."""
        self.metrics.failed.labels(category).inc()
        if rid is not None:
            req = Inflight(rid, entry_id, payload, 1, 0)
            prior = self.redis.xrange(self.names.events(rid))   # what an earlier delivery streamed
            self._absorb_prior(req, [decode(f[b"event"], TokenEvent) for _, f in prior])
            self._emit(req, 0, [], "", "error", reason)
            result = Result(request_id=rid, completions=[req.completions[0]], usage=req.usage(),
                            worker=self.config.consumer, finished_at=time.time())
            data = encode(result)
            self.pending_writes.append((rid, lambda p: p.set(self.names.result(rid), data, ex=self.config.result_ttl_s)))
        self.pending_writes.append((rid, self._dead_letter_write(entry_id, rid, payload, reason, deliveries)))
        log.warning("dead-lettered %s (request %s): %s", entry_id, rid, reason)

    def _dead_letter_write(self, entry_id: str, rid: str | None, payload: bytes, reason: str, deliveries: int):
        fields = {"entry_id": entry_id, "request_id": rid or "", "reason": reason,
                  "deliveries": deliveries, "job": payload, "at": time.time()}
        return lambda p: (p.xadd(self.names.dead_letter, fields), self._ack(p, entry_id))

    def _ack(self, pipe, entry_id: str) -> None:
        pipe.xack(self.names.stream, self.names.group, entry_id)
        pipe.xdel(self.names.stream, entry_id)

    # ---- cancellation and shutdown ---------------------------------------------------
    def _apply_cancels(self) -> None:
        while self._cancels is not None and (msg := self._cancels.get_message(timeout=0)) is not None:
            rid = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
            if rid in self.inflight:
                self.engine.abort(rid)

    def _check_cancel_keys(self) -> None:
        rids = list(self.inflight)
        if rids:
            flags = self.redis.mget([self.names.cancelled(r) for r in rids])
            for rid, flag in zip(rids, flags):
                if flag is not None:
                    self.engine.abort(rid)

    def _release_unfinished(self) -> None:
        """Drain timed out: drop what is unfinished without acking; another worker resumes it."""
        for rid in list(self.inflight):
            self.engine.abort(rid)
            self.pending_writes.append((rid, lambda p, r=rid: p.delete(self.names.lease(r))))
            log.warning("left %s pending for another worker", rid)
        self.inflight.clear()
        self.engine.step()   # consume the abort reports
        try:
            self._flush()
            self._leave_group()
        except REDIS_DOWN as exc:
            log.error("exiting with %d unwritten writes: %s", len(self.pending_writes), exc)

    def _leave_group(self) -> None:
        """A clean exit holding no entries removes this consumer from the group (XGROUP
        DELCONSUMER), so consumer lists do not fill with names of workers long gone. One still
        holding entries stays: deleting it would drop them from the PEL, unowned forever."""
        try:
            if not self.redis.xpending_range(self.names.stream, self.names.group, "-", "+", 1,
                                             consumername=self.config.consumer):
                self.redis.xgroup_delconsumer(self.names.stream, self.names.group, self.config.consumer)
        except redis.ResponseError as exc:   # the stream or group is gone: nothing to leave
            log.info("not leaving the group: %s", exc)


def _merge_texts(completion: Completion, texts: dict | None) -> None:
    """The logprob tokens' texts (for clients without the tokenizer) add up with the deltas."""
    if texts:
        completion.logprob_texts = {**(completion.logprob_texts or {}), **texts}


def _id(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
