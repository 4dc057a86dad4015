"""CUDA check (run by scripts/gpu_check.sh on a GPU machine, under 8 minutes):
1. greedy output of the engine on CUDA equals HF generate on CUDA (tiny checkpoints, float32),
   through each attention backend;
2. decode attention alone at Llama-3.2-1B's shape (32/8 heads, head_dim 64, bfloat16), batch
   256, contexts around 1024: GB/s on the K/V bytes read, per backend, against the measured
   device bandwidth;
3. W1 at GPU size (dummy:llama-135m, bfloat16, 512 requests) per attention backend vs HF
   generate_batch, same process;
4. quantized weights on CUDA: which kernel each layer takes (torch's int4/int8 kernels are checked
   against the dequantized weights at load) and decode tokens/s at batch 1 and 32 vs bfloat16.

GPU time is scarce, so the same code runs small on the CPU in the test suite
(`--device cpu --requests 4 --max-output 8`): the script cannot rot between GPU sessions.
It needs torch, transformers, tokenizers and safetensors only (no Redis client, no install of
this package): the repository root goes on sys.path.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pravaha_core import Engine, SamplingParams  # noqa: E402
from pravaha_core.loader import PRESETS  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402
from benchmarks.throughput import bench_hf_generate_batch, hf_model, model_flops, workload  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3")


def check_greedy(device: str, backends: list[str], families=FAMILIES) -> dict:
    from transformers import AutoModelForCausalLM

    report = {}
    prompts = ["The quick brown fox", "Paged attention stores keys and values in fixed-size blocks. " * 3, "0",
               "def add(a, b):", "नमस्ते दुनिया", "Continuous batching keeps the accelerator busy", "x y z", "hello"]
    for family in families:
        path = make_checkpoint(family, tempfile.mkdtemp())
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        tokenizer = Engine(path, kv_cache_bytes=1 << 20, attention_backend="torch").tokenizer
        refs = []
        for p in prompts:
            ids = tokenizer.encode(p)
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids], device=device), max_new_tokens=24, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
            refs.append((ids, ref[0, len(ids):].tolist()))
        for backend in backends:
            engine = Engine(path, device=device, kv_cache_bytes=1 << 24, attention_backend=backend)
            outs = engine.generate([ids for ids, _ in refs], SamplingParams(max_tokens=24, temperature=0))
            same = sum(o.token_ids == ref for o, (_, ref) in zip(outs, refs))
            report[f"{family}/{engine.runner.attention.name}"] = {"identical": same, "prompts": len(prompts)}
            print(f"{family} ({engine.runner.attention.name}): {same}/{len(prompts)} prompts token-identical to HF",
                  flush=True)
    return report


def device_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Measured read+write bandwidth of a device-to-device copy (GB/s, counting both)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def bench_attention(device: str, backends: list[str], batch: int = 256, context: int = 1024) -> dict:
    """One layer's decode attention (store + attend) at the 1B shape, per backend."""
    import random

    from pravaha_core.attention import AttentionSpec, select_backend
    from pravaha_core.attention.check import random_batch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    spec = AttentionSpec(32, 8, 64, 16, torch.device(device), dtype, dtype, frozenset({None}))
    rng = random.Random(0)
    starts = [rng.randint(context * 7 // 8, context * 9 // 8) for _ in range(batch)]
    layout, q, k, v, k_cache, v_cache = random_batch(spec, [1] * batch, starts)
    kv_bytes = 2 * sum(s + 1 for s in starts) * spec.num_kv_heads * spec.head_dim * k_cache.element_size()
    report = {"batch": batch, "mean_context": sum(starts) / batch + 1, "kv_mb": kv_bytes / 1e6,
              "device_gbps": device_gbps(device, 1 << 30 if device.startswith("cuda") else 1 << 26)}
    for name in backends:
        backend = select_backend(name, spec)
        meta = backend.build_metadata(layout)
        for _ in range(3):
            backend.forward(q, k, v, k_cache, v_cache, meta, 0.125, None, None)
        sync(device)
        iters = 20 if device.startswith("cuda") else 2
        t = time.perf_counter()
        for _ in range(iters):
            backend.forward(q, k, v, k_cache, v_cache, meta, 0.125, None, None)
        sync(device)
        seconds = (time.perf_counter() - t) / iters
        gbps = kv_bytes / seconds / 1e9
        report[backend.name] = {"us": seconds * 1e6, "kv_gbps": gbps, "share_of_device": gbps / report["device_gbps"]}
        print(f"attention ({backend.name}): {seconds * 1e6:.0f} us, {gbps:.0f} GB/s on K/V = "
              f"{gbps / report['device_gbps']:.0%} of the measured {report['device_gbps']:.0f} GB/s", flush=True)
    return report


def bench_gpu(device: str, backends: list[str], num: int = 512, max_output: int = 256) -> dict:
    reqs = workload(num, output_range=(min(16, max_output), max_output))
    cfg = PRESETS["llama-135m"]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
    ours = {}
    for backend in backends:
        engine = Engine("dummy:llama-135m", dtype="bfloat16", device=device, max_num_seqs=512,
                        max_num_batched_tokens=8192, attention_backend=backend)
        engine.generate([reqs[0].prompt[:16]], SamplingParams(max_tokens=4))
        sync(device)
        t = time.perf_counter()
        outs = engine.generate([r.prompt for r in reqs], params)
        sync(device)
        ours[engine.runner.attention.name] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
        del engine
    model = hf_model(cfg).to(torch.bfloat16).to(device)
    row = bench_hf_generate_batch(model, reqs)   # returns once every output is back on the host
    hf = row["tokens"] / row["seconds"]
    result = {"requests": num, "tflop": model_flops(cfg, reqs) / 1e12, "pravaha_tok_s": ours,
              "hf_generate_batch_tok_s": hf, "ratio": {name: tok_s / hf for name, tok_s in ours.items()},
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    print(json.dumps(result), flush=True)
    return result


def quant_gpu(device: str, new_tokens: int = 64) -> dict:
    from benchmarks.throughput import QUANT_ROWS

    report = {}
    for name, dtype, quant in QUANT_ROWS[1:]:          # bfloat16, int8, GPTQ int4
        engine = Engine("dummy:llama-135m", dtype=dtype, device=device, quantization=quant,
                        kv_cache_bytes=1 << 30)
        info = engine.model_info()
        row = {"kernels": info["kernels"], "weight_bytes": info["weight_bytes"]}
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.generate([list(range(300, 316))], SamplingParams(max_tokens=4))
        for batch in (1, 32):
            prompts = [list(range(300 + i, 316 + i)) for i in range(batch)]
            sync(device)
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            sync(device)
            row[f"batch{batch}_tok_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
        report[name] = row
        print(name, json.dumps(row), flush=True)
        del engine
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a small dry run)")
    parser.add_argument("--requests", type=int, default=512, help="W1 requests (GPU size: 512)")
    parser.add_argument("--max-output", type=int, default=256, help="longest W1 output (W1: 256)")
    parser.add_argument("--quant-tokens", type=int, default=64, help="decode tokens per quantization run")
    parser.add_argument("--attention-batch", type=int, default=256, help="decode rows in the attention benchmark")
    parser.add_argument("--attention-context", type=int, default=1024, help="their mean context")
    parser.add_argument("--backends", default="torch,triton", help="attention backends to compare")
    parser.add_argument("--w1-backends", default=None, help="backends for W1 (default: --backends)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="greedy check: comma-separated families")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for a dry run)")
    backends = args.backends.split(",")
    out = {"greedy": check_greedy(args.device, backends, args.families.split(",")),
           "attention": bench_attention(args.device, backends, args.attention_batch, args.attention_context),
           "w1_gpu": bench_gpu(args.device, (args.w1_backends or args.backends).split(","), args.requests,
                               args.max_output),
           "quantization": quant_gpu(args.device, args.quant_tokens)}
    target = os.environ.get("OUT", ".")
    with open(os.path.join(target, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
