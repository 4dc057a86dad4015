"""Counters the engine keeps; the worker exports them (no Prometheus dependency here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0       # prompt tokens computed (recomputation included)
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens reused from the prefix cache
    num_finished: int = 0
    step_time_s: float = 0.0         # total time inside step()

    def as_dict(self) -> dict:
        return asdict(self)
