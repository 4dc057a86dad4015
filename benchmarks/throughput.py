"""`pravaha bench` / `make bench`: one standard workload, every system side by side in one run.

W1: dummy:llama-135m (SmolLM2-135M shape), float32, CPU, 2 threads; 64 requests, prompt
lengths uniform in [16, 256], output lengths uniform in [16, 256] with ignore_eos, seeded.
Figure: useful output tokens per second over wall time, prefill included. The roofline is
the workload's model FLOPs over a measured large float32 matmul rate. The bound adds the memory
side: decode cannot finish before it has read its bytes (every weight once per step, each
token's context from the KV cache) at the machine's measured read bandwidth; on hosts where that
bandwidth is low for their FLOP rate, decode is memory-bound and the bound is the tighter figure.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

MODEL = "dummy:llama-135m"


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def workload(num: int = 64, prompt_range=(16, 256), output_range=(16, 256), seed: int = 0,
             shared_prefix: int = 0, vocab: int = 49152) -> list[Request]:
    rng = random.Random(seed)
    prefix = [rng.randrange(258, vocab) for _ in range(shared_prefix)]
    return [Request(prefix + [rng.randrange(258, vocab) for _ in range(rng.randint(*prompt_range))],
                    rng.randint(*output_range)) for _ in range(num)]


def model_flops(cfg: dict, reqs: list[Request], cached_prefix: int = 0) -> float:
    """Forward FLOPs: 2 per weight per computed token, attention QK and AV over the context,
    and the LM head only for tokens whose logits are sampled. A cached prefix is not computed."""
    return sum(phase_flops(cfg, reqs, cached_prefix))


def _shape(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden, layers, heads * head_dim, kv_heads * head_dim)"""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    return hidden, cfg["num_hidden_layers"], heads * head_dim, cfg["num_key_value_heads"] * head_dim


def phase_flops(cfg: dict, reqs: list[Request], cached_prefix: int = 0) -> tuple[float, float]:
    """`model_flops` split into (prefill, decode): the prompt's positions with the first output
    token's LM head, then the fed-back output tokens with the rest of the LM heads."""
    hidden, layers, q_dim, kv_dim = _shape(cfg)
    linear = layers * (hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * cfg["intermediate_size"])
    attn_per_ctx, head = 4 * layers * q_dim, 2 * hidden * cfg["vocab_size"]

    def positions(first: int, last: int) -> float:      # positions first .. last - 1
        count = max(0, last - first)
        return count * 2 * linear + attn_per_ctx * (count * (first + last + 1) / 2)

    prefill = decode = 0.0
    for r in reqs:
        p, n = len(r.prompt), r.max_tokens
        prefill += positions(cached_prefix, p) + head
        decode += positions(p, p + n - 1) + (n - 1) * head       # the last token is never fed back
    return prefill, decode


def decode_bytes(cfg: dict, reqs: list[Request], dtype_bytes: int = 4) -> float:
    """The bytes decode must read from memory at the least when neither the weights nor the KV
    cache stay in the CPU's caches from one step to the next (true when they are larger than its
    last-level cache): every weight (the LM head included) once per step, over at least as many
    steps as the longest request has decode tokens, and each decode token's context, K and V of
    every layer, once."""
    hidden, layers, q_dim, kv_dim = _shape(cfg)
    weights = (layers * (hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * cfg["intermediate_size"])
               + hidden * cfg["vocab_size"]) * dtype_bytes
    steps = max((r.max_tokens - 1 for r in reqs), default=0)
    per_position = layers * 2 * kv_dim * dtype_bytes
    contexts = sum((p + 1 + p + n - 1) * (n - 1) / 2 for p, n in ((len(r.prompt), r.max_tokens) for r in reqs))
    return steps * weights + contexts * per_position


def stream_gbps(mib: int = 512, trials: int = 5) -> float:
    """The machine's best read bandwidth: a float32 sum over `mib` MiB (far past any CPU cache),
    on the bench's threads, best of `trials` after one pass that touches the pages."""
    x = torch.ones(mib << 18)
    x.sum()
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - started) / 1e9)
    return best


def matmul_gflops(size: int = 2048, repeats: int = 5, trials: int = 5) -> dict:
    """The machine's best float32 matmul rate: the best of `trials` timings of `repeats`
    [size x size] products, through torch's matmul (MKL on x86), a oneDNN-packed linear layer
    and the native panel GEMM (the engine's float32 CPU paths, see PackedLinear), whichever is
    fastest. A roofline must be the best rate the hardware gives: on AMD hosts with AVX-512,
    MKL's sgemm reaches under half of what oneDNN does; on AVX2 hosts the panel GEMM can beat
    both. One timing swings on a shared machine, hence the best of several."""
    from pravaha_core import kernels
    from pravaha_core.models.layers import PackedLinear

    a, b = torch.randn(size, size), torch.randn(size, size)
    paths = {"torch.matmul": lambda: a @ b}
    layer = torch.nn.Linear(size, size, bias=False)
    layer.weight.data.copy_(b)
    try:
        packed = PackedLinear(layer)
        paths["oneDNN packed"] = lambda: packed(a)
    except (RuntimeError, AttributeError):     # no oneDNN in this torch build
        pass
    native = kernels.load_native()
    if native is not None and getattr(native, "panel_gemm", False):
        panels = PackedLinear(layer, native)
        paths["native panels"] = lambda: panels(a)
    rates = {}
    for name, product in paths.items():
        product()
        best = 0.0
        for _ in range(trials):
            started = time.perf_counter()
            for _ in range(repeats):
                product()
            best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9)
        rates[name] = best
    fastest = max(rates, key=rates.get)
    return {"gflops": rates[fastest], "path": fastest, "rates": rates}


def slow_native_gemm(rates: dict, floor: float = 0.6) -> str | None:
    """A warning when the native panel GEMM (which the engine's float32 linears use) multiplies
    well below oneDNN on this host: a sign of a bad build (its AVX2 tile once spilled its
    accumulators to the stack and ran at a third of its speed), not of the hardware."""
    panels, onednn = rates.get("native panels"), rates.get("oneDNN packed")
    if panels is None or not onednn or panels >= floor * onednn:
        return None
    return (f"warning: the native panel GEMM runs at {panels:.0f} GFLOP/s, {100 * panels / onednn:.0f}% of "
            f"oneDNN's {onednn:.0f}: the engine's linears are slower than they should be on this host")


def bench_engine(reqs: list[Request], **engine_kwargs) -> dict:
    from pravaha_core import Engine, SamplingParams

    engine = Engine(MODEL, **engine_kwargs)
    engine.generate([reqs[0].prompt[:16]], SamplingParams(max_tokens=4))        # warm-up
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    started = time.perf_counter()
    outs = engine.generate([r.prompt for r in reqs], params)
    elapsed = time.perf_counter() - started
    result = {"tokens": sum(len(o.token_ids) for o in outs), "seconds": elapsed, "steps": engine.stats.num_steps}
    # The engine sits in reference cycles: collect it now, not during the next row (freeing a
    # large KV cache mid-run slowed the Redis row measurably).
    del engine, outs
    gc.collect()
    return result


def bench_redis(reqs: list[Request], kv_cache_bytes: int) -> dict:
    """Producer -> stream -> a worker process -> channels, on an embedded redis-server."""
    from producer import Client

    from worker.embedded import EmbeddedRedis

    with EmbeddedRedis() as url:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--redis-url", url, "--model", MODEL,
                                   "--kv-cache-bytes", str(kv_cache_bytes), "--metrics-port", "-1"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            client = Client(url)
            client.generate([1, 2, 3], {"max_tokens": 4}, timeout=600)           # worker ready and warm
            started = time.perf_counter()
            rids = [client.submit(r.prompt, {"max_tokens": r.max_tokens, "temperature": 0.0, "ignore_eos": True})
                    for r in reqs]
            results = [client.result(rid, timeout=3600) for rid in rids]
            elapsed = time.perf_counter() - started
        finally:
            worker.terminate()
            worker.wait(60)
    return {"tokens": sum(len(r.token_ids) for r in results), "seconds": elapsed}


def hf_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys}, eos_token_id=None, bos_token_id=None,
                                         pad_token_id=0)).eval()
    return model


def bench_hf_single(model, reqs: list[Request]) -> dict:
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for r in reqs:
            out = model.generate(torch.tensor([r.prompt]), max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens,
                                 do_sample=False, attention_mask=torch.ones(1, len(r.prompt), dtype=torch.long))
            tokens += out.shape[1] - len(r.prompt)
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def bench_hf_static(model, reqs: list[Request], batch: int = 16) -> dict:
    """Left-padded static batches; each batch runs to its longest output; useful tokens counted."""
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            width = max(len(r.prompt) for r in group)
            ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in group])
            mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group])
            longest = max(r.max_tokens for r in group)
            model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
            tokens += sum(r.max_tokens for r in group)
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def bench_hf_generate_batch(model, reqs: list[Request]) -> dict:
    """transformers' continuous batching; one GenerationConfig, so all run to the longest output."""
    from transformers import GenerationConfig

    longest = max(r.max_tokens for r in reqs)
    config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate_batch([r.prompt for r in reqs], generation_config=config, progress_bar=False)
    return {"tokens": sum(r.max_tokens for r in reqs), "seconds": time.perf_counter() - started}


def bench_prefix_cache(quick: bool, kv: int) -> dict:
    """W2: W1 with one shared 512-token prefix on every prompt, the engine with and without the cache."""
    from pravaha_core.loader import PRESETS

    reqs = workload(16 if quick else 64, shared_prefix=512)
    cfg = PRESETS["llama-135m"]
    off = bench_engine(reqs, kv_cache_bytes=kv, enable_prefix_caching=False)
    on = bench_engine(reqs, kv_cache_bytes=kv, enable_prefix_caching=True)
    return {"flops_no_cache_tflop": model_flops(cfg, reqs) / 1e12,
            "flops_cached_tflop": model_flops(cfg, reqs, cached_prefix=512) / 1e12,
            "without_cache_tok_s": off["tokens"] / off["seconds"], "with_cache_tok_s": on["tokens"] / on["seconds"],
            "speedup": (on["tokens"] / on["seconds"]) / (off["tokens"] / off["seconds"])}


QUANT_ROWS = [("float32", "float32", None), ("bfloat16", "bfloat16", None),
              ("int8 (bf16 activations)", "bfloat16", "int8"), ("GPTQ int4, g128 (bf16 activations)", "bfloat16", "gptq")]


def bench_quantization(quick: bool, batches=(1, 32)) -> list[dict]:
    """dummy:llama-135m decode at each batch size, per weight format: 16-token prompts, then
    `new_tokens` greedy tokens each; tokens/s over the generate call (prefill is ~1/8 of it)."""
    from pravaha_core import Engine, SamplingParams

    new_tokens = 16 if quick else 64
    rows = []
    for name, dtype, quant in QUANT_ROWS:
        engine = Engine(MODEL, dtype=dtype, quantization=quant, kv_cache_bytes=256 << 20)
        info = engine.model_info()
        row = {"format": name, "weight_bytes": info["weight_bytes"],
               "linear_weight_bytes": info["linear_weight_bytes"], "kernels": info["kernels"]}
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.generate([list(range(300, 316))], SamplingParams(max_tokens=4))          # warm-up
        for batch in batches:
            prompts = [list(range(300 + i, 316 + i)) for i in range(batch)]
            started = time.perf_counter()
            outs = engine.generate(prompts, params)
            row[f"batch{batch}_tok_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - started)
        rows.append(row)
        del engine
    return rows


def kv_efficiency(reqs: list[Request], budget_bytes: int, block_size: int = 16) -> dict:
    """Concurrent W1 sequences one KV budget holds: paged blocks vs a contiguous cache that
    reserves the workload's maximum length (longest prompt + longest output) per slot."""
    from pravaha_core.loader import PRESETS

    cfg = PRESETS["llama-135m"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] //
                                                                           cfg["num_attention_heads"]) * 4
    max_len = max(len(r.prompt) for r in reqs) + max(r.max_tokens for r in reqs)
    contiguous = budget_bytes // (per_token * max_len)
    blocks, paged = budget_bytes // (per_token * block_size), 0
    for r in reqs * (1 + budget_bytes // (per_token * 16 * len(reqs))):   # cycle through the workload
        need = -(-(len(r.prompt) + r.max_tokens) // block_size)
        if need > blocks:
            break
        blocks -= need
        paged += 1
    return {"budget_bytes": budget_bytes, "contiguous_slot_len": max_len, "contiguous_seqs": contiguous,
            "paged_seqs": paged, "ratio": paged / contiguous if contiguous else None}


def fastest_run(runs: list[dict]) -> dict:
    """The run with the shortest time, with every run's seconds alongside (in run order)."""
    if not runs:
        raise ValueError("fastest_run: no runs")
    return dict(min(runs, key=lambda r: r["seconds"]), runs_seconds=[r["seconds"] for r in runs])


def run(quick: bool = False, out_dir: str = "bench-results", skip_hf: bool = False, w2_enabled: bool = True,
        repeats: int | None = None) -> dict:
    from pravaha_core.loader import PRESETS

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = PRESETS["llama-135m"]
    reqs = workload(16 if quick else 64)
    repeats = (1 if quick else 2) if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"repeats: must be at least 1, got {repeats}")
    kv = 2 << 30
    matmul = matmul_gflops()
    gflops = matmul["gflops"]
    flops = model_flops(cfg, reqs)
    best_s = flops / (gflops * 1e9)
    # A second, tighter bound: decode also cannot beat the time to read its bytes.
    gbps = stream_gbps()
    prefill_flops, decode_flops = phase_flops(cfg, reqs)
    moved = decode_bytes(cfg, reqs)
    bound_s = (prefill_flops + max(decode_flops, moved / gbps * gflops)) / (gflops * 1e9)
    useful = sum(r.max_tokens for r in reqs)
    # Pravaha first: the HF rows leave a large, fragmented heap behind in this process.
    # The two Pravaha rows run `repeats` times, interleaved (engine, Redis, engine, Redis):
    # each row reports its fastest run, and a slow minute of a shared host moves neither row alone.
    engine_runs, redis_runs = [], []
    for _ in range(repeats):
        engine_runs.append(bench_engine(reqs, kv_cache_bytes=kv))
        redis_runs.append(bench_redis(reqs, kv))
    ours = [("Pravaha Engine.generate", fastest_run(engine_runs)),
            ("Pravaha via Redis (producer, stream, worker, channels)", fastest_run(redis_runs))]
    rows: list[tuple[str, dict]] = []
    if not skip_hf:
        model = hf_model(cfg)
        single = reqs[:4]
        rows.append((f"HF generate, one at a time ({len(single)} requests)", bench_hf_single(model, single)))
        rows.append(("HF generate, static batches of 16", bench_hf_static(model, reqs)))
        rows.append(("HF generate_batch (continuous)", bench_hf_generate_batch(model, reqs)))
        del model
    rows += ours
    report = {"workload": {"requests": len(reqs), "prompt_tokens": sum(len(r.prompt) for r in reqs),
                           "output_tokens": useful, "model_tflop": flops / 1e12},
              "matmul_gflops": gflops, "matmul": matmul, "roofline_seconds": best_s,
              "roofline_tok_s": useful / best_s, "stream_gbps": gbps, "decode_gb": moved / 1e9,
              "bound_seconds": bound_s, "bound_tok_s": useful / bound_s, "rows": []}
    rates = ", ".join(f"{k} {v:.0f}" for k, v in matmul["rates"].items())
    print(f"W1{' (quick: 16 requests)' if quick else ''}: {len(reqs)} requests, "
          f"{report['workload']['prompt_tokens']} prompt + {useful} output tokens, {flops / 1e12:.2f} TFLOP; "
          f"matmul {gflops:.0f} GFLOP/s (best of {rates}) -> roofline {best_s:.1f}s = {useful / best_s:.0f} tok/s")
    print(f"memory {gbps:.0f} GB/s: decode reads at least {moved / 1e9:.0f} GB ({moved / gbps / 1e9:.1f}s) for "
          f"{decode_flops / 1e12:.2f} TFLOP ({decode_flops / gflops / 1e9:.1f}s) -> bound {bound_s:.1f}s = "
          f"{useful / bound_s:.0f} tok/s")
    warning = slow_native_gemm(matmul["rates"])
    if warning:
        print(warning)
    print(f"{'system':58s} {'tok/s':>8s} {'seconds':>8s} {'roofline':>9s} {'bound':>7s}")
    engine_rate = ours[0][1]["tokens"] / ours[0][1]["seconds"]
    for name, r in rows:
        rate = r["tokens"] / r["seconds"]
        row = {"system": name, **r, "tok_s": rate, "roofline_share": rate / (useful / best_s),
               "bound_share": rate / (useful / bound_s)}
        report["rows"].append(row)
        runs = r.get("runs_seconds", [])
        every = f"  (fastest of {len(runs)}: " + ", ".join(f"{x:.1f}" for x in runs) + " s)" if len(runs) > 1 else ""
        print(f"{name:58s} {rate:8.1f} {r['seconds']:8.1f} {100 * row['roofline_share']:8.1f}% "
              f"{100 * row['bound_share']:6.1f}%{every}")
    via_redis = ours[1][1]["tokens"] / ours[1][1]["seconds"]
    report["redis_vs_engine"] = via_redis / engine_rate
    pairs = [e["seconds"] / r["seconds"] for e, r in zip(engine_runs, redis_runs)]
    report["redis_vs_engine_pairs"] = pairs
    print(f"via Redis / Engine.generate: {100 * via_redis / engine_rate:.0f}%"
          + (" (each back-to-back pair: " + ", ".join(f"{100 * x:.0f}%" for x in pairs) + ")" if repeats > 1 else ""))
    w2 = bench_prefix_cache(quick, kv) if w2_enabled else None
    report["w2_prefix_cache"] = w2
    if w2:
        print(f"W2 (shared 512-token prefix): {w2['without_cache_tok_s']:.1f} tok/s without the prefix cache, "
              f"{w2['with_cache_tok_s']:.1f} with it: {w2['speedup']:.2f}x (FLOP bound "
              f"{w2['flops_no_cache_tflop'] / w2['flops_cached_tflop']:.2f}x)")
    quant = bench_quantization(quick)
    report["quantization"] = quant
    base = quant[0]
    print(f"Quantization, {MODEL} decode (16-token prompts):")
    print(f"{'weights':38s} {'batch 1 tok/s':>14s} {'batch 32 tok/s':>15s} {'weight MiB':>11s} {'linear MiB':>11s}")
    for q in quant:
        print(f"{q['format']:38s} {q['batch1_tok_s']:8.1f} ({q['batch1_tok_s'] / base['batch1_tok_s']:3.1f}x) "
              f"{q['batch32_tok_s']:8.1f} ({q['batch32_tok_s'] / base['batch32_tok_s']:3.1f}x) "
              f"{q['weight_bytes'] / 2**20:11.1f} {q['linear_weight_bytes'] / 2**20:11.1f}")
    eff = kv_efficiency(reqs, 256 << 20)
    report["kv_efficiency"] = eff
    print(f"KV efficiency at {eff['budget_bytes'] >> 20} MiB: paged holds {eff['paged_seqs']} W1 sequences, "
          f"a contiguous cache reserving {eff['contiguous_slot_len']} tokens per slot holds "
          f"{eff['contiguous_seqs']} ({eff['ratio']:.2f}x)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written to {path}")
    return report
