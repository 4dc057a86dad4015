#!/usr/bin/env bash
# On a CUDA machine: greedy equality against HF on the GPU, W1 at GPU size vs HF generate_batch,
# and quantized (int8, GPTQ int4) kernels and decode speed; writes gpu_check.json to $OUT (or .).
# Usage: bash scripts/gpu_check.sh   (under 8 minutes)
# It needs torch with CUDA, transformers, tokenizers and safetensors, and nothing else: the
# repository root goes on sys.path, so GPU hosts without a package index can run it as they are.
# Where those are missing, it installs them (which needs a package index).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, transformers, tokenizers, safetensors; assert torch.cuda.is_available()" 2>/dev/null \
  || pip install -q "torch>=2.4" "transformers>=4.45" "tokenizers>=0.19" "safetensors>=0.4"
timeout 480 python3 scripts/gpu_check.py "$@"
