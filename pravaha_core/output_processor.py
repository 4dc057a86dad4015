"""Per-completion text: incremental detokenization, stop strings, deltas that add up exactly."""

from __future__ import annotations

from .outputs import CompletionOutput
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer


class CompletionStream:
    """Follows one sequence; `delta()` returns what is new since the last call.

    Text that could still turn out to be the start of a stop string is held back, so the
    streamed deltas always concatenate to the final text.
    """

    def __init__(self, seq: Sequence, tokenizer: Tokenizer):
        self.seq = seq
        # Output the sequence starts with (an engine output_prefix) is context, not news.
        self.detok = IncrementalDetokenizer(tokenizer, seq.token_ids, seq.params.skip_special_tokens)
        self.text = ""                 # the completion's new text so far (cut at a stop string)
        self.num_decoded = seq.num_output_tokens   # output tokens fed to the detokenizer
        self.num_sent_chars = 0
        self.num_sent_tokens = seq.num_output_tokens
        self.pending_logprobs: list[dict[int, float]] = []
        self.stopped_by_string = False

    def absorb(self) -> bool:
        """Decode the sequence's new tokens; True when a stop string ended it."""
        seq, params = self.seq, self.seq.params
        if self.stopped_by_string:
            return False
        new_ids = seq.token_ids[seq.num_prompt_tokens + self.num_decoded:]   # no copy of the whole output
        self.num_decoded += len(new_ids)
        before = len(self.text)
        if new_ids:
            self.text += self.detok.add(new_ids)
        if seq.is_finished:
            self.text += self.detok.flush()
        if not params.stop:
            return False
        if seq.num_output_tokens >= params.min_tokens:
            longest = max(map(len, params.stop))
            window_start = max(0, before - longest + 1)
            hit = _find_stop(self.text, params.stop, window_start)
            if hit is not None:
                pos, stop = hit
                self.text = self.text[: pos + (len(stop) if params.include_stop_str_in_output else 0)]
                self.stopped_by_string = True
                return True
        return False

    def delta(self) -> CompletionOutput:
        seq = self.seq
        done = seq.is_finished or self.stopped_by_string
        end = len(self.text) if done else len(self.text) - self._held_back()
        text = self.text[self.num_sent_chars:end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        token_ids = seq.token_ids[seq.num_prompt_tokens + self.num_sent_tokens:]
        self.num_sent_tokens += len(token_ids)
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        return CompletionOutput(seq.index, token_ids, text, seq.finish_reason, seq.error,
                                logprobs if seq.params.logprobs is not None else None)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        stops = self.seq.params.stop
        if not stops:
            return 0
        for k in range(min(len(self.text), max(map(len, stops)) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in stops):
                return k
        return 0


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (position, stop)."""
    best = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best
