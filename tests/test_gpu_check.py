"""scripts/gpu_check.py runs rarely (only where a session is lent a GPU), so it runs here small
on the CPU: the same code paths, checked for what the GPU run will report."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One family per model-code path on the CPU (tests/test_model_families.py checks every new one):
# Llama-like, GPT-2, Gemma's soft caps and sliding layers, mixture of experts.
FAMILIES = ("llama", "gpt2", "gemma2", "mixtral")


def test_gpu_check_script_runs_small_on_the_cpu(tmp_path):
    """Triton through its interpreter (greedy check, attention benchmark); W1 on the torch
    backend only (30 layers through the interpreter would take minutes)."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH="", TRITON_INTERPRET="1")   # the script finds the repo itself
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--requests", "4",
           "--max-output", "8", "--quant-tokens", "8", "--attention-batch", "8", "--attention-context", "64",
           "--w1-backends", "torch", "--families", ",".join(FAMILIES)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["greedy"] == {f"{f}/{b}": {"identical": 8, "prompts": 8} for f in FAMILIES for b in ("torch", "triton")}
    attention = report["attention"]
    assert attention["batch"] == 8 and attention["device_gbps"] > 0
    assert all(attention[b]["kv_gbps"] > 0 for b in ("torch", "triton"))
    w1 = report["w1_gpu"]
    assert w1["requests"] == 4 and w1["device"] == "cpu" and w1["pravaha_tok_s"]["torch"] > 0
    assert w1["hf_generate_batch_tok_s"] > 0 and w1["ratio"]["torch"] > 0
    quant = report["quantization"]
    assert set(quant) == {"bfloat16", "int8 (bf16 activations)", "GPTQ int4, g128 (bf16 activations)"}
    assert all(row["batch1_tok_s"] > 0 and row["batch32_tok_s"] > 0 for row in quant.values())
    assert quant["int8 (bf16 activations)"]["weight_bytes"] < quant["bfloat16"]["weight_bytes"]


def test_gpu_check_refuses_cuda_without_a_device(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA host runs the real check instead")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OUT=str(tmp_path)))
    assert result.returncode == 1 and "no CUDA device (use --device cpu for a dry run)" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()
