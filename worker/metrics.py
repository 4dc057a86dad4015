"""Prometheus metrics (names prefixed `pravaha_`) and the /healthz, /readyz, /metrics server."""

from __future__ import annotations

import errno
import hmac
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LIVENESS_S = 120.0   # the loop must come round at least this often to count as alive

log = logging.getLogger("pravaha.worker")


class MetricsPortInUse(RuntimeError):
    """The metrics port is taken (another worker on this host?)."""


class WorkerMetrics:
    """One registry per worker (tests run several in one process)."""

    def __init__(self, worker):
        self.registry = r = CollectorRegistry()
        self.received = Counter("pravaha_requests_received", "Jobs read from the stream", registry=r)
        self.finished = Counter("pravaha_requests_finished", "Requests finished, by finish reason",
                                ["reason"], registry=r)
        self.failed = Counter("pravaha_requests_failed", "Entries dead-lettered or rejected, by reason",
                              ["reason"], registry=r)
        self.prompt_tokens = Counter("pravaha_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("pravaha_generation_tokens", "Tokens generated", registry=r)
        self.preemptions = Counter("pravaha_preemptions", "Sequences preempted (recomputed)", registry=r)
        self.ttft = Histogram("pravaha_time_to_first_token_seconds", "Job creation to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pravaha_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=STEP_BUCKETS, registry=r)
        self.e2e = Histogram("pravaha_e2e_request_latency_seconds", "Job creation to final result",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("pravaha_step_seconds", "Engine step time", buckets=STEP_BUCKETS, registry=r)
        self.lag = Gauge("pravaha_consumer_group_lag", "Entries not yet delivered to the group", registry=r)
        self.pending = Gauge("pravaha_consumer_group_pending", "Entries delivered but not acked", registry=r)
        r.register(_EngineCollector(worker))


class _EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        engine = self.worker.engine
        info = engine.kv_cache_info()
        yield GaugeMetricFamily("pravaha_running_sequences", "Sequences running", len(engine.scheduler.running))
        yield GaugeMetricFamily("pravaha_waiting_sequences", "Sequences waiting", len(engine.scheduler.waiting))
        yield GaugeMetricFamily("pravaha_kv_blocks_used", "KV-cache blocks in use", info["blocks_used"])
        yield GaugeMetricFamily("pravaha_kv_blocks_total", "KV-cache blocks", info["num_blocks"])
        model = engine.model_info()
        yield GaugeMetricFamily("pravaha_model_weight_bytes", "Bytes of model weights (quantized or not)",
                                model["weight_bytes"])
        layers = GaugeMetricFamily("pravaha_quantized_linear_layers",
                                   "Quantized linear layers by kernel path (int4pack_mm, int8pack_mm, dequant)",
                                   labels=["quantization", "kernel"])
        for kernel, count in model["kernels"].items():
            layers.add_metric([model["quantization"] or "none", kernel], count)
        yield layers
        grammars = engine.structured.stats   # structured outputs, read live off the compile thread
        yield CounterMetricFamily("pravaha_grammar_compiles", "Grammars compiled (cache misses)", grammars.num_compiled)
        yield CounterMetricFamily("pravaha_grammar_cache_hits", "Structured-output requests served by a cached grammar",
                                  grammars.num_cache_hits)
        yield CounterMetricFamily("pravaha_grammar_compile_seconds", "Time compiling grammars (off the step loop)",
                                  grammars.compile_time_s)
        stats = engine.stats   # speculative decoding (zero when it is off)
        yield CounterMetricFamily("pravaha_spec_decode_draft_tokens", "Draft tokens proposed",
                                  stats.num_spec_draft_tokens)
        yield CounterMetricFamily("pravaha_spec_decode_accepted_tokens", "Draft tokens accepted",
                                  stats.num_spec_accepted_tokens)
        yield GaugeMetricFamily("pravaha_spec_decode_mean_acceptance_length",
                                "Tokens emitted per speculative verification (accepted drafts + 1)",
                                1 + stats.num_spec_accepted_tokens / max(1, stats.num_spec_steps))


class HealthServer:
    """/healthz: the loop is alive. /readyz: model loaded, Redis reachable, not draining.
    /metrics: Prometheus text format. POST /drain: start draining (the pod's preStop hook); it needs
    `Authorization: Bearer <drain_token>`, or with no token a loopback client."""

    def __init__(self, worker, port: int, host: str = "0.0.0.0", drain_token: str = ""):
        self.worker = worker
        self.drain_token = drain_token
        handler = type("Handler", (_Handler,), {"health": self})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise MetricsPortInUse(f"metrics port {port} is in use (another worker on this host?); "
                                   "--metrics-port 0 takes a free port, -1 serves none") from None
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="pravaha-health", daemon=True)

    def start(self) -> HealthServer:
        log.info("metrics, health and drain on port %d", self.port)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread.is_alive():   # shutdown() waits forever on a server that never started
            self.server.shutdown()
        self.server.server_close()

    def alive(self) -> bool:
        return time.monotonic() - self.worker.last_loop_at < LIVENESS_S

    def may_drain(self, client_host: str, authorization: str | None) -> bool:
        if self.drain_token:
            return hmac.compare_digest((authorization or "").encode(), f"Bearer {self.drain_token}".encode())
        return client_host in ("127.0.0.1", "::1", "::ffff:127.0.0.1")

    def ready(self) -> tuple[bool, str]:
        if self.worker.stopping:
            return False, "draining"
        if not self.worker.ready:
            return False, "redis unreachable"
        return True, "ready"


class _Handler(BaseHTTPRequestHandler):
    health: HealthServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok = self.health.alive()
            self._send(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
        elif path == "/readyz":
            ok, why = self.health.ready()
            self._send(200 if ok else 503, why.encode() + b"\n")
        elif path == "/drain":
            self._send(405, b"use POST\n", allow="POST")
        elif path == "/metrics":
            self._send(200, generate_latest(self.health.worker.metrics.registry),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, b"not found\n")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/drain":
            self._send(405, b"only /drain takes POST\n", allow="GET")
        elif not self.health.may_drain(self.client_address[0], self.headers.get("Authorization")):
            self._send(403, b"forbidden\n")
        else:   # the pod's preStop hook: stop reading now, SIGTERM follows
            self.health.worker.stop()
            self._send(200, b"draining\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", allow: str = "") -> None:
        self.send_response(code)
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:   # probes every few seconds: keep logs quiet
        pass
