"""CUDA check (run by scripts/gpu_check.sh on a GPU machine, under 8 minutes):
1. greedy output of the engine on CUDA equals HF generate on CUDA (tiny checkpoints, float32);
2. W1 at GPU size (dummy:llama-135m, bfloat16, 512 requests) vs HF generate_batch, same process;
3. quantized weights on CUDA: which kernel each layer takes (torch's int4/int8 kernels are checked
   against the dequantized weights at load) and decode tokens/s at batch 1 and 32 vs bfloat16.
"""

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


def check_greedy() -> dict:
    from transformers import AutoModelForCausalLM

    report = {}
    prompts = ["The quick brown fox", "Paged attention stores keys and values in fixed-size blocks. " * 3, "0",
               "def add(a, b):", "नमस्ते दुनिया", "Continuous batching keeps the accelerator busy", "x y z", "hello"]
    for family in ("llama", "mistral", "qwen2", "gpt2"):
        path = make_checkpoint(family, tempfile.mkdtemp())
        engine = Engine(path, device="cuda", kv_cache_bytes=1 << 24)
        ids = [engine.tokenizer.encode(p) for p in prompts]
        outs = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        same = 0
        for p, o in zip(ids, outs):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=24, do_sample=False,
                                  attention_mask=torch.ones(1, len(p), dtype=torch.long).cuda())[0, len(p):].tolist()
            same += o.token_ids == ref
        report[family] = f"{same}/{len(prompts)} prompts token-identical"
        print(family, report[family], flush=True)
    return report


def bench_gpu(num: int = 512) -> dict:
    reqs = workload(num)
    cfg = PRESETS["llama-135m"]
    engine = Engine("dummy:llama-135m", dtype="bfloat16", device="cuda", max_num_seqs=512,
                    max_num_batched_tokens=8192)
    engine.generate([reqs[0].prompt[:16]], SamplingParams(max_tokens=4))
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True) for r in reqs]
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate([r.prompt for r in reqs], params)
    torch.cuda.synchronize()
    ours = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    del engine
    model = hf_model(cfg).to(torch.bfloat16).cuda()
    row = bench_hf_generate_batch(model, reqs)   # returns once every output is back on the host
    hf = row["tokens"] / row["seconds"]
    result = {"requests": num, "tflop": model_flops(cfg, reqs) / 1e12, "pravaha_tok_s": ours,
              "hf_generate_batch_tok_s": hf, "ratio": ours / hf, "device": torch.cuda.get_device_name()}
    print(json.dumps(result), flush=True)
    return result


def quant_gpu() -> dict:
    from worker.bench import QUANT_ROWS

    report = {}
    for name, dtype, quant in QUANT_ROWS[1:]:          # bfloat16, int8, GPTQ int4
        engine = Engine("dummy:llama-135m", dtype=dtype, device="cuda", quantization=quant,
                        kv_cache_bytes=1 << 30)
        info = engine.model_info()
        row = {"kernels": info["kernels"], "weight_bytes": info["weight_bytes"]}
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        engine.generate([list(range(300, 316))], SamplingParams(max_tokens=4))
        for batch in (1, 32):
            prompts = [list(range(300 + i, 316 + i)) for i in range(batch)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            torch.cuda.synchronize()
            row[f"batch{batch}_tok_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
        report[name] = row
        print(name, json.dumps(row), flush=True)
        del engine
    return report


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    out = {"greedy": check_greedy(), "w1_gpu": bench_gpu(), "quantization": quant_gpu()}
    target = os.environ.get("OUT", ".")
    with open(os.path.join(target, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)
