"""Batched next-token sampling with per-row parameters.

Pipeline for logits [N, V]: penalties -> (greedy rows: argmax) -> temperature -> top-k ->
top-p -> min-p -> inverse-CDF draw. Each row's draw uses one uniform number from a counter
hash of (the row's seed key, its output position), so a seeded request gets the same tokens
alone or inside any batch, on any device. Logprobs come from the raw logits (before any
processing), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, built by the runner. Shapes: [N] unless said; the per-row
    parameters are None when every row is greedy (argmax needs none of them)."""

    temperature: torch.Tensor | None   # float; 0 marks greedy rows
    top_k: torch.Tensor | None         # long; V when off
    top_p: torch.Tensor | None         # float
    min_p: torch.Tensor | None         # float
    seed_keys: torch.Tensor | None     # long, < 2**32
    positions: torch.Tensor | None     # long: output index of the token being drawn
    all_greedy: bool
    needs_truncation: bool             # any row with top-k / top-p / min-p
    penalties: PenaltyInputs | None = None
    suppress: torch.Tensor | None = None      # [K, 2] (row, token) pairs forced to -inf
    max_logprobs: int | None = None           # largest k among rows asking for logprobs
    bitmask: torch.Tensor | None = None       # [N, ceil(V/32)] int32 allowed tokens (-1: a free row)
    bitmask_rows: list[int] | None = None     # the constrained rows, the only ones masked


@dataclass
class PenaltyInputs:
    repetition: torch.Tensor           # [N] float (1 = off)
    presence: torch.Tensor             # [N] float
    frequency: torch.Tensor            # [N] float
    prompt_ids: torch.Tensor           # [N, P] long, padded with V (a dummy column)
    output_ids: torch.Tensor           # [N, O] long, padded with V


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None   # per row: top-k alternatives plus the sampled id


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix in int64 arithmetic (multipliers < 2**31, so nothing overflows)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & M32
    return x ^ (x >> 16)


def uniforms(seed_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row from (seed key, position); [N] float64."""
    h = hash32(seed_keys ^ hash32(positions + 0x632BE5AB))
    h = hash32(h + 0x1B873593)
    return ((h >> 8).double() + 0.5) / float(1 << 24)


def apply_penalties(logits: torch.Tensor, pen: PenaltyInputs) -> torch.Tensor:
    """Repetition (prompt and output tokens, HF/CTRL rule), presence and frequency (output
    tokens, OpenAI rule). logits [N, V] float32, modified and returned."""
    n, v = logits.shape
    out_counts = torch.zeros(n, v + 1, device=logits.device)
    out_counts.scatter_add_(1, pen.output_ids, torch.ones_like(pen.output_ids, dtype=torch.float32))
    out_counts = out_counts[:, :v]
    seen = torch.zeros(n, v + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, pen.prompt_ids, True)
    seen = seen[:, :v] | (out_counts > 0)
    rep = pen.repetition[:, None].expand(n, v)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - pen.frequency[:, None] * out_counts
    return logits - pen.presence[:, None] * (out_counts > 0).float()


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place, one kernel over the batch: -inf in `rows` of logits [N, V] float32 where the
    row's bit is 0 (bit j of word w is token 32w + j); bitmask [N, ceil(V/32)] int32 on the
    logits' device. xgrammar's kernel (C++ on CPU, Triton on CUDA): 3x faster on CPU than
    unpacking the bits with torch ops (64 x 49152 logits)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def truncated_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """Unnormalized probabilities after top-k, top-p and min-p; [N, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)             # [N, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                              # the first always stays
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [N, V] raw model output -> one token per row (and logprobs where asked)."""
    raw = logits.float()
    logits = raw
    if batch.bitmask is not None:
        if batch.max_logprobs is not None:   # logprobs come from the unmasked logits
            logits = raw.clone()
        apply_token_bitmask_(logits, batch.bitmask, batch.bitmask_rows)
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.suppress is not None:
        logits = logits.index_put((batch.suppress[:, 0], batch.suppress[:, 1]),
                                  torch.tensor(float("-inf"), device=logits.device))
    # max(dim).indices: the same first-maximum rule as argmax (NaN counts as the maximum), and
    # 3x faster on CPU (64 x 49152 logits: 0.74 vs 2.25 ms on 2 threads).
    tokens = logits.max(dim=-1).indices
    if not batch.all_greedy:
        temps = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        scaled = logits / temps[:, None]
        if batch.needs_truncation:
            probs = truncated_probs(scaled, batch.top_k, batch.top_p, batch.min_p)
        else:
            probs = scaled.softmax(dim=-1)
        cdf = probs.double().cumsum(dim=-1)                                  # [N, V]
        target = uniforms(batch.seed_keys, batch.positions) * cdf[:, -1]
        drawn = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
        drawn = drawn.clamp_(max=logits.shape[-1] - 1)
        tokens = torch.where(batch.temperature > 0, drawn, tokens)
    return SamplerOutput(tokens.tolist(), _logprobs(raw, tokens, batch.max_logprobs))


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int | None) -> list[dict[int, float]] | None:
    if k is None:
        return None
    logp = raw.log_softmax(dim=-1)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    rows = []
    for ids, vals, tok, lp in zip(top_ids.tolist(), top_vals.tolist(), tokens.tolist(), chosen.tolist()):
        entry = dict(zip(ids, vals))
        entry[tok] = lp
        rows.append(entry)
    return rows
