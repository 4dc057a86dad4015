import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():   # the Triton kernels run in Triton's interpreter on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"

from tests.checkpoints import make_checkpoint  # noqa: E402

# The AVX2 run of tests/test_kernel_march.py: every engine of this session builds its kernels
# for this -march (the engine reads no environment; the test session is the entry point).
KERNEL_MARCH = os.environ.get("PRAVAHA_KERNEL_MARCH")
if KERNEL_MARCH:
    from pravaha_core import kernels as _kernels

    _load_native = _kernels.load_native
    _kernels.load_native = lambda march="native": _load_native(KERNEL_MARCH)

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def native():
    """The compiled native CPU kernels module; a build failure fails the test, never skips it."""
    from pravaha_core import kernels

    module = kernels.load_native()
    if module is None:
        pytest.fail("the native kernels did not build (compiler or ninja missing?)")
    return module


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, **config_overrides) -> directory of a tiny random HF checkpoint."""
    made: dict[tuple, str] = {}

    def get(family: str, **overrides) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            made[key] = make_checkpoint(family, str(path), **overrides)
        return made[key]

    return get


from tests.redis_helpers import aof_redis_server, redis_server, start_worker  # noqa: E402,F401
