"""The `pravaha` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import time


def engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dummy:llama-tiny",
                        help="checkpoint directory, HF hub id, or dummy:<preset> (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])


def build_engine(args: argparse.Namespace):
    from pravaha_core import Engine

    return Engine(model=args.model, dtype=args.dtype, device=args.device,
                  kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, load_format=args.load_format)


DEMO_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
                "प्रवाह means flow, and", "Redis streams let workers"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Several prompts through the continuous-batching loop, streamed as they are generated."""
    from pravaha_core import SamplingParams

    engine = build_engine(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95)
    print(f"model {args.model}: KV cache {engine.kv_cache_info()['num_blocks']} blocks")
    started = time.perf_counter()
    for i, prompt in enumerate(DEMO_PROMPTS):
        engine.add_request(f"demo-{i}", prompt, params)
    texts = {f"demo-{i}": "" for i in range(len(DEMO_PROMPTS))}
    num_tokens = 0
    while engine.has_unfinished():
        for delta in engine.step():
            num_tokens += len(delta.token_ids)
            texts[delta.request_id] += delta.text
            if delta.text:
                print(f"[{delta.request_id}] +{delta.text!r}")
            if delta.finished:
                print(f"[{delta.request_id}] finished ({delta.finish_reason})")
    elapsed = time.perf_counter() - started
    print("\n--- results ---")
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"{prompt!r} -> {texts[f'demo-{i}']!r}")
    print(f"\n{len(DEMO_PROMPTS)} requests, {num_tokens} tokens in {elapsed:.2f}s: "
          f"{num_tokens / elapsed:.1f} tokens/s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one prompt's completion to stdout."""
    from pravaha_core import SamplingParams

    engine = build_engine(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for delta in engine.stream(args.prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        if delta.finished:
            sys.stdout.write("\n")
            if delta.error:
                print(f"error: {delta.error}", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pravaha", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short streamed generation on an embedded default")
    engine_args(demo)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo)
    gen = sub.add_parser("generate", help="generate one completion and stream it to stdout")
    gen.add_argument("prompt")
    engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"pravaha: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
