"""The gateway's Prometheus metrics and its ASGI middleware (API keys, per-request metrics)."""

from __future__ import annotations

import hmac
import time

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..openai_api import error_body

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OPEN_PATHS = ("/health", "/metrics")   # reachable without an API key (probes, scrapers)


class GatewayMetrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pravaha_gateway_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.errors = Counter("pravaha_gateway_errors", "HTTP 4xx and 5xx responses", ["class"], registry=r)
        self.latency = Histogram("pravaha_gateway_request_seconds", "Request start to last byte sent (streams too)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("pravaha_gateway_time_to_first_token_seconds", "Request start to first token event",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.open_streams = Gauge("pravaha_gateway_open_streams", "Server-sent event streams open now", registry=r)
        self.cancelled = Counter("pravaha_gateway_cancelled", "Requests cancelled, by reason (disconnect, timeout)",
                                 ["reason"], registry=r)
        self.queue_full = Counter("pravaha_gateway_queue_full", "Submissions refused with 429", registry=r)


class GatewayMiddleware:
    """Checks Bearer keys on /v1/* (401 in OpenAI's error shape) and records every request."""

    def __init__(self, app, api_keys: tuple[str, ...], metrics: GatewayMetrics):
        self.app, self.api_keys, self.metrics = app, tuple(k.encode() for k in api_keys), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_recording)
            else:
                await _send_json(send_recording, 401, error_body(
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
        finally:
            self._observe(scope, status[0], time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        if not self.api_keys or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(key.strip(), k) for k in self.api_keys)

    def _observe(self, scope, code: int, seconds: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(name, str(code)).inc()
        self.metrics.latency.labels(name).observe(seconds)
        if code >= 400:
            self.metrics.errors.labels(f"{code // 100}xx").inc()


async def _send_json(send, status: int, body: dict) -> None:
    data = msgspec.json.encode(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
