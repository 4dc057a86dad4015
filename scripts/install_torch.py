"""Install torch for `make`: the CPU build where no GPU is present, else the default index's.

    python scripts/install_torch.py "torch==2.13.0" [--dry-run]

PyPI's Linux x86-64 torch wheel is the CUDA build (with some 16 nvidia-* packages, several GB).
Without an NVIDIA GPU (no working `nvidia-smi`) this installs from PyTorch's CPU wheel index
instead, if that index answers within PROBE_TIMEOUT_S; if it does not (offline, a proxy, a
private mirror), from the default index, saying so. TORCH_CPU_INDEX overrides the index URL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5   # an unreachable index must not hold up `make` for pip's minutes of retries


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def reachable(index: str) -> bool:
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=PROBE_TIMEOUT_S) as reply:
            return reply.status == 200
    except (OSError, ValueError):
        return False


def pip_command(spec: str, environ=os.environ) -> tuple[list[str], str]:
    """The pip command to run and a line saying which build it installs and why."""
    pip = [sys.executable, "-m", "pip", "install", "-q", spec]
    if has_nvidia_gpu():
        return pip, f"{spec}: a GPU is present, so the default index's build (CUDA on Linux)"
    index = environ.get("TORCH_CPU_INDEX", CPU_INDEX)
    if reachable(index):
        return pip + ["--index-url", index], f"{spec}: no GPU, so the CPU build from {index}"
    return pip, (f"{spec}: no GPU, but {index} is unreachable, so the default index's build "
                 "(on Linux x86-64 PyPI's is the CUDA build, several GB; a local wheel or mirror may differ)")


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    command, why = pip_command(argv[0])
    print(f"installing torch: {why}", flush=True)
    if "--dry-run" in argv:
        print(" ".join(command))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
