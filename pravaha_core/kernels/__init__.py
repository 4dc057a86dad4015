"""Optional native kernels, compiled on first use with torch's C++ extension loader.

`paged_decode()` returns the compiled module (paged decode attention, the fused float32
RMSNorm, SiLU-and-multiply and rotary steps, and on AVX2 hosts the panel GEMM for linear layers), or None when it cannot be built (no compiler,
no ninja, PRAVAHA_NO_KERNELS=1); the engine then uses its plain-torch paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform

log = logging.getLogger("pravaha.kernels")
HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def paged_decode():
    if os.environ.get("PRAVAHA_NO_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        # PRAVAHA_KERNEL_MARCH: the -march to build for (default: this CPU); e.g. "haswell" runs
        # the AVX2 paths on an AVX-512 host, for tests and for images shared across CPU kinds.
        march = os.environ.get("PRAVAHA_KERNEL_MARCH", "native")
        if not march.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"PRAVAHA_KERNEL_MARCH: {march!r} is not a -march value")
        name = f"pravaha_paged_attention_{platform.machine()}" + ("" if march == "native" else f"_{march.replace('-', '_')}")
        log.info("loading the native paged-attention kernel (the first use on a machine compiles it: ~40 s)")
        # torch rebuilds when a source or a flag changes, not a header: the header's hash is a flag.
        with open(os.path.join(HERE, "vec_math.h"), "rb") as f:
            header = hashlib.sha1(f.read()).hexdigest()[:12]
        sources = [os.path.join(HERE, f) for f in ("paged_attention.cpp", "fused.cpp", "gemm.cpp")]
        return load(name=name, sources=sources,
                    extra_cflags=["-O3", f"-march={march}", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                                  f"-DPRAVAHA_VEC_MATH={header}"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("paged attention kernel unavailable (%s); using the torch path", exc)
        return None


@functools.cache
def keep_large_allocations() -> bool:
    """glibc hands out tensors over its mmap threshold as fresh mmap'd pages and unmaps them on
    free, so every large activation of a prefill step page-faults its way in (a [2048, 1536]
    multiply took 12 ms instead of 2). Raising the mmap and trim thresholds keeps those blocks on
    the heap for reuse, as jemalloc or tcmalloc would. Process-wide, once; glibc only."""
    if os.environ.get("PRAVAHA_NO_KERNELS") == "1" or platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 31) == 1   # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
    log.info("glibc malloc: large blocks stay on the heap (mmap threshold 1 GiB)" if ok else
             "glibc mallopt refused the thresholds; leaving malloc as it is")
    return ok
