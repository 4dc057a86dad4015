"""Structured-output step cost: decode step time at a batch with half the rows constrained by a
moderate JSON schema, against the same batch unconstrained; and what a cached schema costs.

    python benchmarks/structured.py [--model dummy:llama-tiny] [--batch 64] [--steps 16]

Target: constrained / free step time <= 1.15, and no compile time for a cached schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pravaha_core import Engine, SamplingParams

SCHEMA = {   # moderate: nested object, bounded array, enums, bounded integers, short strings, anyOf
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {"type": "object",
                    "properties": {"zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
                                   "kind": {"enum": ["home", "work"]}},
                    "required": ["zip", "kind"]},
        "contact": {"anyOf": [{"type": "integer"}, {"type": "boolean"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "address", "contact"],
}
WARMUP_STEPS = 3   # prefill, then decode steps before timing


def decode_step_times(engine: Engine, batch: int, steps: int, spec: dict | None) -> list[float]:
    """Seconds per decode step over `steps` steps, every other row constrained by `spec`."""
    ids = [f"b{time.monotonic_ns()}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        constrained = spec if spec is not None and i % 2 == 0 else None
        engine.add_request(rid, f"Record {i}: ", SamplingParams(
            max_tokens=WARMUP_STEPS + steps + 8, ignore_eos=True, seed=i, structured_outputs=constrained))
    for _ in range(WARMUP_STEPS):
        engine.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    assert engine.scheduler.num_preemptions == 0 and len(engine.scheduler.running) == batch, \
        "rows finished or were preempted while timed: raise kv_cache_bytes or lower steps"
    for rid in ids:
        engine.abort(rid)
    engine.step()   # report the aborts
    return times


def bench_structured(model: str = "dummy:llama-tiny", batch: int = 64, steps: int = 16, rounds: int = 3,
                     kv_cache_bytes: int = 1 << 28) -> dict:
    """Decode step (ms, the best of `rounds` interleaved medians) free vs half constrained and
    their ratio; the masking work alone per step; the compile cost of a new schema against a
    cached one (s)."""
    engine = Engine(model, kv_cache_bytes=kv_cache_bytes, max_num_seqs=batch)
    stats = engine.structured.stats
    decode_step_times(engine, batch, 2, None)                       # warm-up (kernels, allocator)
    decode_step_times(engine, batch, 2, {"json": SCHEMA})           # compiles the schema
    first_compile_s, compiled = stats.compile_time_s, stats.num_compiled
    free, constrained = [], []
    for _ in range(rounds):
        free.append(statistics.median(decode_step_times(engine, batch, steps, None)))
        constrained.append(statistics.median(decode_step_times(engine, batch, steps, {"json": SCHEMA})))
    return {"model": model, "batch": batch, "steps": steps, "rounds": rounds,
            "free_step_ms": round(min(free) * 1e3, 3), "constrained_step_ms": round(min(constrained) * 1e3, 3),
            "ratio": round(min(constrained) / min(free), 3),
            "mask_ms": round(mask_time(engine, batch, steps) * 1e3, 3),
            "first_compile_s": round(first_compile_s, 4),
            "cached_compile_s": round(stats.compile_time_s - first_compile_s, 4),
            "cached_compiles": stats.num_compiled - compiled, "cache_hits": stats.num_cache_hits}


def mask_time(engine: Engine, batch: int, steps: int) -> float:
    """Median seconds of the per-step structured work alone: fill the bitmask of the constrained
    half of a decoding batch, then apply it to [batch, V] logits."""
    import torch

    from pravaha_core.sampler import apply_token_bitmask_

    ids = [f"m{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, f"Record {i}: ", SamplingParams(
            max_tokens=steps + 8, ignore_eos=True, seed=i, structured_outputs={"json": SCHEMA} if i % 2 == 0 else None))
    times = []
    for _ in range(steps):
        engine.step()
        seqs = list(engine.scheduler.running)
        logits = torch.randn(len(seqs), engine.vocab_size, device=engine.runner.device)
        started = time.perf_counter()
        mask, rows = engine.structured.bitmask(seqs)
        apply_token_bitmask_(logits, mask.to(logits.device), rows)
        logits.sum().item()   # waits for the device
        times.append(time.perf_counter() - started)
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(bench_structured(args.model, args.batch, args.steps)))


if __name__ == "__main__":
    main()
