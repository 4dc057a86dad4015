"""Dependencies run one way: producer -> wire schema; worker -> engine + producer; never back.

And `pip install pravaha` (no extras) is a working client without torch.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import venv

import pytest

from tests.redis_helpers import ROOT

# What producer/ may import from this repository: its own modules and SamplingParams.
PRODUCER_MAY_IMPORT = ("producer", "pravaha_core.sampling_params")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names |= {module} | ({f"{module}.{a.name}" for a in node.names} if not node.module else set())
    return names


def repo_imports(package: str) -> dict[str, set[str]]:
    first_party = ("pravaha_core", "worker", "producer", "benchmarks")
    return {str(p.relative_to(ROOT)): {m for m in imported_modules(p) if m.split(".")[0] in first_party}
            for p in sorted(pathlib.Path(ROOT, package).rglob("*.py"))}


def test_producer_imports_only_the_wire_schema():
    for path, modules in repo_imports("producer").items():
        wrong = sorted(m for m in modules if not m.startswith(PRODUCER_MAY_IMPORT))
        assert not wrong, f"{path} imports {wrong}: producer/ depends on wire, names and SamplingParams only"


def test_engine_imports_no_service_and_the_service_no_benchmarks():
    for path, modules in repo_imports("pravaha_core").items():
        wrong = sorted(m for m in modules if m.split(".")[0] in ("worker", "producer", "benchmarks"))
        assert not wrong, f"{path} imports {wrong}: the engine knows nothing of Redis or the service"
    for path, modules in repo_imports("worker").items():
        forbidden = ("pravaha_core.kernels", "pravaha_core.models") + (
            () if path == os.path.join("worker", "cli.py") else ("benchmarks",))   # `pravaha bench` runs them
        wrong = sorted(m for m in modules if m.startswith(forbidden))
        assert not wrong, f"{path} imports {wrong}: the worker uses the engine's public API only"


def test_client_modules_import_without_torch():
    code = ("import sys\n"
            "import producer, producer.bulk, producer.aio, pravaha_core.scheduler, pravaha_core.block_manager\n"
            "import pravaha_core.config, worker.settings, worker.cli\n"
            "worker.cli.build_parser({})\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy'))\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """A fresh venv with `pip install pravaha` from a copy of this checkout: the base install."""
    tmp = tmp_path_factory.mktemp("client-install")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".torch_ext", "tests", "k8s", "scripts", "*.egg-info", "build", "__pycache__",
        ".pytest_cache", ".hypothesis", "bench-results"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    install = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return env_dir


def test_base_install_has_no_torch(client_venv):
    python = str(client_venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               check=True).stdout.lower()
    for heavy in ("torch", "transformers", "tokenizers", "safetensors", "nvidia-", "ninja"):
        assert f"\n{heavy}" not in "\n" + installed, f"the base install pulled {heavy}:\n{installed}"
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=client_venv)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    kernels = subprocess.run([python, "-c", "import pravaha_core.kernels as k, os; print(os.listdir(k.__path__[0]))"],
                             capture_output=True, text=True, cwd=client_venv)
    assert "fused.cpp" in kernels.stdout, kernels.stdout + kernels.stderr   # the sources built on first use


def test_make_prefers_the_cpu_torch_wheel_when_its_index_answers(tmp_path):
    """scripts/install_torch.py (what `make` runs): PyTorch's CPU index when it answers, the
    default index within seconds when it does not. Here a local server plays the CPU index."""
    import http.server
    import threading
    import time

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = [sys.executable, os.path.join(ROOT, "scripts", "install_torch.py"), "torch==2.13.0", "--dry-run"]
    no_gpu = dict(os.environ, PATH=str(tmp_path))    # no nvidia-smi on this PATH
    try:
        index = f"http://127.0.0.1:{server.server_port}"
        up = subprocess.run(script, env=dict(no_gpu, TORCH_CPU_INDEX=index), capture_output=True, text=True)
        assert up.returncode == 0 and f"--index-url {index}" in up.stdout and "CPU build" in up.stdout
    finally:
        server.shutdown()
    started = time.monotonic()
    down = subprocess.run(script, env=dict(no_gpu, TORCH_CPU_INDEX=index), capture_output=True, text=True)
    assert down.returncode == 0 and "--index-url" not in down.stdout and "unreachable" in down.stdout
    assert time.monotonic() - started < 10


def test_base_install_submits_to_a_real_worker(client_venv, redis_server, tmp_path):
    """The base install's `pravaha submit` and `pravaha bulk --redis-url` against a worker
    (run from the full install), and a clear error where the engine is needed."""
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--redis-url", redis_server.url,
                               "--metrics-port", "-1", "--kv-cache-bytes", str(8 << 20)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pravaha = str(client_venv / "bin" / "pravaha")
    try:
        submitted = subprocess.run([pravaha, "submit", "hello", "--redis-url", redis_server.url, "--max-tokens", "5",
                                    "--json", "--timeout", "300"], cwd=tmp_path, capture_output=True, text=True,
                                   timeout=330)
        assert submitted.returncode == 0, submitted.stderr
        result = __import__("json").loads(submitted.stdout)
        assert result["finish_reason"] == "length" and len(result["token_ids"]) == 5
        assert result["usage"]["completion_tokens"] == 5
        (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                                           '"body": {"prompt": "hi", "max_tokens": 3}}\n')
        bulk = subprocess.run([pravaha, "bulk", "in.jsonl", "--out", "out.jsonl", "--redis-url", redis_server.url],
                              cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert bulk.returncode == 0, bulk.stderr
        assert '"custom_id": "a"' in (tmp_path / "out.jsonl").read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        stopped = worker.wait(timeout=60)
    assert stopped == 0, worker.stderr.read()
    needs_engine = subprocess.run([pravaha, "generate", "hi"], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=60)
    assert needs_engine.returncode == 2 and "pip install 'pravaha[worker]'" in needs_engine.stderr
