"""The gateway's one config object, filled from `pravaha serve` flags or PRAVAHA_* variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ..client import DEFAULT_MAX_BACKLOG
from ..names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM


@dataclass
class GatewayConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()      # empty: no auth
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    max_backlog: int = DEFAULT_MAX_BACKLOG
    request_timeout_s: float = 600.0    # past it: 504 (or an error event mid-stream) and the job is cancelled
    retry_after_s: int = 1              # the Retry-After of a 429 (queue full)
    files_dir: str = "pravaha-files"    # uploaded and produced files; share it between gateways
    batch_max_in_flight: int = 64       # outstanding requests per running batch
    batch_lease_s: float = 30.0         # a batch whose gateway died is adopted after this long

    def __post_init__(self) -> None:
        self.api_keys = tuple(k for k in self.api_keys if k)
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        for name in ("max_backlog", "batch_max_in_flight", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "batch_lease_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """`pravaha serve` flags; each defaults to its PRAVAHA_* environment variable when set."""
    env = os.environ.get
    parser.add_argument("--redis-url", default=env("PRAVAHA_REDIS_URL", GatewayConfig.redis_url))
    parser.add_argument("--host", default=env("PRAVAHA_HOST", GatewayConfig.host))
    parser.add_argument("--port", type=int, default=int(env("PRAVAHA_PORT", GatewayConfig.port)))
    parser.add_argument("--api-key", action="append", default=[],
                        help="accept this Bearer key (repeatable; env PRAVAHA_API_KEYS, comma-separated); "
                             "none: no auth")
    parser.add_argument("--stream", default=env("PRAVAHA_STREAM", DEFAULT_STREAM))
    parser.add_argument("--prefix", default=env("PRAVAHA_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--max-backlog", type=int, default=int(env("PRAVAHA_MAX_BACKLOG", DEFAULT_MAX_BACKLOG)),
                        help="past this many queued jobs: 429")
    parser.add_argument("--request-timeout", type=float,
                        default=float(env("PRAVAHA_REQUEST_TIMEOUT_S", GatewayConfig.request_timeout_s)))
    parser.add_argument("--files-dir", default=env("PRAVAHA_FILES_DIR", GatewayConfig.files_dir),
                        help="where Files API files live (a shared volume for several gateways)")
    parser.add_argument("--batch-max-in-flight", type=int,
                        default=int(env("PRAVAHA_BATCH_MAX_IN_FLIGHT", GatewayConfig.batch_max_in_flight)))
    parser.add_argument("--batch-lease", type=float,
                        default=float(env("PRAVAHA_BATCH_LEASE_S", GatewayConfig.batch_lease_s)),
                        help="seconds after a gateway dies before another adopts its batches")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    keys = list(args.api_key) + os.environ.get("PRAVAHA_API_KEYS", "").split(",")
    return GatewayConfig(redis_url=args.redis_url, host=args.host, port=args.port, api_keys=tuple(keys),
                         stream=args.stream, prefix=args.prefix, max_backlog=args.max_backlog,
                         request_timeout_s=args.request_timeout, files_dir=args.files_dir,
                         batch_max_in_flight=args.batch_max_in_flight, batch_lease_s=args.batch_lease)
