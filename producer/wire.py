"""Wire messages: versioned msgspec Structs encoded as msgpack. No pickle anywhere."""

from __future__ import annotations

import math
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class Job(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One request on the stream (field `job` of the stream entry)."""

    v: int = SCHEMA_VERSION
    request_id: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None   # chat: rendered with the model's chat template
    params: dict[str, Any] = {}
    priority: int = 0
    deadline: float | None = None      # absolute UNIX time; past it the job is not started
    created_at: float


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenEvent(msgspec.Struct, kw_only=True):
    """What is new in one engine step for one sample of a request.

    index counts this sample's events from 0 (for de-duplication); offset is the position of
    token_ids[0] in the completion. The last event of a sample has finished=True, its
    finish_reason, and usage.
    """

    v: int = SCHEMA_VERSION
    request_id: str
    sample: int = 0
    num_samples: int = 1
    index: int
    offset: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None
    logprobs: list[dict[int, float]] | None = None   # per token: top-k alternatives + the sampled id
    logprob_texts: dict[int, str] | None = None      # each id in logprobs -> its text (for OpenAI's shapes)


class Completion(msgspec.Struct, kw_only=True):
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None
    logprob_texts: dict[int, str] | None = None


class Result(msgspec.Struct, kw_only=True):
    """The final result of a request (all samples); top-level fields read sample 0."""

    v: int = SCHEMA_VERSION
    request_id: str
    completions: list[Completion]
    usage: Usage
    worker: str = ""
    finished_at: float = 0.0

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.completions[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.completions[0].error


_encoder = msgspec.msgpack.Encoder()
_decoders = {cls: msgspec.msgpack.Decoder(cls) for cls in (Job, TokenEvent, Result)}


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, cls: type[msgspec.Struct]):
    """Decode `data` as `cls`; raises ValueError with msgspec's message on bad input."""
    try:
        msg = _decoders[cls].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        hint = ""
        if data[:1] in (b"{", b"["):
            hint = " (this looks like JSON; expected a msgpack-encoded map, see producer/wire.py)"
        elif not data:
            hint = " (empty; expected a msgpack-encoded map in the stream entry's `job` field)"
        raise ValueError(f"invalid {cls.__name__}: {exc}{hint}") from exc
    if msg.v != SCHEMA_VERSION:
        raise ValueError(f"invalid {cls.__name__}: schema version {msg.v} (this build speaks {SCHEMA_VERSION})")
    if cls is Job and not all(math.isfinite(t) for t in (msg.created_at, msg.deadline or 0.0)):
        raise ValueError("invalid Job: created_at and deadline must be finite UNIX times")
    return msg


def peek_request_id(data: bytes) -> str | None:
    """The request_id of an undecodable job, when its bytes still hold a readable one."""
    try:
        raw = msgspec.msgpack.decode(data)
    except Exception:  # noqa: BLE001 - garbage in, None out
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and rid and "{" not in rid and "}" not in rid else None
