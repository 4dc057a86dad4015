"""`pravaha serve` in a real subprocess (uvicorn), for the gateway and batch tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.redis_helpers import ROOT
from worker.embedded import free_port


class GatewayProcess:
    """The gateway on a free port; logs to a file; can be SIGKILLed and started again."""

    def __init__(self, redis_url: str, log_path: str, files_dir: str, *flags: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [sys.executable, "-m", "worker.cli", "serve", "--redis-url", redis_url,
                     "--port", str(self.port), "--files-dir", files_dir, *flags]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> GatewayProcess:
        log = open(self.log_path, "a")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PRAVAHA_API_KEYS", None)
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if get(self.url + "/health")[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"{name} not in the scrape")
