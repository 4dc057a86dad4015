"""The Batch and Files API end to end: the `openai` SDK uploads, creates, polls and downloads
against `pravaha serve`, a real redis-server and a real worker; then the gateway is SIGKILLed
mid-batch, a torn line is left at the end of its output, and a restarted gateway finishes the
batch with exactly one output line per input line, keeping the lines written before the kill.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.gateway_helpers import GatewayProcess
from tests.redis_helpers import RedisServer, WorkerProcess, require_redis, wait_until

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def completion(cid: str, prompt: str, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
            "body": {"model": "dummy:llama-tiny", "prompt": prompt, "max_tokens": max_tokens, **body}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_redis()
    tmp = tmp_path_factory.mktemp("batches")
    server = RedisServer(str(tmp)).start()
    worker = WorkerProcess(server.url, str(tmp / "worker.log"), consumer="batch-worker")
    try:
        worker.wait_ready()
        yield server, tmp
    finally:
        worker.stop()
        server.kill()


def gateway(cluster, name: str, *flags: str) -> GatewayProcess:
    server, tmp = cluster
    return GatewayProcess(server.url, str(tmp / f"{name}.log"), str(tmp / "files"), "--batch-lease", "2",
                          *flags).start()


def upload(oai: openai.OpenAI, tmp, lines: list) -> str:
    path = tmp / f"in-{time.monotonic_ns()}.jsonl"
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n" for ln in lines))
    with open(path, "rb") as f:
        meta = oai.files.create(file=f, purpose="batch")
    assert meta.object == "file" and meta.purpose == "batch" and meta.bytes == path.stat().st_size
    assert oai.files.retrieve(meta.id).filename == path.name
    return meta.id


def wait_final(oai: openai.OpenAI, batch_id: str, timeout: float = 90):
    final = ("completed", "failed", "cancelled", "expired")
    return wait_until(lambda: (b := oai.batches.retrieve(batch_id)).status in final and b, timeout,
                      f"batch {batch_id} to finish", interval=0.2)


def lines_of(oai: openai.OpenAI, file_id: str) -> list[dict]:
    data = oai.files.content(file_id).content
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def test_batch_flow_upload_create_poll_download(cluster):
    gw = gateway(cluster, "flow")
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    try:
        lines = [completion(f"ok-{i}", f"batch flow {i}", 4, temperature=0) for i in range(5)] + [
            completion("ok-0", "a duplicate custom_id"),
            b"not json",
            completion("bad-temp", "x", temperature=-1),
            {"custom_id": "chat-no-template", "method": "POST", "url": CHAT,
             "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}},
        ]
        file_id = upload(oai, cluster[1], lines)
        batch = oai.batches.create(input_file_id=file_id, endpoint=COMPLETIONS, completion_window="24h",
                                   metadata={"job": "flow"})
        assert batch.object == "batch" and batch.status in ("validating", "in_progress")
        assert batch.metadata == {"job": "flow"} and batch.input_file_id == file_id
        done = wait_final(oai, batch.id)
        assert done.status == "completed" and done.completed_at >= done.in_progress_at >= done.created_at
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (9, 5, 4)
        out = {o["custom_id"]: o for o in lines_of(oai, done.output_file_id)}
        assert sorted(out) == [f"ok-{i}" for i in range(5)]
        for o in out.values():
            body = o["response"]["body"]
            assert o["error"] is None and o["response"]["status_code"] == 200
            assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
            assert 0 < body["usage"]["completion_tokens"] <= 4
        errors = {o["id"]: o["error"]["code"] for o in lines_of(oai, done.error_file_id)}
        assert errors == {"batch_req_5": "duplicate_custom_id", "batch_req_6": "invalid_json",
                          "batch_req_7": "invalid_request", "batch_req_8": "invalid_request"}
        assert batch.id in [b.id for b in oai.batches.list(limit=100)]
        with pytest.raises(openai.NotFoundError):
            oai.batches.retrieve("batch_nosuch")
        with pytest.raises(openai.BadRequestError):
            oai.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    finally:
        gw.kill()


def test_cancel_a_running_batch(cluster):
    gw = gateway(cluster, "cancel", "--batch-max-in-flight", "2")
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    try:
        lines = [completion(f"c-{i}", f"cancel me {i}", 64, ignore_eos=True) for i in range(40)]
        batch = oai.batches.create(input_file_id=upload(oai, cluster[1], lines), endpoint=COMPLETIONS,
                                   completion_window="24h")
        wait_until(lambda: oai.batches.retrieve(batch.id).request_counts.completed >= 1, 60, "a first result")
        assert oai.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        done = wait_final(oai, batch.id)
        assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
        written = lines_of(oai, done.output_file_id) + lines_of(oai, done.error_file_id)
        assert 1 <= len(written) < 40 and len({o["id"] for o in written}) == len(written)
    finally:
        gw.kill()


def test_gateway_sigkilled_mid_batch_resumes_with_one_line_per_input_line(cluster):
    total = 40
    first = gateway(cluster, "before-kill", "--batch-max-in-flight", "2")
    oai = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
    lines = [completion(f"k-{i}", f"kill test {i}", 24, ignore_eos=True, temperature=0) for i in range(total)]
    batch = oai.batches.create(input_file_id=upload(oai, cluster[1], lines), endpoint=COMPLETIONS,
                               completion_window="24h")
    state = wait_until(lambda: (b := oai.batches.retrieve(batch.id)).request_counts.completed >= 4 and b, 60,
                       "some lines done")
    first.kill()
    out_path = cluster[1] / "files" / f"{state.output_file_id}.jsonl"
    before = out_path.read_bytes()
    assert 4 <= before.count(b"\n") < total, before.count(b"\n")
    with open(out_path, "ab") as f:   # a crash in the middle of a write leaves a torn line
        f.write(b'{"id": "batch_req_39", "custom_id": "k-3')
    second = gateway(cluster, "after-kill", "--batch-max-in-flight", "2")
    oai = openai.OpenAI(base_url=second.url + "/v1", api_key="unused", max_retries=0)
    try:
        done = wait_final(oai, batch.id)
        assert done.status == "completed" and done.request_counts.completed == total, done
        after = out_path.read_bytes()
        kept = before[:before.rfind(b"\n") + 1]
        assert after.startswith(kept), "lines written before the kill were rewritten"
        out = lines_of(oai, done.output_file_id)
        assert sorted(o["id"] for o in out) == sorted(f"batch_req_{i}" for i in range(total))
        assert sorted(o["custom_id"] for o in out) == sorted(f"k-{i}" for i in range(total))
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 24 for o in out)
        assert lines_of(oai, done.error_file_id) == []
    finally:
        second.kill()


def memory_lines(n: int, tag: str) -> list:
    """1 line in 64 a real generation (max_tokens 1); the rest duplicates, malformed or invalid."""
    lines = []
    for i in range(n):
        k = i % 64
        if k == 0:
            lines.append(completion(f"{tag}-{i}", f"{tag} memory {i}", 1))
        elif k < 40:
            lines.append(completion(f"{tag}-{i - k}", f"{tag} duplicate {i}", 1))
        elif k < 48:
            lines.append(b'{"custom_id": "x", "body": not json}')
        else:
            lines.append(completion(f"{tag}-{i}", f"{tag} p {i}", 1, top_p=7))
    return lines


def test_gateway_memory_flat_in_batch_size(cluster, monkeypatch):
    """The input is streamed and custom_ids live on disk: a batch file 10x larger (its upload,
    run and download) grows the gateway's peak RSS by a fraction of the file's own size."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")   # glibc's per-thread arenas would add noise of their own
    gw = gateway(cluster, "memory")
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    peaks, sizes = {}, {}
    try:
        for n in (8_000, 80_000):
            file_id = upload(oai, cluster[1], memory_lines(n, f"mem{n}"))
            sizes[n] = oai.files.retrieve(file_id).bytes
            batch = oai.batches.create(input_file_id=file_id, endpoint=COMPLETIONS, completion_window="24h")
            done = wait_final(oai, batch.id, timeout=150)
            assert done.request_counts.total == n and done.request_counts.completed == -(-n // 64), done
            assert len(oai.files.content(done.error_file_id).content.splitlines()) == n - done.request_counts.completed
            peaks[n] = peak_rss_kb(gw.proc.pid)
    finally:
        gw.kill()
    growth = peaks[80_000] - peaks[8_000]
    print(f"\n[gateway] peak RSS {peaks[8_000] / 1024:.1f} MiB after an 8k-line batch ({sizes[8_000] / 1e6:.1f} MB), "
          f"{peaks[80_000] / 1024:.1f} MiB after an 80k-line one ({sizes[80_000] / 1e6:.1f} MB)")
    assert growth < 4 * 1024 and sizes[80_000] > 12e6, (peaks, sizes)   # a third of the input


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
