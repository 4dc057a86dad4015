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
    num_grammars_compiled: int = 0   # structured outputs: grammars compiled (cache misses)
    num_grammar_cache_hits: int = 0
    grammar_compile_time_s: float = 0.0   # on the compile thread, off the step loop
    num_spec_steps: int = 0          # speculative verifications (one per speculating row and step)
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)
