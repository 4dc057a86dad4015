"""`pravaha demo`: producer, stream, worker and token channels on an embedded Redis."""

from __future__ import annotations

import asyncio
import time

from producer import AsyncClient

from .local import local_worker
from .settings import WorkerConfig

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "प्रवाह means flow, and", "Redis streams let workers"]


def run_demo(model: str, max_tokens: int, redis_url: str | None = None) -> int:
    config = WorkerConfig.from_settings(model=model, consumer="demo-worker", kv_cache_bytes=64 << 20,
                                        metrics_port=-1)
    with local_worker(config, redis_url) as (worker, where):
        print(f"Redis: {where}")
        print(f"worker: {model}, KV cache {worker.engine.kv_cache_info()['num_blocks']} blocks")
        if model.startswith("dummy:"):
            print(f"note: {model} has random weights, so its text is random tokens (often pieces of UTF-8 "
                  "characters, shown as \ufffd); the token ids are shown beside it. For real text pass "
                  "--model with a checkpoint directory or hub id.")
        summary = asyncio.run(_produce_and_stream(config.redis_url, max_tokens))
    print(summary)
    print("HTTP: `pravaha worker` and `pravaha serve --redis-url URL`, then the openai SDK at "
          "http://127.0.0.1:8000/v1 (README: HTTP gateway)")
    return 0


async def _produce_and_stream(url: str, max_tokens: int) -> str:
    client = AsyncClient(url)
    try:
        started = time.perf_counter()
        params = {"max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95}
        rids = [await client.submit(p, params, request_id=f"demo-{i}") for i, p in enumerate(PROMPTS)]
        print(f"submitted {len(rids)} jobs to the stream; streaming tokens from their channels:")
        counts = await asyncio.gather(*(_follow(client, rid) for rid in rids))
        elapsed = time.perf_counter() - started
        results = [await client.result(rid, timeout=60) for rid in rids]
        print("\n--- results ---")
        for prompt, result in zip(PROMPTS, results):
            print(f"{prompt!r} -> {result.text!r} ({result.finish_reason}; token ids {result.token_ids})")
        tokens = sum(counts)
        return (f"\n{len(rids)} requests, {tokens} tokens in {elapsed:.2f}s: {tokens / elapsed:.1f} tokens/s "
                f"(producer -> stream -> worker -> channels)")
    finally:
        await client.aclose()


async def _follow(client: AsyncClient, rid: str) -> int:
    num_tokens = 0
    async for event in client.stream(rid, timeout=120):
        num_tokens += len(event.token_ids)
        if event.text:
            print(f"[{rid}] +{event.text!r}")
        if event.finished:
            print(f"[{rid}] finished ({event.finish_reason}, {event.usage.completion_tokens} tokens)")
    return num_tokens
