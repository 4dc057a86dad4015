"""Issue 22 item 5: a native-kernel build lock left by a process killed mid-build must not hang
start-up; a build held by another live process is waited on for a bounded time only."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from tests.redis_helpers import ROOT

MARCH = os.environ.get("PRAVAHA_KERNEL_MARCH", "native")
LOAD = ("import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from pravaha_core import kernels\n"
        "module = kernels.load_native(sys.argv[1], float(sys.argv[2]))\n"
        "print('LOADED' if module is not None else 'TORCH-PATH')\n")


def load_in_subprocess(timeout_s: float, lock_timeout_s: float = 600.0):
    return subprocess.run([sys.executable, "-c", LOAD, MARCH, str(lock_timeout_s)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def build_directory() -> str:
    from pravaha_core import kernels

    return kernels.build_directory(MARCH)


def test_stale_torch_lock_file_does_not_hang_start():
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "lock"), "w"):   # what a build killed with SIGKILL leaves behind
        pass
    done = load_in_subprocess(timeout_s=600)            # a first build on this host included
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED" in done.stdout, done.stderr[-3000:]
    assert "stale kernel build lock" in done.stderr
    assert not os.path.exists(os.path.join(directory, "lock"))


def test_build_held_by_another_process_times_out_to_the_torch_path():
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "pravaha.lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)                # a live process building right now
        start = time.monotonic()
        done = load_in_subprocess(timeout_s=120, lock_timeout_s=1.0)
        took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TORCH-PATH" in done.stdout
    assert "for over 1 s" in done.stderr and "using the torch path" in done.stderr
    assert took < 60


def test_build_directory_is_keyed_on_torch_and_install_prefix():
    import hashlib

    import torch

    directory = build_directory()
    assert torch.__version__.replace("+", "_") in directory
    assert hashlib.sha1(sys.prefix.encode()).hexdigest()[:10] in directory
