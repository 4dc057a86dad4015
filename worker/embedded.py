"""An embedded Redis for demos and laptops: redis-server on a free port, else fakeredis over TCP.

The child redis-server dies with this process, even on SIGKILL (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedRedis:
    """`with EmbeddedRedis() as url:` gives a private Redis for the block's lifetime."""

    def __init__(self, prefer_server: bool = True):
        self.prefer_server = prefer_server
        self.proc: subprocess.Popen | None = None
        self.fake = None
        self.kind = ""
        self.url = ""

    def start(self) -> str:
        port = free_port()
        binary = shutil.which("redis-server")
        if binary and self.prefer_server:
            self._dir = tempfile.mkdtemp(prefix="pravaha-redis-")
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self._dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
            atexit.register(self.stop)
            self.kind = "redis-server"
        else:
            import threading

            from fakeredis import TcpFakeServer

            self.fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
            threading.Thread(target=self.fake.serve_forever, daemon=True).start()
            self.kind = "fakeredis"
        self.url = f"redis://127.0.0.1:{port}/0"
        _wait_ready(self.url)
        return self.url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self.proc = None
        if self.fake is not None:
            self.fake.shutdown()
            self.fake.server_close()
            self.fake = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_ready(url: str, timeout: float = 10.0) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis at {url} did not start") from None
            time.sleep(0.05)
        finally:
            client.close()


__all__ = ["EmbeddedRedis", "free_port"]
