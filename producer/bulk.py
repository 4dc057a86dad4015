"""Offline bulk generation: OpenAI Batch JSONL in, OpenAI batch output JSONL out.

The input is streamed and at most `max_in_flight` requests are outstanding, so memory stays
flat for any file size (duplicate detection keeps custom_ids in an on-disk SQLite index, and
finished lines are a bitmap). Request ids are derived from each line's number and content, so
a rerun after a crash finds the results Redis already holds and writes every remaining line
exactly once; a half-written last output line is cut off first.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from . import openai_api
from .client import Client, QueueFull
from .openai_api import CHAT, CHAT_DEFAULT_MAX_TOKENS, COMPLETIONS, IGNORED, PASSTHROUGH  # noqa: F401 - re-exported
from .wire import Result, decode

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class LineError(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass
class BulkRequest:
    line_no: int
    custom_id: str
    url: str
    model: str
    params: dict
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None

    @property
    def request_id(self) -> str:
        """Stable across reruns of the same line; changes when the line's content changes."""
        digest = hashlib.blake2b(json.dumps([self.url, self.params, self.prompt, self.messages],
                                            sort_keys=True).encode(), digest_size=8).hexdigest()
        return f"bulk-{self.line_no}-{digest}"


def parse_line(raw: bytes, line_no: int) -> BulkRequest:
    """One input line -> a BulkRequest, or LineError naming what is wrong."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise LineError("invalid_json", f"line {line_no + 1} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_request", "line is not a JSON object")
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise LineError("invalid_request", "line holds an unpaired surrogate (\\ud800-\\udfff escape)") from None
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("invalid_request", "custom_id: missing or not a non-empty string")
    try:
        if obj.get("method", "POST") != "POST":
            raise LineError("invalid_request", f"method: only POST is supported, got {obj.get('method')!r}")
        url, body = obj.get("url"), obj.get("body")
        if url not in (COMPLETIONS, CHAT):
            raise LineError("invalid_request", f"url: must be {COMPLETIONS} or {CHAT}, got {url!r}")
        if not isinstance(body, dict):
            raise LineError("invalid_request", "body: missing or not an object")
        return _request(line_no, custom_id, url, body)
    except LineError as err:
        err.custom_id = custom_id
        raise


def _request(line_no: int, custom_id: str, url: str, body: dict) -> BulkRequest:
    try:
        parsed = openai_api.parse_body(url, body)
    except openai_api.RequestError as exc:
        raise LineError("invalid_request", exc.message) from None
    if len(parsed.prompts) != 1:
        raise LineError("invalid_request", "body.prompt: a list of prompts is not supported; one prompt per line")
    return BulkRequest(line_no, custom_id, url, parsed.model, parsed.params, prompt=parsed.prompts[0],
                       messages=parsed.messages)


def response_body(req: BulkRequest, result: Result, created: int) -> dict:
    """The OpenAI completion / chat.completion object for a finished request."""
    return openai_api.response_body(req.url == CHAT, req.model, [result], created, req.params.get("logprobs"))


def output_line(line_no: int, custom_id: str | None, response: dict | None, error: dict | None) -> bytes:
    return (json.dumps({"id": f"batch_req_{line_no}", "custom_id": custom_id, "response": response,
                        "error": error}, ensure_ascii=False) + "\n").encode()


# ---- files ---------------------------------------------------------------------------
class OutputFile:
    """Append-only output; on open, a half-written last line is cut and finished lines noted."""

    def __init__(self, path: str, num_lines: int):
        self.done = bytearray((num_lines + 7) // 8)
        self.num_done = 0
        self.outcomes: dict[str, int] = {}
        mode = "r+b" if os.path.exists(path) else "w+b"
        self.f = open(path, mode)
        good_end = 0
        for raw in iter(self.f.readline, b""):
            if not raw.endswith(b"\n"):
                break   # a crash mid-write: cut it off
            try:
                obj = json.loads(raw)
                line_no = int(obj["id"].removeprefix("batch_req_"))
            except (ValueError, KeyError, AttributeError) as exc:
                raise ValueError(f"{path}: line {self.num_done + 1} is not a pravaha output line ({exc})") from None
            if not 0 <= line_no < num_lines:
                raise ValueError(f"{path}: output line for input line {line_no + 1}, but the input has {num_lines}")
            self._mark(line_no, obj)
            good_end = self.f.tell()
        self.f.seek(good_end)
        self.f.truncate()

    def is_done(self, line_no: int) -> bool:
        return bool(self.done[line_no >> 3] & (1 << (line_no & 7)))

    def write(self, line_no: int, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()
        self._mark(line_no, json.loads(data))

    def _mark(self, line_no: int, obj: dict) -> None:
        if self.is_done(line_no):
            raise ValueError(f"output holds input line {line_no + 1} twice")
        self.done[line_no >> 3] |= 1 << (line_no & 7)
        self.num_done += 1
        outcome = "ok" if obj.get("error") is None else obj["error"].get("code", "error")
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def close(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()


class CustomIds:
    """custom_id -> first line, in an on-disk SQLite index (memory stays flat)."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="pravaha-bulk-ids-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE ids (cid TEXT PRIMARY KEY, line INTEGER)")

    def first_line(self, custom_id: str, line_no: int) -> int:
        """Register `custom_id` at `line_no`; returns the line where it first appeared."""
        cur = self.db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?)", (custom_id, line_no))
        if cur.rowcount:
            return line_no
        return self.db.execute("SELECT line FROM ids WHERE cid = ?", (custom_id,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)


def count_lines(path: str) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# ---- the run -------------------------------------------------------------------------
@dataclass
class Summary:
    total: int
    outcomes: dict[str, int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    resumed: int = 0

    def text(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        rate = self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (f"{self.total} lines ({parts}); {self.resumed} already done before this run; "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens in "
                f"{self.elapsed_s:.1f}s: {rate:.1f} tokens/s")


@dataclass
class _Run:
    client: Client
    out: OutputFile
    max_in_flight: int
    pending: dict[str, BulkRequest] = field(default_factory=dict)
    summary: Summary | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    last_poll: float = 0.0


def run_bulk(input_path: str, out_path: str, *, redis_url: str, max_in_flight: int = 64,
             stream: str = "pravaha:requests", progress: bool | None = None,
             on_progress: Callable[[dict], None] | None = None) -> Summary:
    """Generate a completion for every line of `input_path` into `out_path` (see module doc).

    This produces and collects; the workers serving `redis_url` generate (`pravaha bulk`
    without --redis-url starts a local one, see worker/local.py).
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight: must be >= 1")
    total = count_lines(input_path)
    client = Client(redis_url, stream=stream)
    try:
        client.redis.ping()   # before the output file exists: an unreachable Redis leaves no empty file
    except REDIS_DOWN:
        client.close()
        raise
    out = OutputFile(out_path, total)
    run = _Run(client, out, max_in_flight)
    run.summary = Summary(total, out.outcomes, resumed=out.num_done)
    bar = Progress(total, sys.stderr if (progress if progress is not None else sys.stderr.isatty()) else None,
                   on_progress)
    started = time.monotonic()
    ids = CustomIds()
    try:
        with open(input_path, "rb") as f:
            for line_no, raw in enumerate(f):
                _feed(run, ids, line_no, raw)
                if len(run.pending) >= max_in_flight or time.monotonic() - run.last_poll > 0.05:
                    _collect(run, block=len(run.pending) >= max_in_flight)
                bar.update(out.num_done, run.summary.completion_tokens, time.monotonic() - started)
        while run.pending:
            _collect(run, block=True)
            bar.update(out.num_done, run.summary.completion_tokens, time.monotonic() - started)
    finally:
        ids.close()
        out.close()
        run.client.close()
    run.summary.elapsed_s = time.monotonic() - started
    bar.update(out.num_done, run.summary.completion_tokens, run.summary.elapsed_s, force=True)
    bar.finish()
    return run.summary


def parse_and_claim(raw: bytes, line_no: int, ids: CustomIds, endpoint: str | None = None) -> BulkRequest:
    """parse_line, then claim the line's custom_id (LineError for a repeat, or for a url other
    than `endpoint`); a bad line still claims its custom_id."""
    try:
        req = parse_line(raw, line_no)
        if endpoint is not None and req.url != endpoint:
            raise LineError("invalid_request", f"url: this batch's endpoint is {endpoint}, got {req.url}",
                            req.custom_id)
        first = ids.first_line(req.custom_id, line_no)
        if first != line_no:
            raise LineError("duplicate_custom_id", f"custom_id {req.custom_id!r} already used on line {first + 1}",
                            req.custom_id)
        return req
    except LineError as err:
        if err.custom_id is not None:
            ids.first_line(err.custom_id, line_no)
        raise


def _feed(run: _Run, ids: CustomIds, line_no: int, raw: bytes) -> None:
    try:
        req = parse_and_claim(raw, line_no, ids)
    except LineError as err:
        if not run.out.is_done(line_no):
            run.out.write(line_no, output_line(line_no, err.custom_id, None, {"code": err.code, "message": err.message}))
        return
    if run.out.is_done(line_no):
        return
    _retry(lambda: _submit(run, req))


def _submit(run: _Run, req: BulkRequest, collect: bool = True) -> None:
    """Submit (unless Redis already holds the result); on QueueFull collect results meanwhile."""
    rid = req.request_id
    if run.client.redis.exists(run.client.names.result(rid)):
        run.pending[rid] = req   # finished before a crash: collected below, not redone
        return
    while True:
        try:
            run.client.submit(req.prompt, req.params, request_id=rid, messages=req.messages)
            break
        except QueueFull:
            if collect and run.pending:
                _collect(run, block=True)
            else:
                time.sleep(0.2)   # other producers filled the queue; wait for the workers
    run.pending[rid] = req


def _collect(run: _Run, block: bool) -> None:
    """Write the lines whose results have arrived; with block, wait until at least one has."""
    run.last_poll = time.monotonic()
    while run.pending:
        rids = list(run.pending)
        try:
            results = run.client.redis.mget([run.client.names.result(r) for r in rids])
        except REDIS_DOWN:
            # Redis restarted: jobs it lost (no AOF) are submitted again. Duplicates are safe:
            # a worker drops a job whose result exists or that another worker is running.
            _retry(lambda: run.client.redis.ping())
            for req in list(run.pending.values()):
                _retry(lambda r=req: _submit(run, r, collect=False))
            continue
        done = [(rid, data) for rid, data in zip(rids, results) if data is not None]
        for rid, data in done:
            _write_result(run, run.pending.pop(rid), decode(data, Result))
        if done or not block:
            return
        time.sleep(0.02)


def _write_result(run: _Run, req: BulkRequest, result: Result) -> None:
    errors = [c for c in result.completions if c.finish_reason in ("error", "abort")]
    if errors:
        code = "generation_error" if errors[0].finish_reason == "error" else "cancelled"
        line = output_line(req.line_no, req.custom_id, None, {"code": code, "message": errors[0].error or code})
    else:
        body = response_body(req, result, run.created)
        line = output_line(req.line_no, req.custom_id, {"status_code": 200, "request_id": result.request_id,
                                                        "body": body}, None)
        run.summary.prompt_tokens += result.usage.prompt_tokens
        run.summary.completion_tokens += result.usage.completion_tokens
    run.out.write(req.line_no, line)


def _retry(fn, attempts: int = 60):
    """Run `fn`, riding out a Redis restart with backoff (about a minute in all)."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn()
        except REDIS_DOWN:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Progress:
    """A one-line progress bar on a terminal (done/total, tokens/s, ETA); callbacks for RQ."""

    def __init__(self, total: int, stream, callback: Callable[[dict], None] | None):
        self.total, self.stream, self.callback = total, stream, callback
        self.last = 0.0

    def update(self, done: int, tokens: int, elapsed: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        rate = tokens / elapsed if elapsed > 0 else 0.0
        per_line = elapsed / done if done else 0.0
        state = {"done": done, "total": self.total, "tokens": tokens, "tokens_per_s": round(rate, 1),
                 "eta_s": round(per_line * (self.total - done), 1)}
        if self.callback:
            self.callback(state)
        if self.stream:
            width = 30
            filled = int(width * done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                              f"{rate:.1f} tok/s ETA {state['eta_s']:.0f}s ")
            self.stream.flush()

    def finish(self) -> None:
        if self.stream:
            self.stream.write("\n")


# ---- RQ ------------------------------------------------------------------------------
RQ_QUEUE = "pravaha-bulk"


def enqueue_rq(input_path: str, out_path: str, redis_url: str, max_in_flight: int, stream: str):
    """Enqueue the whole file as one RQ job on `pravaha-bulk` (JSON-serialized, no pickle).

    Run it with `rq worker pravaha-bulk -S json --url REDIS_URL`; progress shows in job.meta.
    """
    from rq import Queue
    from rq.serializers import JSONSerializer

    queue = Queue(RQ_QUEUE, connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    return queue.enqueue(rq_job, kwargs={"input_path": os.path.abspath(input_path),
                                         "out_path": os.path.abspath(out_path), "redis_url": redis_url,
                                         "max_in_flight": max_in_flight, "stream": stream},
                         job_timeout=-1, result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
                         description=f"pravaha bulk {input_path} -> {out_path}")


def rq_job(input_path: str, out_path: str, redis_url: str, max_in_flight: int, stream: str) -> dict:
    """The RQ job body: a normal bulk run whose progress lands in job.meta."""
    from rq import get_current_job

    job = get_current_job()

    def report(state: dict) -> None:
        if job is not None:
            job.meta["progress"] = state
            job.save_meta()

    summary = run_bulk(input_path, out_path, redis_url=redis_url, max_in_flight=max_in_flight,
                       stream=stream, progress=False, on_progress=report)
    return {"total": summary.total, "outcomes": summary.outcomes, "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens, "elapsed_s": round(summary.elapsed_s, 2)}
