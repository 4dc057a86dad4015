"""Optional native CPU kernels, compiled on first use with torch's C++ extension loader, and
the process-wide CPU setup the engine does once (`setup_cpu`).

`load_native()` returns the compiled module (paged decode attention, the fused float32 RMSNorm,
SiLU-and-multiply and rotary steps, and the panel GEMM for linear layers on AVX2 / AVX-512
hosts), or None when it cannot be built (no compiler, no ninja); the engine then uses its
plain-torch paths. Design notes: kernels/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger("pravaha.kernels")
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class CpuPlatform:
    """What `setup_cpu` did: the compiled kernels module (or None), whether large tensors go on
    transparent huge pages, and whether glibc keeps large blocks on the heap."""

    native: ModuleType | None
    huge_pages: bool
    large_allocations_kept: bool


def setup_cpu(native_kernels: bool = True, march: str = "native", huge_pages: bool = True) -> CpuPlatform:
    """The engine's one CPU setup step: build or load the native kernels, and with them keep
    glibc's large blocks on the heap (process-wide). Logged once per engine."""
    native = load_native(march) if native_kernels else None
    kept = keep_large_allocations() if native is not None else False
    platform_ = CpuPlatform(native, huge_pages and platform.system() == "Linux", kept)
    log.info("CPU setup: native kernels %s (march %s), huge pages %s, large blocks kept on the heap %s",
             "on" if native is not None else "off", march, "on" if platform_.huge_pages else "off",
             "yes" if kept else "no")
    return platform_


def build_directory(march: str = "native") -> str:
    """Where the kernels for `march` are built: keyed on torch's version and this install's prefix,
    so two virtual environments on one host never rebuild each other's copy in turn."""
    from torch.utils.cpp_extension import get_default_build_root

    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()   # torch reads it too
    key = f"pravaha-torch{torch.__version__.replace('+', '_')}-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}"
    name = f"pravaha_paged_attention_{platform.machine()}" + ("" if march == "native" else f"_{march.replace('-', '_')}")
    return os.path.join(root, key, name)


@contextlib.contextmanager
def build_lock(directory: str, timeout_s: float):
    """Hold `directory`'s build for this process, or raise TimeoutError after `timeout_s`.
    An fcntl lock dies with its holder, unlike torch's `lock` file: a build killed mid-compile
    leaves that file behind and every later start waits on it forever. Holding ours, no other
    process is building here, so a torch `lock` file still present is stale and goes."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "pravaha.lock"), "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building in {directory} for over {timeout_s:g} s")
                time.sleep(0.2)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                log.warning("removing a stale kernel build lock %s (left by a process killed mid-build)", stale)
                os.unlink(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def load_native(march: str = "native", lock_timeout_s: float = 600.0) -> ModuleType | None:
    """The compiled kernels for `march` (a -march value; "native": this CPU, "haswell": the
    AVX2 paths, for tests and for images shared across CPU kinds), or None. Waits at most
    `lock_timeout_s` for another process's build of the same kernels, then uses the torch path."""
    try:
        from torch.utils.cpp_extension import load

        if not march.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"kernel_march: {march!r} is not a -march value")
        directory = build_directory(march)
        log.info("loading the native paged-attention kernel (the first use on a machine compiles it: ~40 s)")
        # torch rebuilds when a source or a flag changes, not a header: the header's hash is a flag.
        with open(os.path.join(HERE, "vec_math.h"), "rb") as f:
            header = hashlib.sha1(f.read()).hexdigest()[:12]
        sources = [os.path.join(HERE, f) for f in ("paged_attention.cpp", "fused.cpp", "gemm.cpp")]
        with build_lock(directory, lock_timeout_s):
            return load(name=os.path.basename(directory), sources=sources, build_directory=directory,
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
    if platform.system() != "Linux":
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


HUGE_PAGE = 2 << 20


def advise_huge_pages(tensor) -> int:
    """Ask Linux for transparent huge pages under a large CPU tensor, before its pages are first
    touched (most hosts run THP in "madvise" mode: only regions that ask get them). The paged KV
    cache is read in scattered 16-token blocks; with 4 KiB pages each block crosses several
    pages and the page walks show: decode attention over 64 sequences at contexts of 300 took
    23.8 ms on 4 KiB pages and 20.6 ms on huge pages (30 layers, an AVX-512 EPYC). Returns the
    bytes advised: 0 off Linux, for small tensors, or where the kernel refuses."""
    if platform.system() != "Linux" or tensor.device.type != "cpu":
        return 0
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end - start < HUGE_PAGE:
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(start, end - start, 14) != 0:          # MADV_HUGEPAGE
            return 0
    except (OSError, AttributeError):
        return 0
    return end - start


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
