"""Host-side time of an engine step: at a steady decode batch (default 256 sequences of
dummy:llama-tiny on the CPU), the time a step spends outside the model's forward (scheduling,
input preparation, sampling, output processing), per stage.

    python -m benchmarks.host [--batch 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

TARGET_MS = 1.5   # issue 21's CPU target for the host side of a steady decode step


def host_overhead(batch: int = 256, steps: int = 50, model: str = "dummy:llama-tiny") -> dict:
    from pravaha_core import Engine, SamplingParams

    engine = Engine(model, kv_cache_bytes=256 << 20, max_num_seqs=batch)
    params = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"h{i}", [5 + i % 50, 6, 7, 8], params)
    for _ in range(3):                             # prefill, then steady decode
        engine.step()
    spent: Counter = Counter()
    _time(spent, engine.runner.model, "forward", "forward")
    _time(spent, engine.runner.model, "compute_logits", "forward")
    _time(spent, engine.scheduler, "schedule", "schedule")
    _time(spent, engine.scheduler, "update", "update")
    _time(spent, engine.runner, "_prepare", "prepare")
    _time(spent, engine.runner.sampling_rows, "batch", "sampling inputs")
    _time(spent, engine, "_absorb", "output processing")
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = (time.perf_counter() - started) / steps
    per_step = {k: v / steps * 1e3 for k, v in spent.items()}
    return {"batch": batch, "steps": steps, "step_ms": total * 1e3, "forward_ms": per_step.pop("forward"),
            "outside_forward_ms": total * 1e3 - spent["forward"] / steps * 1e3, "stages_ms": per_step}


def _time(spent: Counter, owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="dummy:llama-tiny")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = host_overhead(args.batch, args.steps, args.model)
    print(f"host side at a decode batch of {result['batch']}: {result['outside_forward_ms']:.2f} ms of a "
          f"{result['step_ms']:.2f} ms step outside the forward ("
          + ", ".join(f"{k} {v:.2f}" for k, v in result["stages_ms"].items()) + ")")
    verdict = "PASS" if result["outside_forward_ms"] <= TARGET_MS else "FAIL"
    print(f"target: at most {TARGET_MS} ms outside the forward at a decode batch of 256: {verdict}")
    print(json.dumps(dict(result, target_ms=TARGET_MS, passed=verdict == "PASS")))
    return result


if __name__ == "__main__":
    main()
