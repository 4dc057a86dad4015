"""The `pravaha` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

import redis


# Modules that only `pip install "pravaha[worker]"` brings; the base install is the client.
WORKER_EXTRA = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "prometheus_client",
                "fakeredis", "ninja")


def engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (no environment: only `pravaha worker` reads PRAVAHA_*).
    Its seed is left out: `--seed` here is the request's (sampling_args)."""
    from pravaha_core.config import EngineConfig

    from .settings import add_config_flags

    add_config_flags(parser, EngineConfig, _generate_engine_fields(), environ=None)


def _generate_engine_fields():
    from pravaha_core.config import EngineConfig

    return [f for f in fields(EngineConfig) if f.name != "seed"]


def sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_dict(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop}


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one prompt's completion to stdout, in this process (no Redis)."""
    from pravaha_core import Engine, SamplingParams

    engine = Engine(**{f.name: getattr(args, f.name) for f in _generate_engine_fields()})
    return print_stream(engine.stream(args.prompt, SamplingParams(**sampling_dict(args))))[0]


def print_stream(parts) -> tuple[int, object]:
    """Write streamed text to stdout as it comes (anything with .text, .finished, .error).
    Returns (1 if the last part reports an error else 0, the last part)."""
    part = None
    for part in parts:
        sys.stdout.write(part.text)
        sys.stdout.flush()
        if part.finished:
            sys.stdout.write("\n")
            if part.error:
                print(f"error: {part.error}", file=sys.stderr)
                return 1, part
    return 0, part


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.model, args.max_tokens, args.redis_url)


def cmd_worker(args: argparse.Namespace) -> int:
    from .metrics import MetricsPortInUse
    from .service import Worker
    from .settings import config_from_args

    try:
        worker = Worker(config_from_args(args))
    except MetricsPortInUse as exc:
        print(f"pravaha worker: {exc}", file=sys.stderr)
        return 2
    worker.install_signal_handlers()
    worker.run()
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit one prompt to the stream; stream its text to stdout and then its request id,
    finish reason and token counts to stderr (or, with --json, print the result as JSON)."""
    import msgspec

    from producer import Client

    client = Client(args.redis_url, stream=args.stream)
    rid = client.submit(args.prompt, sampling_dict(args), request_id=args.request_id)
    if args.json:
        result = client.result(rid, timeout=args.timeout)
        print(json.dumps({"request_id": rid, "text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason, "error": result.error,
                          "usage": msgspec.to_builtins(result.usage)}, ensure_ascii=False))
        return 1 if result.error else 0
    code, last = print_stream(client.stream(rid, timeout=args.timeout))
    usage = last.usage
    print(f"request {rid}: {last.finish_reason}, {usage.prompt_tokens} prompt + {usage.completion_tokens} "
          "completion tokens", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP gateway (needs the `serve` extra)."""
    from producer.gateway.app import serve
    from producer.gateway.config import config_from_args as gateway_config

    return serve(gateway_config(args))


def cmd_bulk(args: argparse.Namespace) -> int:
    """OpenAI Batch JSONL in, batch output JSONL out; resumable; or one RQ job with --rq.
    Without --redis-url, a local worker on an embedded Redis does the work."""
    from producer.bulk import enqueue_rq, run_bulk

    if args.rq:
        if not args.redis_url:
            raise ValueError("--rq needs --redis-url (the Redis that RQ and the workers share)")
        job = enqueue_rq(args.input, args.out, args.redis_url, args.max_in_flight, args.stream)
        print(f"enqueued RQ job {job.id} on queue pravaha-bulk; run it with: "
              f"rq worker pravaha-bulk -S json --url {args.redis_url}")
        return 0
    if not os.path.isfile(args.input):
        raise ValueError(f"input file {args.input!r} does not exist")
    if args.redis_url:
        summary = run_bulk(args.input, args.out, redis_url=args.redis_url, max_in_flight=args.max_in_flight,
                           stream=args.stream)
    else:
        from .local import local_worker
        from .settings import WorkerConfig

        config = WorkerConfig.from_settings(model=args.model, stream=args.stream, consumer="bulk-embedded",
                                            metrics_port=-1)
        with local_worker(config):
            summary = run_bulk(args.input, args.out, redis_url=config.redis_url,
                               max_in_flight=args.max_in_flight, stream=args.stream)
    print(summary.text())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a GPTQ checkpoint of an HF checkpoint directory."""
    from pravaha_core.quantize import quantize_checkpoint

    print(quantize_checkpoint(args.source, args.out, method=args.method, bits=args.bits,
                              group_size=args.group_size, sym=not args.asym, desc_act=args.desc_act,
                              calibration=args.calibration))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.throughput import run

    run(quick=args.quick, out_dir=args.out_dir, skip_hf=args.skip_hf, repeats=args.repeats)
    return 0


def cmd_build_kernels(args) -> int:
    from pravaha_core import kernels

    module = kernels.load_native(args.march, args.lock_timeout_s)
    print(f"native kernels {'built in ' + kernels.build_directory(args.march) if module else 'unavailable (see log)'}")
    return 0 if module is not None else 1


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser(os.environ)
        args = parser.parse_args(argv)
    except ValueError as exc:   # a PRAVAHA_* variable that does not parse
        print(f"pravaha: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"pravaha: error: {exc}", file=sys.stderr)
        return 2
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse) as exc:
        print(f"pravaha: error: cannot use Redis at the given URL: {exc}", file=sys.stderr)   # one line
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in WORKER_EXTRA:
            raise
        print(f"pravaha: error: `pravaha {args.command}` needs the engine ({exc.name} is not installed): "
              "pip install 'pravaha[worker]'", file=sys.stderr)
        return 2


def build_parser(environ) -> argparse.ArgumentParser:
    """The `pravaha` parser; `pravaha worker`'s flags default to PRAVAHA_* in `environ`."""
    from .settings import add_worker_flags

    parser = argparse.ArgumentParser(prog="pravaha", description="Pravāha: Redis-stream batch LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="producer + worker on an embedded Redis, tokens streamed from channels")
    demo.add_argument("--model", default="dummy:llama-tiny")
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    demo.set_defaults(func=cmd_demo)

    worker = sub.add_parser("worker", help="serve the request stream (flags also from PRAVAHA_* env vars)")
    add_worker_flags(worker, environ)
    worker.set_defaults(func=cmd_worker)

    submit = sub.add_parser("submit", help="submit a prompt to the stream and stream its text to stdout")
    submit.add_argument("prompt")
    submit.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    submit.add_argument("--stream", default="pravaha:requests")
    submit.add_argument("--request-id", default=None)
    submit.add_argument("--timeout", type=float, default=None)
    submit.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (request_id, text, finish_reason, usage)")
    sampling_args(submit, max_tokens=64)
    submit.set_defaults(func=cmd_submit)

    from producer.gateway.config import add_serve_flags

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP gateway (streaming, Batch/Files API) "
                                         "in front of the Redis queue")
    add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    bulk = sub.add_parser("bulk", help="OpenAI Batch JSONL -> output JSONL (resumable), locally or via Redis")
    bulk.add_argument("input")
    bulk.add_argument("--out", required=True)
    bulk.add_argument("--redis-url", default=None,
                      help="produce to this Redis (its workers generate); default: embedded Redis + worker")
    bulk.add_argument("--model", default="dummy:llama-tiny", help="model for the embedded worker")
    bulk.add_argument("--max-in-flight", type=int, default=64)
    bulk.add_argument("--stream", default="pravaha:requests")
    bulk.add_argument("--rq", action="store_true", help="enqueue the file as an RQ job on queue pravaha-bulk")
    bulk.set_defaults(func=cmd_bulk)

    bench = sub.add_parser("bench", help="the W1 throughput benchmark: HF baselines, the engine, via Redis")
    bench.add_argument("--quick", action="store_true", help="16 requests instead of 64")
    bench.add_argument("--skip-hf", action="store_true", help="only the Pravaha rows")
    bench.add_argument("--out-dir", default="bench-results")
    bench.add_argument("--repeats", type=int, default=None,
                       help="runs of each Pravaha row, interleaved; the fastest is reported (default 2, --quick 1)")
    bench.set_defaults(func=cmd_bench)

    quant = sub.add_parser("quantize", help="write a GPTQ checkpoint (round to nearest, or GPTQ via gptqmodel)")
    quant.add_argument("source", help="HF checkpoint directory (Llama, Mistral, Qwen2)")
    quant.add_argument("out", help="output directory")
    quant.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                       help="rtn: round to nearest, no extra packages; gptq: gptqmodel (pip install '.[gptq]')")
    quant.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    quant.add_argument("--group-size", type=int, default=128, help="-1: one group per output channel")
    quant.add_argument("--asym", action="store_true", help="zero points per group (default: symmetric)")
    quant.add_argument("--desc-act", action="store_true", help="gptq only: act-order")
    quant.add_argument("--calibration", default=None,
                       help="gptq only: text file, one calibration sample per line (default: built-in)")
    quant.set_defaults(func=cmd_quantize)

    gen = sub.add_parser("generate", help="generate one completion in-process (no Redis) and stream it")
    gen.add_argument("prompt")
    engine_args(gen)
    sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)

    kern = sub.add_parser("build-kernels", help="compile the native CPU kernels ahead of time (image build, install)")
    kern.add_argument("--march", default="native", help="-march to build for (native: this CPU)")
    kern.add_argument("--lock-timeout-s", type=float, default=600.0)
    kern.set_defaults(func=cmd_build_kernels)

    return parser


if __name__ == "__main__":
    sys.exit(main())
