"""A private Redis and one in-process worker: what `pravaha demo` and `pravaha bulk` (without
--redis-url) run against, so a laptop needs no Redis deployment."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .embedded import EmbeddedRedis
from .service import Worker
from .settings import WorkerConfig


@contextmanager
def local_worker(config: WorkerConfig, redis_url: str | None = None) -> Iterator[tuple[Worker, str]]:
    """Serve `config` from a worker thread for the block's lifetime; yields (worker, where),
    `where` describing its Redis. Without `redis_url` an embedded Redis is started (and
    stopped afterwards) and `config.redis_url` points at it."""
    embedded = None if redis_url else EmbeddedRedis()
    config.redis_url = redis_url or embedded.start()
    try:
        worker = Worker(config)
        thread = threading.Thread(target=worker.run, name="pravaha-worker", daemon=True)
        thread.start()
        try:
            yield worker, (f"embedded {embedded.kind} at {config.redis_url}" if embedded else config.redis_url)
        finally:
            worker.stop()
            thread.join(timeout=60)
    finally:
        if embedded:
            embedded.stop()

