"""OpenAI request bodies in, OpenAI response objects out: one module for the HTTP gateway and
`pravaha bulk`, so both speak exactly the shapes OpenAI documents.

Completion logprobs: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
Chat logprobs: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pravaha_core.sampling_params import SamplingParams, structured_from_response_format

from .wire import Completion, Result, TokenEvent, Usage

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
CHAT_DEFAULT_MAX_TOKENS = 256
COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
# OpenAI body fields (and vLLM's extensions) that map straight onto SamplingParams.
PASSTHROUGH = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k",
               "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
               "skip_special_tokens", "include_stop_str_in_output", "structured_outputs")
IGNORED = ("model", "user", "stream", "stream_options")


class RequestError(ValueError):
    """A request OpenAI would refuse with 400: `param` names the field, `code` says why."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class ParsedRequest:
    """A validated body: one job per prompt (chat: one, with messages), the same params each."""

    chat: bool
    model: str
    params: dict
    prompts: list          # completions: str or token-id lists; chat: [None]
    messages: list[dict] | None
    stream: bool
    include_usage: bool


def parse_body(url: str, body: dict) -> ParsedRequest:
    """Validate an OpenAI completions or chat body; RequestError names the first bad field."""
    chat = url == CHAT
    allowed = set(PASSTHROUGH) | set(IGNORED) | {"max_tokens", "stop", "logprobs", "response_format"} | (
        {"messages", "max_completion_tokens", "top_logprobs"} if chat else {"prompt"})
    unknown = sorted(k for k in set(body) - allowed if body[k] is not None)
    if unknown:
        raise RequestError(f"body.{unknown[0]}: not supported", unknown[0], "unsupported_parameter")
    params = _params(body, chat)
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    if chat:
        prompts, messages = [None], _messages(body.get("messages"))
    else:
        prompts, messages = _prompts(body.get("prompt")), None
    stream = body.get("stream") is True
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise RequestError("body.stream_options: only include_usage is supported", "stream_options")
    return ParsedRequest(chat, model, params, prompts, messages, stream, bool(options.get("include_usage")))


def _params(body: dict, chat: bool) -> dict:
    params = {k: body[k] for k in PASSTHROUGH if body.get(k) is not None}
    if body.get("stop") is not None:
        params["stop"] = body["stop"]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    default = CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS
    params["max_tokens"] = max_tokens if max_tokens is not None else default
    if chat and body.get("logprobs"):
        params["logprobs"] = body.get("top_logprobs") or 0
    elif not chat and body.get("logprobs") is not None:
        params["logprobs"] = body["logprobs"]
    _response_format(body, params)
    try:
        SamplingParams.from_dict(dict(params))
    except (ValueError, TypeError) as exc:
        param = str(exc).split(":", 1)[0]
        if param.startswith("structured_outputs") and body.get("response_format") is not None:
            param = "response_format"   # the field the client sent
        raise RequestError(f"body: {exc}", param) from None
    return params


def _response_format(body: dict, params: dict) -> None:
    """OpenAI's response_format becomes vLLM's structured_outputs (what the Job carries)."""
    try:
        spec = structured_from_response_format(body.get("response_format"))
    except ValueError as exc:
        raise RequestError(f"body.{exc}", "response_format") from None
    if spec is not None:
        if params.get("structured_outputs") is not None:
            raise RequestError("body: give response_format or structured_outputs, not both", "response_format")
        params["structured_outputs"] = spec


def _prompts(prompt: object) -> list:
    """A string, a list of strings, a token-id list, or a list of token-id lists."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        prompts = [prompt]
    for p in prompts:
        ok_text = isinstance(p, str) and p
        ok_ids = isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not (ok_text or ok_ids):
            raise RequestError("body.prompt: must be a non-empty string, list of strings, list of token ids, "
                               "or list of token-id lists", "prompt")
    return prompts


def _messages(messages: object) -> list[dict]:
    """Messages with content-part lists ([{"type": "text", "text": ...}]) flattened to text."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise RequestError("body.messages: must be a non-empty list of {role, content} objects", "messages")
    return [dict(m, content=_text_content(m["content"])) for m in messages]


def _text_content(content: object) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError("body.messages: content must be a string or a list of text parts "
                       "({type: text, text}); other parts are not supported", "messages")


# ---- responses ---------------------------------------------------------------------------
def response_id(chat: bool, request_id: str) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"


def usage_dict(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def sum_usage(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def response_body(chat: bool, model: str, results: list[Result], created: int | None = None,
                  top_k: int | None = None) -> dict:
    """The `text_completion` / `chat.completion` object for finished requests (one per prompt;
    choice index = prompt index * n + sample). `top_k`: the logprobs alternatives asked for."""
    choices = []
    for i, result in enumerate(results):
        n = len(result.completions)
        for c in result.completions:
            choices.append(_choice(chat, i * n + c.index, c, top_k))
    return {"id": response_id(chat, results[0].request_id),
            "object": "chat.completion" if chat else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": choices,
            "usage": usage_dict(sum_usage([r.usage for r in results])),
            "system_fingerprint": None}


def _choice(chat: bool, index: int, c: Completion, top_k: int | None) -> dict:
    lp = logprobs(chat, c.token_ids, c.logprobs, c.logprob_texts, top_k, 0)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": lp, "finish_reason": c.finish_reason}
    return {"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}


def logprobs(chat: bool, token_ids: list[int], entries: list[dict[int, float]] | None,
             texts: dict[int, str] | None, top_k: int | None, text_offset: int) -> dict | None:
    """OpenAI's logprobs object for these tokens; None when none were asked for.
    `entries[i]`: the sampled token's logprob and the top-k alternatives (k or k+1 ids)."""
    if entries is None:
        return None
    texts = texts or {}
    k = top_k or 0
    tokens = [texts.get(t, "") for t in token_ids]
    tops = [sorted(e.items(), key=lambda kv: -kv[1])[:k] for e in entries]
    if chat:
        return {"content": [{**_token(tok, e.get(t)), "top_logprobs": [_token(texts.get(a, ""), v) for a, v in top]}
                            for t, tok, e, top in zip(token_ids, tokens, entries, tops)], "refusal": None}
    offsets, pos = [], text_offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": [e.get(t) for t, e in zip(token_ids, entries)],
            "top_logprobs": [{texts.get(a, ""): v for a, v in top} for top in tops], "text_offset": offsets}


def _token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}


# ---- streaming chunks --------------------------------------------------------------------
def stream_chunk(chat: bool, rid: str, model: str, created: int, index: int, event: TokenEvent,
                 first: bool, top_k: int | None, text_offset: int, include_usage: bool) -> dict:
    """One `chat.completion.chunk` / streamed `text_completion` object for one token event."""
    lp = logprobs(chat, event.token_ids, event.logprobs, event.logprob_texts, top_k, text_offset)
    if chat:
        delta = {"role": "assistant", "content": event.text} if first else (
            {"content": event.text} if event.text or not event.finished else {})
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": event.finish_reason}
    else:
        choice = {"index": index, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}
    return chunk(chat, rid, model, created, [choice], None, include_usage)


def chunk(chat: bool, rid: str, model: str, created: int, choices: list, usage: Usage | None,
          include_usage: bool) -> dict:
    out = {"id": response_id(chat, rid), "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if include_usage:   # null on every chunk but the last, as OpenAI sends it
        out["usage"] = None if usage is None else usage_dict(usage)
    return out


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
