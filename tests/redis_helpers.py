"""Real redis-server instances and real worker processes for integration tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis

from worker.embedded import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_REDIS = shutil.which("redis-server") is not None


def wait_until(cond, timeout: float, what: str, interval: float = 0.02, on_fail=None, exc=AssertionError):
    """Poll `cond` until it returns something truthy (returned); `exc` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_fail()}" if on_fail else ""
            raise exc(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def require_redis() -> None:
    if not HAVE_REDIS:
        if os.environ.get("PRAVAHA_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed but PRAVAHA_REQUIRE_REDIS is set")
        pytest.skip("redis-server is not installed")


class RedisServer:
    """A redis-server on a free port in its own directory; can be killed and restarted (AOF)."""

    def __init__(self, directory: str, appendonly: bool = False):
        self.dir = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", self.dir, "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path):
    require_redis()
    server = RedisServer(str(tmp_path)).start()
    yield server
    server.kill()


@pytest.fixture
def aof_redis_server(tmp_path):
    require_redis()
    server = RedisServer(str(tmp_path), appendonly=True).start()
    yield server
    server.kill()


class WorkerProcess:
    """`pravaha worker` in a subprocess; logs go to a file the test can read."""

    def __init__(self, url: str, log_path: str, model: str = "dummy:llama-tiny", **flags):
        self.log_path = log_path
        args = [sys.executable, "-m", "worker.cli", "worker", "--redis-url", url, "--model", model,
                "--kv-cache-bytes", str(flags.pop("kv_cache_bytes", 8 << 20)),
                "--metrics-port", str(flags.pop("metrics_port", -1))]
        for key, value in flags.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while "serving" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready:\n{self.output()}")
            time.sleep(0.1)
        return self

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def start_worker(tmp_path):
    """start_worker(url, **flags) -> a ready WorkerProcess; all are killed at teardown."""
    started: list[WorkerProcess] = []

    def start(url: str, name: str | None = None, **flags) -> WorkerProcess:
        name = name or f"w{len(started)}"
        proc = WorkerProcess(url, str(tmp_path / f"{name}.log"), consumer=name, **flags)
        started.append(proc)
        return proc.wait_ready()

    yield start
    for proc in started:
        proc.stop()
