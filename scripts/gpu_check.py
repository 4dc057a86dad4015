"""CUDA check (run by scripts/gpu_check.sh on a GPU machine, under 8 minutes):
1. greedy output of the engine on CUDA equals HF generate on CUDA (tiny checkpoints, float32);
2. W1 at GPU size (dummy:llama-135m, bfloat16, 512 requests) vs HF generate_batch, same process;
3. quantized weights on CUDA: which kernel each layer takes (torch's int4/int8 kernels are checked
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
from worker.bench import bench_hf_generate_batch, hf_model, model_flops, workload  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3")


def check_greedy(device: str, families=FAMILIES) -> dict:
    from transformers import AutoModelForCausalLM

    report = {}
    prompts = ["The quick brown fox", "Paged attention stores keys and values in fixed-size blocks. " * 3, "0",
               "def add(a, b):", "नमस्ते दुनिया", "Continuous batching keeps the accelerator busy", "x y z", "hello"]
    for family in families:
        path = make_checkpoint(family, tempfile.mkdtemp())
        engine = Engine(path, device=device, kv_cache_bytes=1 << 24)
        ids = [engine.tokenizer.encode(p) for p in prompts]
        outs = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        same = 0
        for p, o in zip(ids, outs):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p], device=device), max_new_tokens=24, do_sample=False,
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))
            same += o.token_ids == ref[0, len(p):].tolist()
        report[family] = {"identical": same, "prompts": len(prompts)}
        print(f"{family}: {same}/{len(prompts)} prompts token-identical to HF", flush=True)
    return report


def bench_gpu(device: str, num: int = 512, max_output: int = 256) -> dict:
    reqs = workload(num, output_range=(min(16, max_output), max_output))
    cfg = PRESETS["llama-135m"]
    engine = Engine("dummy:llama-135m", dtype="bfloat16", device=device, max_num_seqs=512,
                    max_num_batched_tokens=8192)
    engine.generate([reqs[0].prompt[:16]], SamplingParams(max_tokens=4))
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
    sync(device)
    t = time.perf_counter()
    outs = engine.generate([r.prompt for r in reqs], params)
    sync(device)
    ours = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    del engine
    model = hf_model(cfg).to(torch.bfloat16).to(device)
    row = bench_hf_generate_batch(model, reqs)   # returns once every output is back on the host
    hf = row["tokens"] / row["seconds"]
    result = {"requests": num, "tflop": model_flops(cfg, reqs) / 1e12, "pravaha_tok_s": ours,
              "hf_generate_batch_tok_s": hf, "ratio": ours / hf,
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    print(json.dumps(result), flush=True)
    return result


def quant_gpu(device: str, new_tokens: int = 64) -> dict:
    from worker.bench import QUANT_ROWS

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
    parser.add_argument("--families", default=",".join(FAMILIES), help="greedy check: comma-separated families")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for a dry run)")
    out = {"greedy": check_greedy(args.device, args.families.split(",")), "w1_gpu": bench_gpu(args.device, args.requests, args.max_output),
           "quantization": quant_gpu(args.device, args.quant_tokens)}
    target = os.environ.get("OUT", ".")
    with open(os.path.join(target, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
