#!/usr/bin/env bash
# On a CUDA machine: greedy equality against HF on the GPU, W1 at GPU size vs HF generate_batch,
# and quantized (int8, GPTQ int4) kernels and decode speed.
# Usage: bash scripts/gpu_check.sh   (installs the package with a CUDA torch if needed; under 8 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || pip install -q "torch>=2.4"
pip install -q -e ".[dev]"
timeout 480 python3 scripts/gpu_check.py
