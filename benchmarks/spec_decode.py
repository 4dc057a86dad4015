"""N-gram speculation vs none, side by side in one run: tokens/s and identical greedy output.

    python -m benchmarks.spec_decode [--model dummy:llama-135m] [--max-tokens 256] [--batch 1]
"""

from __future__ import annotations

import argparse
import random
import time

from pravaha_core import Engine, SamplingParams


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    """Prompts with repeated spans (a span copied a few times, as extraction/rewrite inputs do)."""
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        span = [rng.randrange(100, 500) for _ in range(24)]
        out.append([rng.randrange(100, 500) for _ in range(16)] + span * 3 + span[:6])
    return out


def run(engine: Engine, batch: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    outs = engine.generate(batch, params)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-135m")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    batch = prompts(args.batch)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    engines = {"off": Engine(args.model), "ngram": Engine(args.model, speculative_config=spec)}
    for engine in engines.values():   # warm-up (kernel builds, first-touch)
        engine.generate(batch[:1], SamplingParams(max_tokens=8, temperature=0.0))
    results = {name: run(engine, batch, params) for name, engine in engines.items()}
    num_tokens = sum(map(len, results["off"][0]))
    for name, (_, seconds) in results.items():
        print(f"{name:6s} {num_tokens / seconds:8.1f} tok/s  ({seconds:.2f} s)")
    stats = engines["ngram"].stats
    accepted = stats.num_spec_accepted_tokens / max(1, stats.num_spec_draft_tokens)
    mean_len = (stats.num_spec_accepted_tokens + stats.num_spec_steps) / max(1, stats.num_spec_steps)
    print(f"speedup {results['off'][1] / results['ngram'][1]:.2f}x  identical {results['off'][0] == results['ngram'][0]}  "
          f"acceptance {accepted:.2f}  mean acceptance length {mean_len:.2f}")


if __name__ == "__main__":
    main()
