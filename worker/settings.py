"""Worker configuration: one dataclass, filled from flags or PRAVAHA_* environment variables."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, fields

from producer.names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM


@dataclass
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: str = "dummy:llama-tiny"
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    consumer: str = ""                 # default: <hostname>-<pid>
    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int | None = None
    kv_cache_dtype: str = "auto"       # auto (the model's dtype) | float32 | bfloat16 | float16
    reclaim_idle_s: float = 60.0       # a pending entry idle this long belongs to a dead worker
    max_deliveries: int = 5            # past this many deliveries an entry is dead-lettered
    drain_timeout_s: float = 30.0      # SIGTERM: time to finish in-flight requests
    result_ttl_s: int = 24 * 3600      # how long results and event records stay
    block_ms: int = 1000               # longest blocking read while idle
    metrics_port: int = 9400           # /healthz, /readyz, /metrics; -1 turns the server off
    quantization: str | None = None    # int8 | gptq | awq (GPTQ/AWQ checkpoints are detected anyway)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantization in ("", "none"):
            self.quantization = None
        if not self.consumer:
            self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_deliveries", "result_ttl_s", "block_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("reclaim_idle_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field; each defaults to PRAVAHA_<FIELD> from the environment if set."""
    for f in fields(WorkerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "PRAVAHA_" + f.name.upper()
        kind = _kind(f)
        default = os.environ.get(env)
        parser.add_argument(flag, type=kind, default=kind(default) if default is not None else f.default,
                            help=f"(env {env}; default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(**{f.name: getattr(args, f.name) for f in fields(WorkerConfig)})


def _kind(f):
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str
