"""Per-sequence sampling parameters kept in persistent tensors: written once when a sequence
first samples, read each step by one index, so a step builds no per-row parameter tensors
from Python lists (and, on a GPU, copies them to the device only when rows are added)."""

from __future__ import annotations

import torch

from .sampler import PenaltyInputs, SamplingBatch
from .sequence import Sequence


class SamplingRows:
    """Row r holds temperature, top_k, top_p, min_p and seed key of one live sequence. Rows of
    finished sequences are reused; the table grows when every row is taken."""

    def __init__(self, device: torch.device, vocab: int, capacity: int = 256):
        self.device, self.vocab = device, vocab
        self.rows: dict[int, tuple[int, Sequence]] = {}       # seq_id -> (row, seq)
        self.free: list[int] = []
        self.host = {name: torch.zeros(0, dtype=dtype) for name, dtype in self.FIELDS}
        self.dev: dict[str, torch.Tensor] = {}
        self.dirty = False
        self._grow(capacity)

    FIELDS = (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32),
              ("min_p", torch.float32), ("seed_keys", torch.int64))

    def batch(self, seqs: list[Sequence], eos_token_ids: list[int]) -> SamplingBatch:
        """The step's SamplingBatch for `seqs` (one row each, in order)."""
        params = [s.params for s in seqs]
        all_greedy = all(p.greedy for p in params)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        suppress = _suppressed(seqs, eos_token_ids, self.vocab, self.device)
        penalties = self._penalties(seqs) if any(p.penalizes for p in params) else None
        batch = SamplingBatch(None, None, None, None, None, None, all_greedy, False, penalties, suppress,
                              max(asked) if asked else None)
        if all_greedy:                      # argmax needs no per-row parameters
            return batch
        index = torch.tensor([self._row(s) for s in seqs], device=self.device)
        if self.dirty:
            self.dev = {name: t.to(self.device, non_blocking=True) for name, t in self.host.items()}
            self.dirty = False
        batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seed_keys = (
            self.dev[name][index] for name, _ in self.FIELDS)
        batch.positions = torch.tensor([s.num_output_tokens for s in seqs], device=self.device)
        batch.needs_truncation = any(p.truncates and not p.greedy for p in params)
        return batch

    def _row(self, seq: Sequence) -> int:
        entry = self.rows.get(seq.seq_id)
        if entry is not None:
            return entry[0]
        if not self.free:
            self._reclaim()
        row = self.free.pop()
        p = seq.params
        values = (p.temperature, p.top_k if p.top_k > 0 else self.vocab, p.top_p, p.min_p, seq.seed_key)
        for (name, _), value in zip(self.FIELDS, values):
            self.host[name][row] = value
        self.rows[seq.seq_id] = (row, seq)
        self.dirty = True
        return row

    def _reclaim(self) -> None:
        """Free the rows of finished sequences; grow the table if none were."""
        done = [sid for sid, (_, seq) in self.rows.items() if seq.is_finished]
        for sid in done:
            self.free.append(self.rows.pop(sid)[0])
        if not self.free:
            self._grow(2 * len(self.host["temperature"]))

    def _grow(self, capacity: int) -> None:
        old = len(self.host["temperature"])
        for name, dtype in self.FIELDS:
            grown = torch.zeros(capacity, dtype=dtype)
            grown[:old] = self.host[name]
            self.host[name] = grown.pin_memory() if self.device.type == "cuda" else grown
        self.free.extend(range(capacity - 1, old - 1, -1))
        self.dirty = True

    def _penalties(self, seqs: list[Sequence]) -> PenaltyInputs:
        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(map(len, lists)))
            return torch.tensor([ids + [self.vocab] * (width - len(ids)) for ids in lists], device=self.device)

        params = [s.params for s in seqs]
        return PenaltyInputs(
            repetition=torch.tensor([p.repetition_penalty for p in params], device=self.device),
            presence=torch.tensor([p.presence_penalty for p in params], device=self.device),
            frequency=torch.tensor([p.frequency_penalty for p in params], device=self.device),
            prompt_ids=padded([s.prompt_token_ids for s in seqs]),
            output_ids=padded([s.output_token_ids for s in seqs]))


def _suppressed(seqs: list[Sequence], eos_token_ids: list[int], vocab: int,
                device: torch.device) -> torch.Tensor | None:
    """[K, 2] (row, token) pairs that would end generation before min_tokens."""
    pairs = [(row, tok) for row, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
             for tok in s.params.stop_token_ids + ([] if s.params.ignore_eos else eos_token_ids) if tok < vocab]
    return torch.tensor(pairs, device=device) if pairs else None
