"""SamplingParams: vLLM's field names and defaults, validated on construction."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any

from .fields import check_known, reject_unknown_keywords

MAX_LOGPROBS = 20   # as vLLM's default max_logprobs


@reject_unknown_keywords
@dataclass
class SamplingParams:
    """How to sample one request.

    n: completions per prompt (they share the prompt's KV blocks).
    temperature: 0 means greedy. top_k: 0 or -1 means off. top_p in (0, 1]. min_p in [0, 1].
    repetition_penalty (> 0, 1 = off) applies to prompt and output tokens;
    presence_penalty and frequency_penalty (in [-2, 2]) to output tokens.
    seed: makes the request's samples reproducible, alone or in any batch.
    stop: strings that end generation (excluded from the text unless
    include_stop_str_in_output); stop_token_ids: token ids that do (kept in token_ids).
    min_tokens: EOS, stop tokens and stop strings are ignored until this many tokens exist.
    logprobs: k -> per generated token, the sampled token's logprob and the top-k alternatives.
    structured_outputs: constrain the output (vLLM's names), exactly one of {"json": schema},
    {"json_object": True}, {"regex": str}, {"choice": [str, ...]}, {"grammar": EBNF str}.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_tokens ({self.max_tokens})")
        _check_range("temperature", self.temperature, 0, None)
        _check_int("top_k", self.top_k, minimum=-1)
        _check_range("top_p", self.top_p, 0, 1, open_low=True)
        _check_range("min_p", self.min_p, 0, 1)
        _check_range("repetition_penalty", self.repetition_penalty, 0, None, open_low=True)
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(1 << 63))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids: must be a list of ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids", tok, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs: at most {MAX_LOGPROBS}, got {self.logprobs}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        if self.structured_outputs is not None:
            from . import structured

            self.structured_outputs = structured.validate(self.structured_outputs)
            if self.min_tokens:   # it would suppress the EOS a finished grammar allows alone
                raise ValueError("min_tokens: not supported with structured_outputs (the grammar decides the end)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a plain dict (e.g. off the wire); unknown fields raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling params: expected a mapping, got {type(data).__name__}")
        if "response_format" in data:   # OpenAI's field, as bulk lines and jobs may carry it
            data = dict(data)
            fmt = structured_from_response_format(data.pop("response_format"))
            if fmt is not None:
                if data.get("structured_outputs") is not None:
                    raise ValueError("response_format: give it or structured_outputs, not both")
                data["structured_outputs"] = fmt
        check_known(cls, data, "sampling parameter")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def structured_from_response_format(fmt: object) -> dict[str, Any] | None:
    """OpenAI's `response_format` as a `structured_outputs` spec (None for type "text")."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise ValueError("response_format.json_schema: expected {\"name\": ..., \"schema\": {...}}")
        return {"json": inner["schema"]}
    raise ValueError(f"response_format: type must be json_schema, json_object or text, got {kind!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_range(name: str, value: object, low: float, high: float | None, open_low: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name}: must be in {bounds}, got {value}")
