"""The AVX2 build of the native kernels (PRAVAHA_KERNEL_MARCH=haswell), compiled and checked on
every run whatever this host's CPU, so the paths an AVX-512 host never takes cannot rot."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.redis_helpers import ROOT

CHECK_BUILD = ("from pravaha_core import kernels\n"
               "module = kernels.load_native('haswell')\n"
               "assert module is not None, 'the haswell build failed (see the log above)'\n"
               "assert module.__name__.endswith('_haswell') and module.panel_gemm, module.__name__\n")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_avx2_kernels_build_and_match_torch():
    if platform.machine() != "x86_64" or not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("the AVX2 build runs only on an x86-64 CPU with AVX2 and FMA")
    env = dict(os.environ, PRAVAHA_KERNEL_MARCH="haswell")
    built = subprocess.run([sys.executable, "-c", CHECK_BUILD], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    # The kernel tests on the AVX2 build: every attention path, greedy against HF, the panel
    # GEMM, the fused steps, prompts through the kernel.
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            "tests/test_kernel.py", "tests/test_cpu_fast_paths.py",
                            "-k", "test_kernel.py or panel or fused or prompt_rows"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " skipped" not in tests.stdout, tests.stdout[-2000:]
