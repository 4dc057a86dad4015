"""Batched next-token sampling: greedy, temperature, top-k and top-p, per-row values."""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: str, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """logits: [N, V] -> next token ids [N]."""
        logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_ids
        dev = logits.device
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        probs = _truncated_probs(logits / temps[:, None], top_k, top_p)
        sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        is_greedy = torch.tensor([p.greedy for p in params], device=dev)
        return torch.where(is_greedy, greedy_ids, sampled)


def _truncated_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Softmax over the top-k tokens whose cumulative probability stays within top-p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)            # [N, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs               # keep the first token always
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
