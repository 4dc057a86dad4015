"""Speculative decoding parts: config, n-gram proposer, verification rules, acceptance stats.
Torch-free at import (the scheduler and the config use it).

Engine-free building blocks. Verification takes the target's per-position distributions
over the k+1 rows a speculating sequence contributes ([k+1, V]: one row per draft token and
one bonus row) and returns the tokens to keep. Random draws come in as uniforms, so a caller
can feed the batch-invariant counter-hash draws of sampling_rows and stay deterministic.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .fields import reject_unknown_keywords

if TYPE_CHECKING:
    import torch

METHODS = ("ngram", "draft_model")


@reject_unknown_keywords
@dataclass
class SpeculativeConfig:
    """vLLM's names for speculation settings.

    method: ngram (prompt lookup in the request's own tokens) or draft_model.
    num_speculative_tokens: k, the tokens proposed per verification step.
    prompt_lookup_min: ngram: shortest suffix n-gram searched for.
    prompt_lookup_max: ngram: longest suffix n-gram searched for (tried first).
    model: draft_model: checkpoint directory, hub id or dummy:<preset>, same tokenizer.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name}: must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min {self.prompt_lookup_min} > "
                             f"prompt_lookup_max {self.prompt_lookup_max}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model: draft_model needs a draft checkpoint")


def parse_speculative_config(value: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A SpeculativeConfig from a dict, a JSON string (the worker flag / env form) or None."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config: must be an object, got {type(value).__name__}")
    return SpeculativeConfig(**value)


def check_draft_vocab(target_vocab_size: int, draft_vocab_size: int) -> None:
    """ValueError when a draft model cannot share the target's token ids."""
    if target_vocab_size != draft_vocab_size:
        raise ValueError(f"speculative_config.model: draft vocabulary {draft_vocab_size} != "
                         f"target vocabulary {target_vocab_size} (same tokenizer needed)")


def ngram_propose(token_ids: list[int], k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest suffix n-gram
    (lookup_max down to lookup_min) of `token_ids` (prompt + output). [] when none matches."""
    num = len(token_ids)
    for n in range(min(lookup_max, num - 1), lookup_min - 1, -1):
        suffix = token_ids[num - n:]
        # Latest match first: recent text predicts the continuation best.
        for start in range(num - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + k]
    return []


def verify_greedy(draft_ids: list[int], target_argmax: list[int]) -> list[int]:
    """Greedy verification: keep draft tokens while they equal the target's argmax, then the
    target's own token at the first mismatch (or the bonus token after all k). len(target_argmax)
    == len(draft_ids) + 1; returns 1..k+1 tokens, exactly what plain greedy decoding emits."""
    assert len(target_argmax) == len(draft_ids) + 1
    kept = []
    for draft, target in zip(draft_ids, target_argmax):
        kept.append(target)
        if draft != target:
            return kept
    kept.append(target_argmax[-1])
    return kept


def verify_sampled(draft_ids: list[int], target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                   accept_u: torch.Tensor, resample_u: torch.Tensor) -> list[int]:
    """Rejection sampling (Leviathan et al.): accept draft token x_i with probability
    min(1, p_i(x)/q_i(x)); at the first rejection draw from normalized max(0, p_i - q_i); after
    k acceptances draw the bonus token from p_k. The kept tokens are distributed exactly as
    the target's. target_probs [k+1, V]; draft_probs [k, V], None for one-hot q (n-gram);
    accept_u [k] and resample_u [k+1] are uniforms in [0, 1)."""
    k = len(draft_ids)
    assert target_probs.shape[0] == k + 1
    kept = []
    for i, token in enumerate(draft_ids):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if float(accept_u[i]) * q_token < float(p[token]):
            kept.append(token)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        kept.append(_inverse_cdf(residual, float(resample_u[i])))
        return kept
    kept.append(_inverse_cdf(target_probs[k], float(resample_u[k])))
    return kept


def _inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose cumulative share of `weights` [V] first exceeds u (weights unnormalized)."""
    import torch   # lazily: the config and proposer parts stay torch-free for the scheduler

    cdf = torch.cumsum(weights.double(), 0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    return min(index, weights.shape[0] - 1)


@dataclass
class AcceptanceStats:
    """Counters for the metrics and the per-sequence acceptance policy.

    A sequence stops speculating once its mean acceptance over its last `window` steps falls
    under `min_rate` (the proposals cost a wider forward that buys nothing)."""

    window: int = 8
    min_rate: float = 0.2
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    recent: dict[str, deque] = field(default_factory=dict)

    def record(self, seq_id: str, num_draft: int, num_accepted: int) -> None:
        assert 0 <= num_accepted <= num_draft
        self.num_steps += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if num_draft:
            self.recent.setdefault(seq_id, deque(maxlen=self.window)).append(num_accepted / num_draft)

    def should_speculate(self, seq_id: str) -> bool:
        rates = self.recent.get(seq_id)
        if rates is None or len(rates) < rates.maxlen:
            return True
        return sum(rates) / len(rates) >= self.min_rate

    def forget(self, seq_id: str) -> None:
        self.recent.pop(seq_id, None)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step: accepted drafts plus the target's own token."""
        return (self.num_accepted_tokens + self.num_steps) / self.num_steps if self.num_steps else 0.0


def is_plain_greedy(params) -> bool:
    """Speculation's scope: greedy rows whose token is the raw argmax, one at a time judged only
    by token ids. Stop strings, logprobs, penalties, grammars and n > 1 (greedy n=2 with
    chunked prefill diverged; not yet understood) keep the one-token path."""
    return (params.n == 1 and params.temperature == 0 and not params.stop and params.logprobs is None
            and params.structured_outputs is None and params.repetition_penalty == 1
            and params.presence_penalty == 0 and params.frequency_penalty == 0)


class NgramSpeculator:
    """Proposes drafts for the scheduler and keeps the acceptance counters. Torch-free."""

    def __init__(self, config: SpeculativeConfig):
        if config.method != "ngram":
            raise ValueError(f"speculative_config.method: {config.method!r} is not supported by the engine yet "
                             "(only ngram)")
        self.config = config
        self.stats = AcceptanceStats()

    def propose(self, seq, limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens for `seq` (a decode row), or [] when it should not speculate."""
        params = seq.params
        if limit < 1 or not is_plain_greedy(params) or seq.num_output_tokens < params.min_tokens:
            return []
        if not self.stats.should_speculate(seq.seq_id):
            return []
        c = self.config
        return ngram_propose(seq.token_ids, min(c.num_speculative_tokens, limit),
                             c.prompt_lookup_min, c.prompt_lookup_max)
