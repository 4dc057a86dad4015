"""Moved to `benchmarks.throughput`; this alias remains only until scripts/gpu_check.py imports
from there (it is being edited on another branch). Do not import it in new code."""

from benchmarks.throughput import *  # noqa: F401,F403
from benchmarks.throughput import QUANT_ROWS, bench_hf_generate_batch, hf_model, model_flops, workload  # noqa: F401
