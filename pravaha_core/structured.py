"""Structured outputs: constrain decoding to a JSON schema, a regex, a choice or an EBNF grammar.

The grammar engine is xgrammar. Specs are validated (cheap: the spec becomes an xgrammar
`Grammar`, no tokenizer involved) when SamplingParams is built, compiled against the
tokenizer on a background thread with a cache by spec, and followed by one `GrammarMatcher`
per sequence. Each step the runner asks for a token bitmask of the constrained rows only;
the sampler applies it on the device in one batched op.

A matcher has accepted exactly the sequence's output tokens (it catches up from
`output_token_ids` before each use), so recompute preemption, an engine `output_prefix` and
the samples of an n > 1 request need no rollback: recompute re-feeds tokens to the model,
not to the matcher.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
CACHE_SIZE = 256   # compiled grammars kept (a compiled JSON schema is tens of KB)


def validate(spec: object) -> dict[str, Any]:
    """Check a `structured_outputs` spec (vLLM's names, exactly one kind); returns it
    normalized (a JSON schema given as a string is parsed). Raises ValueError naming the problem."""
    if not isinstance(spec, dict):
        raise ValueError(f"structured_outputs: expected a mapping, got {type(spec).__name__}")
    kinds = [k for k in spec if spec[k] is not None and spec[k] is not False]
    unknown = sorted(set(spec) - set(KINDS))
    if unknown:
        raise ValueError(f"structured_outputs.{unknown[0]}: unknown (known: {', '.join(KINDS)})")
    if len(kinds) != 1:
        raise ValueError(f"structured_outputs: give exactly one of {', '.join(KINDS)}, got {kinds or 'none'}")
    kind, value = kinds[0], spec[kinds[0]]
    value = _normalize(kind, value)
    _grammar(key({kind: value}))
    return {kind: value}


def _normalize(kind: str, value: object) -> object:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json: not valid JSON: {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError("structured_outputs.json: a JSON schema must be an object")
    elif kind == "json_object":
        if value is not True:
            raise ValueError(f"structured_outputs.json_object: must be true, got {value!r}")
    elif kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("structured_outputs.choice: must be a non-empty list of non-empty strings")
        value = list(value)
    elif not isinstance(value, str) or not value:
        raise ValueError(f"structured_outputs.{kind}: must be a non-empty string")
    return value


def key(spec: dict[str, Any]) -> str:
    """A canonical string for a validated spec: the cache key."""
    return json.dumps(spec, separators=(",", ":"))   # property order shapes the output


@functools.lru_cache(maxsize=CACHE_SIZE)
def _grammar(spec_key: str):
    """The xgrammar Grammar of a spec (no tokenizer); ValueError for what xgrammar refuses."""
    import xgrammar as xgr

    (kind, value), = json.loads(spec_key).items()
    try:
        if kind == "json":
            # Compact separators, no free whitespace: a weak model otherwise pads forever.
            grammar = xgr.Grammar.from_json_schema(json.dumps(value), any_whitespace=False, strict_mode=True)
            return _strict_strings(grammar)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        return xgr.Grammar.from_ebnf(value)
    except RuntimeError as exc:
        raise ValueError(f"structured_outputs.{kind}: {_clean(str(exc))}") from None


# xgrammar 0.2 lets a string with maxLength/minLength hold raw control characters (invalid
# JSON); such strings get the character class its unbounded strings use.
_LOOSE_CHARS, _STRICT_CHARS = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'


def _strict_strings(grammar):
    import xgrammar as xgr

    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _STRICT_CHARS)) if _LOOSE_CHARS in text else grammar


def _clean(message: str) -> str:
    """xgrammar's C++ errors start with a timestamp and a source location."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip()).strip()


def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's view of our tokenizer. The byte tokenizer's ids past the byte range (and its
    specials) get no text, so constrained output is made of real bytes."""
    import xgrammar as xgr

    stop = sorted(tokenizer.eos_token_ids)
    hf = getattr(tokenizer, "_tok", None)
    if hf is not None:
        return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=stop)
    vocab = [bytes([i]) for i in range(256)] + [b""] * (vocab_size - 256)
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop)


@dataclass
class StructuredStats:
    num_compiled: int = 0
    num_cache_hits: int = 0
    compile_time_s: float = 0.0


class StructuredOutputs:
    """Compiled grammars (cached by spec, compiled on one background thread) and one matcher
    per constrained sequence. Used by the engine (submit, advance, release) and the runner
    (bitmask)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stats = StructuredStats()
        self._compiler = None
        self._lock = threading.Lock()
        self._cache: dict[str, Future] = {}          # spec key -> Future[CompiledGrammar], LRU order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._matchers: dict[int, list] = {}         # seq_id -> [matcher, output tokens accepted]
        self._grammars: dict[str, Any] = {}          # request_id -> CompiledGrammar

    def submit(self, spec: dict[str, Any]) -> Future:
        """The compiled grammar of `spec` (validated), from the cache or compiled off-thread."""
        k = key(spec)
        future = self._cache.pop(k, None)
        if future is not None:
            self.stats.num_cache_hits += 1
        else:
            future = self._pool.submit(self._compile, k)
            while len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
        self._cache[k] = future
        return future

    def _compile(self, spec_key: str):
        import xgrammar as xgr

        started = time.perf_counter()
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab_size),
                                                     max_threads=1, cache_enabled=False)
        compiled = self._compiler.compile_grammar(_grammar(spec_key))
        self.stats.num_compiled += 1
        self.stats.compile_time_s += time.perf_counter() - started
        return compiled

    def bind(self, request_id: str, compiled) -> None:
        """Attach a compiled grammar to a request; its samples get matchers on first use."""
        self._grammars[request_id] = compiled

    def bitmask(self, seqs: list) -> tuple[Any, list[int]] | None:
        """(the int32 token bitmask [len(seqs), ceil(V/32)] on the host, filled for the
        constrained rows only, the others all ones; those rows), or None when no row is constrained."""
        import xgrammar as xgr

        rows = [i for i, s in enumerate(seqs) if s.request_id in self._grammars]
        if not rows:
            return None
        mask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        for i in rows:
            matcher = self._matcher(seqs[i])
            if matcher is not None:   # a refused token (a bad output_prefix): `advance` ends it
                matcher.fill_next_token_bitmask(mask, i)
        return mask, rows

    @property
    def has_bound(self) -> bool:
        """Whether any request in flight is constrained (else nothing to advance)."""
        return bool(self._grammars)

    def advance(self, seq) -> str | None:
        """Feed the matcher `seq`'s new output tokens; "stop" when the grammar has ended,
        "error" when a token breaks it, else None."""
        if seq.request_id not in self._grammars:
            return None
        matcher = self._matcher(seq)
        if matcher is None:
            return "error"
        return "stop" if matcher.is_terminated() else None

    def _matcher(self, seq):
        """The sequence's matcher, caught up with its output tokens (None once one was refused)."""
        entry = self._matchers.get(seq.seq_id)
        if entry is None:
            import xgrammar as xgr

            entry = self._matchers[seq.seq_id] = [xgr.GrammarMatcher(self._grammars[seq.request_id]), 0]
        matcher, done = entry
        if done < seq.num_output_tokens:
            for tok in seq.token_ids[seq.num_prompt_tokens + done:]:
                if matcher is None or not matcher.accept_token(tok):
                    matcher = None
            entry[0], entry[1] = matcher, seq.num_output_tokens
        return matcher

    def release(self, request_id: str, seq_ids: list[int]) -> None:
        """Drop a finished request's grammar and matchers."""
        self._grammars.pop(request_id, None)
        for sid in seq_ids:
            self._matchers.pop(sid, None)
