"""Gateway bench, loopback only: what `pravaha serve` adds to time to first token, and how many
concurrent streaming clients one gateway process holds without losing or reordering a token.

It starts its own redis-server (free port), a `pravaha worker` on dummy:llama-tiny and a
`pravaha serve`, all on 127.0.0.1, and stops them at the end.

    python benchmarks/gateway.py                      # 100 TTFT pairs, 200 concurrent streams
    python benchmarks/gateway.py --clients 1000 --ttft-requests 200

1. TTFT: requests one at a time, alternating Redis SDK (submit + stream) and gateway (HTTP
   POST, stream: true, time to the first `data:` chunk), each on its own prompt of one length.
2. Concurrency: N clients open SSE streams at once (raw asyncio sockets, so the client's own
   overhead stays small). Each stream must carry every token: text offsets contiguous from 0,
   `max_tokens` tokens, and the text equal to the result the worker stored in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from producer import Client  # noqa: E402
from worker.embedded import EmbeddedRedis, free_port  # noqa: E402


def start(args: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(0.1)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


# ---- 1. TTFT -----------------------------------------------------------------------------
def ttft_sdk(client: Client, prompt: str, params: dict) -> float:
    started = time.perf_counter()
    rid = client.submit(prompt, params)
    first = None
    for event in client.stream(rid, timeout=60):
        if first is None and event.token_ids:
            first = time.perf_counter() - started
    return first


def ttft_gateway(conn: http.client.HTTPConnection, prompt: str, params: dict) -> float:
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": prompt, "stream": True, **params}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    for line in iter(resp.readline, b""):
        if first is None and line.startswith(b"data: {"):
            first = time.perf_counter() - started
        if line.startswith(b"data: [DONE]"):
            break
    resp.read()
    return first


def bench_ttft(redis_url: str, gateway_port: int, count: int) -> dict:
    params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    client = Client(redis_url)
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=60)
    sdk, gw = [], []
    for i in range(-5, count):   # 5 warm-up pairs, not counted
        a = ttft_sdk(client, f"sdk prompt {i:05d}", params)
        b = ttft_gateway(conn, f"gw! prompt {i:05d}", params)
        if i >= 0:
            sdk.append(a)
            gw.append(b)
    client.close()
    conn.close()
    ms = lambda xs, q: 1000 * statistics.quantiles(xs, n=10)[q] if q < 9 else 1000 * max(xs)  # noqa: E731
    return {"requests": count, "sdk_median_ms": round(1000 * statistics.median(sdk), 2),
            "gateway_median_ms": round(1000 * statistics.median(gw), 2),
            "added_median_ms": round(1000 * (statistics.median(gw) - statistics.median(sdk)), 2),
            "sdk_p90_ms": round(ms(sdk, 8), 2), "gateway_p90_ms": round(ms(gw, 8), 2)}


# ---- 2. concurrent streams ---------------------------------------------------------------
async def one_stream(port: int, i: int, max_tokens: int) -> dict:
    body = json.dumps({"model": "m", "prompt": f"stream {i}", "max_tokens": max_tokens, "temperature": 0.8,
                       "ignore_eos": True, "logprobs": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    raw = await reader.read()   # Connection: close: the body ends with the stream
    writer.close()
    events = [json.loads(e[6:]) for e in dechunk(raw).split(b"\n\n") if e.startswith(b"data: {")]
    return check_stream(events, max_tokens)


def dechunk(raw: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end], 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def check_stream(events: list[dict], max_tokens: int) -> dict:
    """Text offsets contiguous from 0 (nothing lost or reordered); max_tokens tokens in all."""
    text, tokens, offset = "", 0, 0
    for e in events[:-1]:
        (choice,) = e["choices"]
        lp = choice["logprobs"]
        for token, at in zip(lp["tokens"], lp["text_offset"]):
            if at != offset:
                raise AssertionError(f"{e['id']}: a token lost or reordered at offset {offset} (got {at})")
            offset += len(token)
        text += choice["text"]
        tokens += len(lp["tokens"])
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == tokens == max_tokens, (usage, tokens)
    return {"id": events[0]["id"].removeprefix("cmpl-"), "text": text, "tokens": tokens}


async def bench_streams(port: int, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    got = await asyncio.gather(*(one_stream(port, i, max_tokens) for i in range(clients)))
    return got, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="pravaha-gw-bench-")
    with EmbeddedRedis() as url:
        port = free_port()
        worker = start(["worker", "--redis-url", url, "--model", "dummy:llama-tiny", "--metrics-port", "-1",
                        "--kv-cache-bytes", str(256 << 20), "--max-num-seqs", "256"], f"{tmp}/worker.log")
        gateway = start(["serve", "--redis-url", url, "--port", str(port), "--files-dir", f"{tmp}/files"],
                        f"{tmp}/gateway.log")
        try:
            wait_for(lambda: "serving" in open(f"{tmp}/worker.log").read(), 180, "worker")
            wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 60, "gateway")
            report = {"ttft": bench_ttft(url, port, args.ttft_requests)}
            streams, elapsed = asyncio.run(asyncio.wait_for(bench_streams(port, args.clients, args.max_tokens),
                                                            args.timeout))
            client = Client(url)
            for s in streams:   # the streamed text is the stored result's, token for token
                result = client.result(s["id"], timeout=30)
                assert s["text"] == result.text and s["tokens"] == len(result.token_ids), s["id"]
            client.close()
            report["streams"] = {"clients": args.clients, "max_tokens": args.max_tokens, "all_tokens_in_order": True,
                                 "tokens": sum(s["tokens"] for s in streams), "seconds": round(elapsed, 2),
                                 "tokens_per_s": round(sum(s["tokens"] for s in streams) / elapsed, 1)}
        finally:
            for proc in (gateway, worker):
                proc.kill()
                proc.wait()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttft-requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300, help="bound on the concurrency phase (seconds)")
    report = run(parser.parse_args())
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
