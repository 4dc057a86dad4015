"""Worker configuration: one dataclass holding the engine's, filled from flags or PRAVAHA_* variables.

Flags and variables are generated from the fields of `WorkerConfig` and `EngineConfig`: a field
`max_num_seqs` is the flag `--max-num-seqs` and the variable `PRAVAHA_MAX_NUM_SEQS`, with the
help text of its entry in the class docstring. A new field needs nothing more.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields

from pravaha_core.config import EngineConfig
from pravaha_core.fields import field_help
from producer.names import DEFAULT_GROUP, DEFAULT_PREFIX, DEFAULT_STREAM

ENV_PREFIX = "PRAVAHA_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass
class WorkerConfig:
    """The worker's settings; the engine's are in `engine`.

    redis_url: the Redis holding the request stream.
    stream: the request stream.
    group: the consumer group the workers share.
    prefix: prefix of every per-request key and channel.
    consumer: this worker's name in the group; empty: <hostname>-<pid>.
    reclaim_idle_s: a pending entry idle this long belongs to a dead worker and is taken over.
    max_deliveries: past this many deliveries an entry is dead-lettered.
    drain_timeout_s: on SIGTERM, time to finish in-flight requests.
    result_ttl_s: how long results and event records stay in Redis.
    block_ms: longest blocking read while idle.
    metrics_port: port of /healthz, /readyz, /drain and /metrics; -1 turns the server off.
    drain_token: bearer token POST /drain requires (set PRAVAHA_DRAIN_TOKEN: a flag shows in ps);
      empty: only loopback clients may drain.
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX
    consumer: str = ""
    reclaim_idle_s: float = 60.0
    max_deliveries: int = 5
    drain_timeout_s: float = 30.0
    result_ttl_s: int = 24 * 3600
    block_ms: int = 1000
    metrics_port: int = 9400
    drain_token: str = field(default="", repr=False)   # a secret: kept out of reprs and --help

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine: expected an EngineConfig, got {type(self.engine).__name__}")
        if not self.consumer:
            self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        for name in ("max_deliveries", "result_ttl_s", "block_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("reclaim_idle_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, **settings) -> WorkerConfig:
        """Build from flat settings, worker and engine names mixed (as the flags are):
        `WorkerConfig.from_settings(redis_url=..., model=..., kv_cache_bytes=...)`."""
        unknown = sorted(set(settings) - _ENGINE_FIELDS - _WORKER_FIELDS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown worker or engine setting "
                             f"(known: {', '.join(sorted(_WORKER_FIELDS | _ENGINE_FIELDS))})")
        engine = {k: v for k, v in settings.items() if k in _ENGINE_FIELDS}
        worker = {k: v for k, v in settings.items() if k not in _ENGINE_FIELDS}
        return cls(engine=EngineConfig.from_dict(engine), **worker)


def _worker_fields() -> list[Field]:
    return [f for f in fields(WorkerConfig) if f.name != "engine"]


_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}
_WORKER_FIELDS = {f.name for f in _worker_fields()}
assert not _ENGINE_FIELDS & _WORKER_FIELDS, "a setting may not be both a worker's and the engine's"


def add_worker_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """One flag per worker and engine field; each defaults to PRAVAHA_<FIELD> from `environ`
    (the entry point passes os.environ: nothing below it reads the environment)."""
    add_config_flags(parser.add_argument_group("worker"), WorkerConfig, _worker_fields(), environ)
    add_config_flags(parser.add_argument_group("engine"), EngineConfig, fields(EngineConfig), environ)


def setting_names() -> list[str]:
    """Every worker and engine setting: the names of the flags and, upper-cased, of PRAVAHA_*."""
    return [f.name for f in _worker_fields()] + [f.name for f in fields(EngineConfig)]


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig.from_settings(**{name: getattr(args, name) for name in setting_names()})


def add_config_flags(parser, cls: type, selected: list[Field], environ: Mapping[str, str] | None) -> None:
    """Flags `--field-name` for the `selected` fields of dataclass `cls`, help from its docstring.
    With `environ`, PRAVAHA_FIELD_NAME there replaces the field's default."""
    hints, docs = typing.get_type_hints(cls), field_help(cls)
    for f in selected:
        parse = value_parser(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()
        env = ENV_PREFIX + f.name.upper()
        if environ is not None and env in environ:
            default = from_env(env, environ[env], parse)
        where = f"env {env}; " if environ is not None else ""
        shown = "<set>" if f.name.endswith("token") and default else default   # secrets stay off screen
        help_text = f"{docs.get(f.name, '').rstrip('.')} ({where}default: {shown})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=parse, default=default, help=help_text,
                                metavar=f.name.upper())


def from_env(name: str, raw: str, parse) -> object:
    try:
        return parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


def value_parser(hint):
    """str -> value for a field annotated `hint` (int, float, bool, str, or one of them | None;
    "none" or "" give None where None is allowed)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint

    def parse(text: str):
        if optional and text.strip().lower() in ("", "none"):
            return None
        if base is bool:
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")
            return text.strip().lower() in _TRUE
        if base is dict:
            value = json.loads(text)   # JSONDecodeError is a ValueError
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return base(text)

    parse.__name__ = getattr(base, "__name__", "value")   # argparse names the type in its errors
    return parse
