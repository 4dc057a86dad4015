"""The README's commands and code, run as written (Redis URLs pointed at a test server)."""

import os
import re
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
PRAVAHA = [sys.executable, "-m", "worker.cli"]
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands():
    """Each `pravaha ...` line of the bash blocks as an argument list (placeholders dropped)."""
    out = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            if line.startswith("pravaha "):
                line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0])
                out.append([a.strip('"') for a in re.findall(r'"[^"]*"|\S+', line)][1:])
    return out


def run_python(code, timeout=300):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_engine_example_runs_as_written():
    result = run_python(code_blocks("python")[0])
    assert result.returncode == 0, result.stderr
    assert "length" in result.stdout and "'num_blocks'" in result.stdout


def test_step_loop_example_runs_after_the_first():
    setup, loop = code_blocks("python")[:2]
    result = run_python(setup + "\n" + loop.replace("        ...", "        print(delta.request_id, delta.finished)"))
    assert result.returncode == 0, result.stderr
    assert "req-1 True" in result.stdout


def test_offline_cli_commands_run():
    offline = [c for c in commands() if c[0] in ("demo", "generate")]
    assert {c[0] for c in offline} == {"demo", "generate"}
    for args in offline:
        result = subprocess.run(PRAVAHA + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr)
        if args[0] == "demo":
            assert "tokens/s" in result.stdout and "5 requests" in result.stdout


def test_serving_commands_and_client_example_run(redis_server):
    serving = {c[0]: [a.replace(DEFAULT_URL, redis_server.url) for a in c] for c in commands()
               if c[0] in ("worker", "submit")}
    worker = subprocess.Popen(PRAVAHA + serving["worker"] + ["--kv-cache-bytes", str(8 << 20)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        submitted = subprocess.run(PRAVAHA + serving["submit"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        assert len(submitted.stdout) > 0
        assert re.search(r"request \w+: (length|stop), \d+ prompt \+ \d+ completion tokens", submitted.stderr)
        client_code = next(b for b in code_blocks("python") if "from producer import Client" in b)
        result = run_python(client_code.replace(DEFAULT_URL, redis_server.url), timeout=120)
        assert result.returncode == 0, result.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker.stderr.read()


def test_makefile_targets_exist_as_documented():
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    for target in ("demo:", "test:"):
        assert target in makefile
    assert "make test" in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()


def test_cli_reports_bad_model_cleanly():
    result = subprocess.run(PRAVAHA + ["generate", "hi", "--model", "dummy:nope"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown dummy preset 'nope'" in result.stderr


def test_bulk_commands_run(tmp_path, redis_server):
    import json

    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"line {i}", "max_tokens": 4}} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    bulk = [c for c in commands() if c[0] == "bulk"]
    assert len(bulk) == 3
    embedded, via_redis, rq = bulk
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(PRAVAHA + embedded, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5
    (tmp_path / "out.jsonl").unlink()
    worker = subprocess.Popen(PRAVAHA + ["worker", "--redis-url", redis_server.url, "--metrics-port", "-1",
                                         "--kv-cache-bytes", str(8 << 20)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        args = [a.replace(DEFAULT_URL, redis_server.url) for a in via_redis]
        result = subprocess.run(PRAVAHA + args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        outs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert sorted(o["custom_id"] for o in outs) == [f"c{i}" for i in range(5)]
        assert all(o["error"] is None for o in outs)
        args = [a.replace(DEFAULT_URL, redis_server.url) for a in rq]
        result = subprocess.run(PRAVAHA + args, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0 and "pravaha-bulk" in result.stdout
    finally:
        worker.terminate()
        worker.wait(60)


def test_quick_bench_command_runs(tmp_path):
    import json

    bench = [c for c in commands() if c[0] == "bench"]
    assert bench == [["bench", "--quick", "--skip-hf"]]
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(PRAVAHA + bench[0], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "Pravaha Engine.generate" in result.stdout and "W2 (shared 512-token prefix)" in result.stdout
    report = json.loads((tmp_path / "bench-results" / "bench.json").read_text())
    assert report["workload"]["requests"] == 16
    assert report["matmul_gflops"] == max(report["matmul"]["rates"].values()) > 0     # the best path is the roofline
    assert report["stream_gbps"] > 0 and report["bound_seconds"] >= report["roofline_seconds"]
    rows = {r["system"]: r for r in report["rows"]}
    engine = rows["Pravaha Engine.generate"]
    assert engine["tokens"] == report["workload"]["output_tokens"] and engine["tok_s"] > 0
    assert engine["bound_share"] >= engine["roofline_share"] > 0
    assert report["kv_efficiency"]["paged_seqs"] > report["kv_efficiency"]["contiguous_seqs"]
