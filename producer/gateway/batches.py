"""OpenAI's Batch API on the queue: batches that survive gateway restarts and crashes.

Files live under `files_dir`; Redis holds only state (file metadata, each batch's object, a
lease naming the gateway that runs it). Every gateway adopts active batches whose lease has
lapsed, so a batch whose gateway was killed goes on elsewhere, or in the restarted one.

A run is `pravaha bulk`'s machinery: the input is streamed with at most
`batch_max_in_flight` requests outstanding; request ids derive from the batch, the line's
number and its content, so a resumed run collects what Redis already holds; output and error
files are appended as results arrive, and on resume their torn last lines are cut and the
lines they hold are skipped: each input line ends up in exactly one of them, once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid

import redis

from ..bulk import CustomIds, LineError, OutputFile, count_lines, output_line, parse_and_claim
from ..client import Client, QueueFull
from ..names import Names
from ..openai_api import CHAT, response_body
from ..wire import Result, decode
from .config import GatewayConfig

log = logging.getLogger("pravaha.gateway.batches")
FINAL = ("completed", "failed", "cancelled", "expired")
COMPLETION_WINDOW_S = 24 * 3600
COUNTS_EVERY_S = 0.5    # how often a run publishes request_counts


class FileStore:
    """Files API storage: bytes at `<files_dir>/<id>.jsonl`, metadata in a Redis hash."""

    def __init__(self, root: str, r: redis.Redis, names: Names):
        self.root, self.redis, self.names = root, r, names
        os.makedirs(root, exist_ok=True)

    def path(self, file_id: str) -> str:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise KeyError(file_id)
        return os.path.join(self.root, f"{file_id}.jsonl")

    def save(self, src, filename: str, purpose: str) -> dict:
        """Copy the upload `src` (a file object) to disk in chunks and record it."""
        file_id = f"file-{uuid.uuid4().hex}"
        tmp = self.path(file_id) + ".part"
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, self.path(file_id))
        return self.register(file_id, filename, purpose)

    def register(self, file_id: str, filename: str, purpose: str) -> dict:
        """Record a file (an upload, or a batch's output that is still being written)."""
        meta = {"id": file_id, "filename": filename, "purpose": purpose, "created_at": int(time.time())}
        self.redis.hset(self.names.file(file_id), mapping=meta)
        return self.get(file_id)

    def get(self, file_id: str) -> dict | None:
        """OpenAI's file object, or None."""
        raw = self.redis.hgetall(self.names.file(file_id))
        if not raw:
            return None
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        path = self.path(file_id)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return {"id": meta["id"], "object": "file", "bytes": size, "created_at": int(meta["created_at"]),
                "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed",
                "status_details": None}


class BatchStore:
    """Each batch's OpenAI object as a Redis hash of JSON-encoded fields."""

    def __init__(self, r: redis.Redis, names: Names):
        self.redis, self.names = r, names

    def create(self, input_file_id: str, endpoint: str, window: str, metadata: dict | None) -> dict:
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + COMPLETION_WINDOW_S, "finalizing_at": None, "completed_at": None,
                 "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.names.batch(batch["id"]), mapping={k: json.dumps(v) for k, v in batch.items()})
        pipe.zadd(self.names.batches, {batch["id"]: now})
        pipe.sadd(self.names.active_batches, batch["id"])
        pipe.execute()
        return batch

    def get(self, batch_id: str) -> dict | None:
        raw = self.redis.hgetall(self.names.batch(batch_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} or None

    def update(self, batch_id: str, **fields) -> None:
        self.redis.hset(self.names.batch(batch_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    def transition(self, batch_id: str, allowed: tuple[str, ...], status: str, **fields) -> bool:
        """Set `status` (and `<status>_at`) only from one of `allowed`; False if the batch was elsewhere."""
        key = self.names.batch(batch_id)

        def change(pipe) -> bool:
            current = pipe.hget(key, "status")
            if current is None or json.loads(current) not in allowed:
                return False
            pipe.multi()
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in
                                    {"status": status, f"{status}_at": int(time.time()), **fields}.items()})
            if status in FINAL:
                pipe.srem(self.names.active_batches, batch_id)
            return True

        return self.redis.transaction(change, key, value_from_callable=True)

    def list(self, after: str | None, limit: int) -> list[dict]:
        """Newest first, starting after the batch `after`."""
        ids = [i.decode() for i in self.redis.zrevrange(self.names.batches, 0, -1)]
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        return [b for b in (self.get(i) for i in ids[:limit]) if b is not None]


class BatchManager:
    """Adopts active batches whose lease is free and runs each in a thread."""

    def __init__(self, config: GatewayConfig, names: Names):
        self.config, self.names = config, names
        self.redis = redis.Redis.from_url(config.redis_url)
        self.files = FileStore(config.files_dir, self.redis, names)
        self.batches = BatchStore(self.redis, names)
        self.owner = uuid.uuid4().hex
        self.running: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()
        self._adopter = threading.Thread(target=self._adopt_forever, name="pravaha-batch-adopter", daemon=True)

    def start(self) -> None:
        self._adopter.start()

    def stop(self) -> None:
        """Runs stop where they are and free their leases; another gateway resumes them."""
        self.stopping.set()
        for thread in list(self.running.values()):
            thread.join(timeout=10)
        self.redis.close()

    def poke(self) -> None:
        """Adopt at once (a batch was just created)."""
        self._adopt()

    def _adopt_forever(self) -> None:
        while not self.stopping.wait(min(1.0, self.config.batch_lease_s / 3)):
            try:
                self._adopt()
            except redis.RedisError as exc:
                log.warning("batch adoption: Redis unavailable (%s)", exc)

    def _adopt(self) -> None:
        for raw in self.redis.smembers(self.names.active_batches):
            batch_id = raw.decode()
            thread = self.running.get(batch_id)
            if thread is not None and thread.is_alive():
                continue
            if self.redis.set(self.names.batch_lease(batch_id), self.owner, nx=True,
                              px=int(self.config.batch_lease_s * 1000)):
                run = BatchRun(self, batch_id)
                thread = threading.Thread(target=run.run, name=f"pravaha-{batch_id}", daemon=True)
                self.running[batch_id] = thread
                thread.start()

    def keep_lease(self, batch_id: str) -> bool:
        """Extend our lease on the batch; False when another gateway holds it now."""
        return bool(self.redis.eval(KEEP_LEASE, 1, self.names.batch_lease(batch_id), self.owner,
                                    int(self.config.batch_lease_s * 1000)))

    def release(self, batch_id: str) -> None:
        self.redis.eval(RELEASE_LEASE, 1, self.names.batch_lease(batch_id), self.owner)


KEEP_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class BatchRun:
    """One batch from wherever it stands to a final state (or until the gateway stops)."""

    def __init__(self, manager: BatchManager, batch_id: str):
        self.m, self.batch_id = manager, batch_id
        self.store = manager.batches
        self.client = Client(manager.config.redis_url, stream=manager.config.stream, prefix=manager.config.prefix,
                             max_backlog=manager.config.max_backlog)
        self.pending: dict[str, object] = {}
        self.next_beat = self.last_poll = 0.0
        self.cancelling = False
        self.lost = False

    def run(self) -> None:
        try:
            batch = self.store.get(self.batch_id)
            if batch is None or batch["status"] in FINAL:
                self.m.redis.srem(self.m.names.active_batches, self.batch_id)
                return
            if batch["status"] == "validating":
                batch = self._validate(batch)
                if batch is None:
                    return
            self._process(batch)
        except Exception:  # noqa: BLE001 - logged; the lease lapses and a gateway resumes the batch
            log.exception("batch %s stopped; it resumes when a gateway adopts it again", self.batch_id)
        finally:
            self.client.close()
            self.m.release(self.batch_id)

    def _validate(self, batch: dict) -> dict | None:
        path = self.m.files.path(batch["input_file_id"])
        if not os.path.exists(path):
            error = {"code": "invalid_file", "message": f"input file {batch['input_file_id']} is gone",
                     "param": "input_file_id", "line": None}
            self.store.transition(self.batch_id, ("validating",), "failed", errors={"object": "list", "data": [error]})
            return None
        out_id, err_id = f"file-{uuid.uuid4().hex}", f"file-{uuid.uuid4().hex}"
        for file_id, suffix in ((out_id, "output"), (err_id, "error")):
            open(self.m.files.path(file_id), "ab").close()
            self.m.files.register(file_id, f"{self.batch_id}_{suffix}.jsonl", "batch_output")
        counts = {"total": count_lines(path), "completed": 0, "failed": 0}
        if not self.store.transition(self.batch_id, ("validating",), "in_progress", output_file_id=out_id,
                                     error_file_id=err_id, request_counts=counts):
            return None   # cancelled meanwhile
        return self.store.get(self.batch_id)

    def _process(self, batch: dict) -> None:
        self.total = total = batch["request_counts"]["total"]
        self.out = OutputFile(self.m.files.path(batch["output_file_id"]), total)
        self.err = OutputFile(self.m.files.path(batch["error_file_id"]), total)
        self.endpoint, self.created = batch["endpoint"], int(time.time())
        self.cancelling = batch["status"] == "cancelling"
        ids = CustomIds()
        try:
            with open(self.m.files.path(batch["input_file_id"]), "rb") as f:
                for line_no, raw in enumerate(f):
                    if self.cancelling or self.lost or self.m.stopping.is_set():
                        break
                    self._feed(ids, line_no, raw)
                    full = len(self.pending) >= self.m.config.batch_max_in_flight
                    if full or time.monotonic() - self.last_poll > 0.05:
                        self._collect(block=full)
            while self.pending and not self.lost and not self.m.stopping.is_set():
                self._collect(block=True)
        finally:
            ids.close()
            self.out.close()
            self.err.close()
        if not self.lost and not self.m.stopping.is_set():
            self._finish()

    def _finish(self) -> None:
        self._beat(force=True)
        if self.cancelling:
            self.store.transition(self.batch_id, ("cancelling",), "cancelled")
        elif self.store.transition(self.batch_id, ("in_progress",), "finalizing"):
            self.store.transition(self.batch_id, ("finalizing",), "completed")
        log.info("batch %s: %d completed, %d failed", self.batch_id, self.out.num_done, self.err.num_done)

    def _feed(self, ids: CustomIds, line_no: int, raw: bytes) -> None:
        try:
            req = parse_and_claim(raw, line_no, ids, self.endpoint)
        except LineError as err:
            self._write_error(line_no, err.custom_id, err.code, err.message)
            return
        if not self._done(line_no):
            self._submit(req)

    def _submit(self, req) -> None:
        rid = f"{self.batch_id}-{req.request_id}"
        if not self.client.redis.exists(self.client.names.result(rid)):
            while True:
                try:
                    self.client.submit(req.prompt, req.params, request_id=rid, messages=req.messages)
                    break
                except QueueFull:   # collect meanwhile, or wait for the workers to drain the queue
                    if self.pending:
                        self._collect(block=True)
                    else:
                        time.sleep(0.2)
        self.pending[rid] = req

    def _collect(self, block: bool) -> None:
        """Write the lines whose results have arrived; with block, wait until one has."""
        self.last_poll = time.monotonic()
        while self.pending:
            self._beat()
            rids = list(self.pending)
            results = self.client.redis.mget([self.client.names.result(r) for r in rids])
            done = [(rid, data) for rid, data in zip(rids, results) if data is not None]
            for rid, data in done:
                self._write_result(self.pending.pop(rid), decode(data, Result))
            if done or not block or self.lost or self.m.stopping.is_set():
                return
            time.sleep(0.02)

    def _write_result(self, req, result: Result) -> None:
        errors = [c for c in result.completions if c.finish_reason in ("error", "abort")]
        if errors:
            code = "generation_error" if errors[0].finish_reason == "error" else "cancelled"
            self._write_error(req.line_no, req.custom_id, code, errors[0].error or code)
            return
        body = response_body(req.url == CHAT, req.model, [result], self.created, req.params.get("logprobs"))
        if not self._done(req.line_no):
            self.out.write(req.line_no, output_line(req.line_no, req.custom_id, {
                "status_code": 200, "request_id": result.request_id, "body": body}, None))

    def _write_error(self, line_no: int, custom_id: str | None, code: str, message: str) -> None:
        if not self._done(line_no):
            self.err.write(line_no, output_line(line_no, custom_id, None, {"code": code, "message": message}))

    def _done(self, line_no: int) -> bool:
        return self.out.is_done(line_no) or self.err.is_done(line_no)

    def _beat(self, force: bool = False) -> None:
        """Every COUNTS_EVERY_S: publish counts, keep the lease, notice a cancel."""
        now = time.monotonic()
        if not force and now < self.next_beat:
            return
        self.next_beat = now + COUNTS_EVERY_S
        self.store.update(self.batch_id, request_counts={"total": self.total, "completed": self.out.num_done,
                                                         "failed": self.err.num_done})
        if not self.m.keep_lease(self.batch_id):
            log.warning("batch %s: another gateway holds its lease now; leaving it", self.batch_id)
            self.lost = True
        if not self.cancelling and self.store.get(self.batch_id)["status"] == "cancelling":
            self.cancelling = True
            for rid in self.pending:
                self.client.cancel(rid)

