"""`pravaha bulk` end to end, with real processes: redis-server, `pravaha worker` subprocesses,
the bulk command itself as a subprocess (SIGKILLed mid-file and rerun), and a real `rq worker`.

What is checked: OpenAI Batch JSONL in, OpenAI batch output JSONL out, exactly one output line
per input line whatever happens (malformed lines, duplicate custom_ids, a crash and a torn last
line); lines written before a crash are neither redone nor rewritten; the embedded mode leaves
no redis-server behind; RQ mode reports progress and fails cleanly; the bulk process's peak RSS
does not grow with the size of the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import redis

from producer.names import Names
from producer.wire import Result, decode
from tests.redis_helpers import ROOT, RedisServer, WorkerProcess, require_redis, wait_until

NAMES = Names()
SUMMARY = re.compile(r"(\d+) lines \(([^)]*)\); (\d+) already done before this run")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


# ---- helpers ------------------------------------------------------------------------------


def completion(cid: str, prompt, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
            "body": {"model": "dummy:llama-tiny", "prompt": prompt, "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def chat(cid: str, messages: list[dict], max_tokens: int = 4, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": "tiny-chat", "messages": messages, "max_tokens": max_tokens, **body}}


def write_jsonl(path, lines, trailing_newline: bool = True) -> None:
    """`lines`: dicts (JSON-encoded) or bytes (written as they are)."""
    raw = [ln if isinstance(ln, bytes) else json.dumps(ln).encode() for ln in lines]
    with open(path, "wb") as f:
        f.write(b"\n".join(raw) + (b"\n" if trailing_newline else b""))


def read_output(path) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "the output does not end with a complete line"
    return [json.loads(line) for line in data.splitlines()]


def by_line(out: list[dict], total: int) -> dict[int, dict]:
    """Output lines keyed by input line number; exactly one per input line."""
    ids = [o["id"] for o in out]
    assert len(ids) == len(set(ids)), f"duplicate output ids: {[i for i, c in Counter(ids).items() if c > 1][:5]}"
    lines = {int(o["id"].removeprefix("batch_req_")): o for o in out}
    assert sorted(lines) == list(range(total)), (
        f"{len(out)} output lines for {total} input lines; missing "
        f"{sorted(set(range(total)) - set(lines))[:10]}")
    return lines


def check_completion_line(o: dict, custom_id: str, max_tokens: int, chat_line: bool = False) -> dict:
    """An OpenAI batch output line for a successful request; returns the response body."""
    assert set(o) == {"id", "custom_id", "response", "error"}
    assert o["custom_id"] == custom_id and o["error"] is None, o
    resp = o["response"]
    assert resp["status_code"] == 200 and isinstance(resp["request_id"], str) and resp["request_id"]
    body = resp["body"]
    assert body["object"] == ("chat.completion" if chat_line else "text_completion")
    assert body["id"].endswith(resp["request_id"]) and isinstance(body["created"], int)
    assert body["choices"], body
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length"), choice
        if chat_line:
            assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        else:
            assert isinstance(choice["text"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= max_tokens * len(body["choices"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


def check_error_line(o: dict, custom_id: str | None, code: str, *words: str) -> None:
    assert set(o) == {"id", "custom_id", "response", "error"}
    assert o["response"] is None and o["custom_id"] == custom_id, o
    err = o["error"]
    assert set(err) == {"code", "message"} and err["code"] == code, o
    assert isinstance(err["message"], str) and err["message"]
    for word in words:
        assert word in err["message"], f"{word!r} not in the error message {err['message']!r}"


def summary_of(stdout: str) -> tuple[int, dict[str, int], int]:
    m = SUMMARY.search(stdout)
    assert m, f"no summary in the output:\n{stdout}"
    outcomes = dict((k, int(v)) for k, v in (part.rsplit(" ", 1) for part in m.group(2).split(", ") if part))
    return int(m.group(1)), outcomes, int(m.group(3))


def results(r: redis.Redis, request_ids: list[str]) -> list[Result | None]:
    raw = []
    for i in range(0, len(request_ids), 500):
        raw += r.mget([NAMES.result(rid) for rid in request_ids[i:i + 500]])
    return [None if d is None else decode(d, Result) for d in raw]


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str
    peak_rss_kb: int    # the highest VmHWM seen while polling the process, in KiB
    wall_s: float


def vm_hwm_kb(pid: int) -> int:
    """The process's own peak RSS so far (VmHWM), 0 when unreadable. Unlike ru_maxrss from
    wait4/RUSAGE_CHILDREN, it does not include the pytest image the child was forked from."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Bulk:
    """`python -m worker.cli bulk ...` in a subprocess; its peak RSS is polled while it runs."""

    def __init__(self, tmp_path, *args, name: str = "bulk"):
        self.out_path, self.err_path = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "bulk", *map(str, args)], cwd=ROOT,
                                         stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = self.proc.pid
        self.peak_kb = 0

    def poll(self) -> int | None:
        """The exit status once exited (it stays a zombie until then, so VmHWM stays readable)."""
        self.peak_kb = max(self.peak_kb, vm_hwm_kb(self.pid))
        return self.proc.poll()

    def wait(self, timeout: float) -> Ran:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"bulk did not finish within {timeout}s\n{self.text()}")
            time.sleep(0.01)
        return Ran(self.proc.returncode, *self.streams(), self.peak_kb, time.monotonic() - self.started)

    def kill(self) -> Ran:
        self.proc.send_signal(signal.SIGKILL)
        return self.wait(30)

    def streams(self) -> tuple[str, str]:
        return self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")

    def text(self) -> str:
        out, err = self.streams()
        return f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"


def bulk(tmp_path, *args, timeout: float = 150, name: str = "bulk") -> Ran:
    proc = Bulk(tmp_path, *args, name=name)
    ran = proc.wait(timeout)
    assert ran.rc == 0, f"bulk exited {ran.rc}\n{proc.text()}"
    return ran


def complete_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def children(pid: int, name: str) -> list[int]:
    """Live (non-zombie) child processes of `pid` whose command name is `name` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and comm == name and state != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


# ---- a Redis and two workers shared by the tests that need them ----------------------------
@dataclass
class Cluster:
    server: RedisServer
    workers: list[WorkerProcess]

    @property
    def url(self) -> str:
        return self.server.url

    def logs(self) -> str:
        return "\n".join(f"---- {w.log_path} ----\n{w.output()[-3000:]}" for w in self.workers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """redis-server + two `pravaha worker` processes (consumers w0 and w1) for the module.
    Each test tags its prompts, so request ids (derived from line content) never collide."""
    require_redis()
    directory = tmp_path_factory.mktemp("bulk-cluster")
    server = RedisServer(str(directory)).start()
    workers = []
    try:
        workers = [WorkerProcess(server.url, str(directory / f"{n}.log"), consumer=n) for n in ("w0", "w1")]
        for w in workers:
            w.wait_ready()
        yield Cluster(server, workers)
    finally:
        for w in workers:
            w.stop()
        server.kill()


# ---- 1. thousands of lines through two worker processes ----------------------------------
def test_two_workers_openai_batch_output(cluster, tmp_path):
    n = 2000
    lines = [completion(f"req-{i}", f"two workers {i}: once upon a time", max_tokens=1 + i % 4) for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    ran = bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--redis-url", cluster.url,
               "--max-in-flight", 256)
    print(f"\n[bulk] {n} lines through 2 workers in {ran.wall_s:.1f}s: {ran.stdout.strip()}")

    out = read_output(tmp_path / "out.jsonl")
    assert len(out) == n
    got = by_line(out, n)
    bodies = {i: check_completion_line(got[i], f"req-{i}", 1 + i % 4) for i in range(n)}
    assert all(body["model"] == "dummy:llama-tiny" for body in bodies.values())
    assert summary_of(ran.stdout) == (n, {"ok": n}, 0)
    tokens = re.search(r"(\d+) prompt \+ (\d+) completion tokens", ran.stdout)
    assert tokens and (int(tokens.group(1)), int(tokens.group(2))) == (
        sum(b["usage"]["prompt_tokens"] for b in bodies.values()),
        sum(b["usage"]["completion_tokens"] for b in bodies.values()))

    # The results the workers stored say who generated each line, and match the output.
    rids = [got[i]["response"]["request_id"] for i in range(n)]
    assert len(set(rids)) == n
    stored = results(cluster.server.client(), rids)
    assert all(r is not None for r in stored)
    for i, res in enumerate(stored):
        assert res.request_id == rids[i] and res.text == bodies[i]["choices"][0]["text"]
        assert res.usage.completion_tokens == bodies[i]["usage"]["completion_tokens"]
    by_worker = Counter(res.worker for res in stored)
    print(f"[bulk] lines per worker: {dict(by_worker)}")
    assert set(by_worker) == {"w0", "w1"}, by_worker


# ---- 2. SIGKILL mid-file, a torn last line, rerun -----------------------------------------
def test_sigkill_mid_file_then_rerun_writes_each_line_once(cluster, tmp_path):
    n = 1500
    lines = [completion(f"crash-{i}", f"crash test {i}: the river", max_tokens=1 + i % 8) for i in range(n)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"
    args = (tmp_path / "in.jsonl", "--out", out_path, "--redis-url", cluster.url, "--max-in-flight", 256)

    first = Bulk(tmp_path, *args, name="first")
    wait_until(lambda: complete_lines(out_path) >= 150 or first.proc.poll() is not None, 90,
               "the first run to write 150 lines")
    killed = first.kill()
    assert killed.rc == -signal.SIGKILL, f"the first run finished before the kill\n{first.text()}"
    before = out_path.read_bytes()
    before = before[:before.rfind(b"\n") + 1]        # what was complete at the kill
    done_before = [json.loads(line) for line in before.splitlines()]
    assert 150 <= len(done_before) < n, len(done_before)
    print(f"\n[bulk] killed after {len(done_before)} of {n} lines")

    # A torn write: half of the next line, no newline.
    undone = min(set(range(n)) - {int(o["id"].removeprefix("batch_req_")) for o in done_before})
    torn = json.dumps({"id": f"batch_req_{undone}", "custom_id": f"crash-{undone}",
                       "response": {"status_code": 200, "request_id": "x"}, "error": None}).encode()
    with open(out_path, "ab") as f:
        f.write(torn[: len(torn) // 2])

    rerun_started = time.time()
    ran = bulk(tmp_path, *args, name="rerun")
    print(f"[bulk] rerun: {ran.stdout.strip()}")
    assert summary_of(ran.stdout) == (n, {"ok": n}, len(done_before))

    final = out_path.read_bytes()
    assert final.startswith(before), "lines written before the kill were rewritten"
    assert torn[: len(torn) // 2] + b"\n" not in final
    out = read_output(out_path)
    got = by_line(out, n)
    assert sorted(o["custom_id"] for o in out) == sorted(f"crash-{i}" for i in range(n))
    for i in range(n):
        check_completion_line(got[i], f"crash-{i}", 1 + i % 8)

    # Not redone: the results behind the lines written before the kill predate the rerun.
    stored = results(cluster.server.client(), [o["response"]["request_id"] for o in done_before])
    assert all(r is not None and r.finished_at < rerun_started for r in stored)

    # A third run on the finished output changes nothing and submits nothing.
    backlog = cluster.server.client().xlen(NAMES.stream)
    ran = bulk(tmp_path, *args, name="third", timeout=60)
    assert summary_of(ran.stdout) == (n, {"ok": n}, n)
    assert out_path.read_bytes() == final
    assert cluster.server.client().xlen(NAMES.stream) <= backlog


# ---- 3. malformed lines, duplicates, chat ---------------------------------------------------
def test_malformed_and_duplicate_lines_get_error_lines(cluster, tmp_path):
    tag = "malformed"
    good = completion("good-0", f"{tag} hello", 3)
    lines = [
        good,                                                                             # 0 ok
        b"this is not json {",                                                            # 1
        {"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}},                  # 2 no custom_id
        {**completion("x", "y"), "custom_id": 17},                                        # 3 custom_id not a string
        {**completion("bad-url", f"{tag} u"), "url": "/v1/embeddings"},                   # 4
        {**completion("bad-method", f"{tag} m"), "method": "GET"},                        # 5
        completion("bad-top-p", f"{tag} p", top_p=7),                                     # 6
        completion("unknown-field", f"{tag} f", frobnicate=True),                         # 7
        completion("prompt-list", ["one prompt", "two prompts"]),                          # 8
        completion("good-0", f"{tag} a duplicate custom_id", 3),                          # 9
        chat("chat-no-template", [{"role": "user", "content": "hi"}]),                    # 10
        b"[1, 2, 3]",                                                                     # 11 not an object
        b"",                                                                              # 12 blank line
        {"custom_id": "body-not-object", "method": "POST", "url": COMPLETIONS, "body": "hi"},  # 13
        completion("bad-temperature", f"{tag} t", temperature=-1),                        # 14
        completion("good-n2", f"{tag} two samples", 3, n=2, temperature=0.8, seed=7),     # 15 ok
        completion("good-logprobs", f"{tag} logprobs", 3, logprobs=2),                    # 16 ok
        completion("good-ids", [72, 105, 33], 3),                                         # 17 ok (token ids)
        completion("good-ids", f"{tag} again", 3),                                        # 18 duplicate
        completion("good-last", f"{tag} the last line has no newline", 3),                # 19 ok
    ]
    write_jsonl(tmp_path / "in.jsonl", lines, trailing_newline=False)
    ran = bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--redis-url", cluster.url,
               timeout=90)
    got = by_line(read_output(tmp_path / "out.jsonl"), len(lines))

    check_completion_line(got[0], "good-0", 3)
    check_error_line(got[1], None, "invalid_json", "line 2")
    check_error_line(got[2], None, "invalid_request", "custom_id")
    check_error_line(got[3], None, "invalid_request", "custom_id")
    check_error_line(got[4], "bad-url", "invalid_request", "url", "/v1/embeddings")
    check_error_line(got[5], "bad-method", "invalid_request", "method", "GET")
    check_error_line(got[6], "bad-top-p", "invalid_request", "top_p")
    check_error_line(got[7], "unknown-field", "invalid_request", "frobnicate")
    check_error_line(got[8], "prompt-list", "invalid_request", "prompt")
    check_error_line(got[9], "good-0", "duplicate_custom_id", "good-0", "line 1")
    check_error_line(got[10], "chat-no-template", "generation_error", "chat template")
    check_error_line(got[11], None, "invalid_request")
    check_error_line(got[12], None, "invalid_json")
    check_error_line(got[13], "body-not-object", "invalid_request", "body")
    check_error_line(got[14], "bad-temperature", "invalid_request", "temperature")
    body = check_completion_line(got[15], "good-n2", 3)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    body = check_completion_line(got[16], "good-logprobs", 3)
    lp = body["choices"][0]["logprobs"]   # OpenAI's completion logprobs: k alternatives per token
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) \
        == body["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
    body = check_completion_line(got[17], "good-ids", 3)
    assert body["usage"]["prompt_tokens"] == 3
    check_error_line(got[18], "good-ids", "duplicate_custom_id", "line 18")
    check_completion_line(got[19], "good-last", 3)
    total, outcomes, resumed = summary_of(ran.stdout)
    assert (total, resumed) == (len(lines), 0)
    assert outcomes == {"ok": 5, "invalid_json": 2, "invalid_request": 10, "duplicate_custom_id": 2,
                        "generation_error": 1}


def run_lines(cluster, tmp_path, lines) -> dict:
    """Bulk-run `lines` against the cluster; the output lines by input line number."""
    write_jsonl(tmp_path / "in.jsonl", lines)
    proc = Bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--redis-url", cluster.url)
    ran = proc.wait(90)
    assert ran.rc == 0, f"bulk exited {ran.rc}\n{proc.text()}"
    return by_line(read_output(tmp_path / "out.jsonl"), len(lines))


def test_bad_prompt_or_messages_get_error_lines(cluster, tmp_path):
    tag = "bad-prompt"
    lines = [
        completion("ok-0", f"{tag} first", 2),
        {"custom_id": "no-prompt", "method": "POST", "url": COMPLETIONS, "body": {"max_tokens": 2}},
        completion("empty-prompt", "", 2),
        completion("number-prompt", 42, 2),
        chat("message-without-content", [{"role": "user"}]),
        chat("messages-not-a-list", "hello"),
        completion("ok-1", f"{tag} last", 2),
    ]
    got = run_lines(cluster, tmp_path, lines)
    check_completion_line(got[0], "ok-0", 2)
    check_completion_line(got[6], "ok-1", 2)
    for i, word in [(1, "prompt"), (2, "prompt"), (3, "prompt"), (4, "messages"), (5, "messages")]:
        check_error_line(got[i], lines[i]["custom_id"], "invalid_request", word)


def test_lone_surrogate_lines_get_error_lines(cluster, tmp_path):
    lines = [
        completion("ok-0", "surrogate first", 2),
        b'{"custom_id": "sur\\ud800rogate", "method": "POST", "url": "/v1/completions", '
        b'"body": {"prompt": "hi", "max_tokens": 2}}',
        b'{"custom_id": "sur-prompt", "method": "POST", "url": "/v1/completions", '
        b'"body": {"prompt": "a \\udc00 b", "max_tokens": 2}}',
        completion("ok-1", "surrogate last", 2),
    ]
    got = run_lines(cluster, tmp_path, lines)
    check_completion_line(got[0], "ok-0", 2)
    check_completion_line(got[3], "ok-1", 2)
    assert got[1]["error"] is not None and got[1]["response"] is None
    assert got[2]["error"] is not None and got[2]["response"] is None


def test_custom_id_of_a_malformed_line_counts_for_duplicates(cluster, tmp_path):
    lines = [
        {**completion("taken", "dup-of-malformed u", 2), "url": "/v1/embeddings"},
        completion("taken", "dup-of-malformed ok", 2),
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--redis-url", cluster.url, timeout=60)
    got = by_line(read_output(tmp_path / "out.jsonl"), len(lines))
    check_error_line(got[0], "taken", "invalid_request", "url")
    check_error_line(got[1], "taken", "duplicate_custom_id", "line 1")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny llama checkpoint whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    from tests.checkpoints import make_checkpoint

    path = make_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-chat")))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(path)
    return path


def test_chat_line_with_a_chat_template_embedded(chat_checkpoint, tmp_path):
    lines = [
        chat("chat-1", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], 5),
        completion("plain-1", "The quick brown fox", 5),
        chat("chat-2", [{"role": "user", "content": "Paged attention?"}], 4, logprobs=True, top_logprobs=2),
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    ran = bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--model", chat_checkpoint,
               timeout=180)
    got = by_line(read_output(tmp_path / "out.jsonl"), len(lines))
    body = check_completion_line(got[0], "chat-1", 5, chat_line=True)
    assert body["model"] == "tiny-chat" and body["id"].startswith("chatcmpl-")
    # The template wraps the messages in "role: content" lines, so the prompt is longer than them.
    assert body["usage"]["prompt_tokens"] > len("Be brief.Hello there") // 4
    assert check_completion_line(got[1], "plain-1", 5)["object"] == "text_completion"
    body = check_completion_line(got[2], "chat-2", 4, chat_line=True)
    content = body["choices"][0]["logprobs"]["content"]   # OpenAI's chat logprobs
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} and len(t["top_logprobs"]) == 2 for t in content)
    assert summary_of(ran.stdout)[:2] == (3, {"ok": 3})


# ---- 4. the embedded default leaves no redis-server behind ---------------------------------
def test_embedded_default_leaves_no_redis_server(tmp_path):
    require_redis()
    n = 20
    write_jsonl(tmp_path / "in.jsonl", [completion(f"e-{i}", f"embedded {i}", 4) for i in range(n)])
    proc = Bulk(tmp_path, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--model", "dummy:llama-tiny")
    seen: dict[int, str] = {}    # pid -> its working directory (redis-server chdirs to its --dir)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in children(proc.pid, "redis-server"):
            try:
                seen[pid] = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                seen.setdefault(pid, "")
        time.sleep(0.02)
    ran = proc.wait(5)
    assert ran.rc == 0, proc.text()
    assert seen, "the embedded run never started a redis-server child"
    wait_until(lambda: not any(alive(pid) for pid in seen), 10, "the embedded redis-server to exit")
    dirs = [d for d in seen.values() if "pravaha-redis-" in d]
    assert dirs and not any(os.path.exists(d) for d in dirs), f"the embedded Redis left its directory: {dirs}"
    got = by_line(read_output(tmp_path / "out.jsonl"), n)
    for i in range(n):
        check_completion_line(got[i], f"e-{i}", 4)
    assert summary_of(ran.stdout)[:2] == (n, {"ok": n})

    # SIGKILLed mid-file, the embedded redis-server still dies with it (PR_SET_PDEATHSIG).
    n = 3000
    write_jsonl(tmp_path / "big.jsonl", [completion(f"k-{i}", f"embedded kill {i}", 16) for i in range(n)])
    out_path = tmp_path / "big.out.jsonl"
    proc = Bulk(tmp_path, tmp_path / "big.jsonl", "--out", out_path, name="killed")
    server = wait_until(lambda: children(proc.pid, "redis-server") or proc.proc.poll() is not None, 120,
                        "the embedded redis-server")
    assert server is not True and proc.proc.poll() is None, proc.text()
    wait_until(lambda: complete_lines(out_path) >= 1 or proc.proc.poll() is not None, 120, "the first output line")
    leaked = []
    for pid in server:
        try:
            leaked.append(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            pass
    assert proc.kill().rc == -signal.SIGKILL, "the run finished before the kill"
    wait_until(lambda: not any(alive(pid) for pid in server), 10, "the orphaned redis-server to die")
    for d in leaked:   # SIGKILL gave the embedded Redis no chance to remove its directory
        if os.path.basename(d).startswith("pravaha-redis-"):
            shutil.rmtree(d, ignore_errors=True)


# ---- 5. RQ ----------------------------------------------------------------------------------
def test_rq_job_runs_reports_progress_and_fails_cleanly(cluster, tmp_path):
    from rq import Queue
    from rq.job import Job, JobStatus
    from rq.registry import FailedJobRegistry
    from rq.serializers import JSONSerializer

    n = 300
    write_jsonl(tmp_path / "in.jsonl", [completion(f"rq-{i}", f"rq job {i}", 1 + i % 3) for i in range(n)])
    (tmp_path / "garbage.jsonl").write_bytes(b"this is not a pravaha output line\n")

    def enqueue(out, name) -> str:
        ran = bulk(tmp_path, tmp_path / "in.jsonl", "--out", out, "--redis-url", cluster.url, "--rq",
                   timeout=60, name=name)
        m = re.search(r"enqueued RQ job (\S+) on queue pravaha-bulk", ran.stdout)
        assert m, ran.stdout
        return m.group(1)

    good = enqueue(tmp_path / "out.jsonl", "enqueue-good")
    garbage = enqueue(tmp_path / "garbage.jsonl", "enqueue-garbage")
    no_dir = enqueue(tmp_path / "no" / "such" / "dir" / "out.jsonl", "enqueue-nodir")
    conn = redis.Redis.from_url(cluster.url)
    queue = Queue("pravaha-bulk", connection=conn, serializer=JSONSerializer)
    assert queue.job_ids == [good, garbage, no_dir]
    assert not (tmp_path / "out.jsonl").exists(), "--rq ran the job itself instead of enqueuing it"

    with open(tmp_path / "rq.log", "wb") as log:
        rq = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "pravaha-bulk",
                               "-S", "json", "--url", cluster.url, "--burst"], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
        try:
            rc = rq.wait(150)
        finally:
            if rq.poll() is None:
                rq.kill()
                rq.wait()
    rq_log = (tmp_path / "rq.log").read_text(errors="replace")
    assert rc == 0, rq_log

    job = Job.fetch(good, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED, rq_log
    progress = job.meta["progress"]
    print(f"\n[bulk] rq job meta: {progress}; result: {job.return_value()}")
    assert progress["done"] == progress["total"] == n
    assert job.return_value()["total"] == n and job.return_value()["outcomes"] == {"ok": n}
    got = by_line(read_output(tmp_path / "out.jsonl"), n)
    for i in range(n):
        check_completion_line(got[i], f"rq-{i}", 1 + i % 3)

    failed = FailedJobRegistry(queue=queue)
    assert set(failed.get_job_ids()) == {garbage, no_dir}
    job = Job.fetch(garbage, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "not a pravaha output line" in job.exc_info, job.exc_info
    assert (tmp_path / "garbage.jsonl").read_bytes() == b"this is not a pravaha output line\n", \
        "a failed job damaged an output file that was not its own"
    job = Job.fetch(no_dir, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "No such file or directory" in job.exc_info, job.exc_info


# ---- 6. memory stays flat --------------------------------------------------------------------
def memory_file(path, n: int, tag: str) -> int:
    """n lines: 1 in 64 a real generation (max_tokens 1), the rest duplicates of it or malformed.
    Returns how many lines reach a worker."""
    real = 0
    with open(path, "w") as f:
        for i in range(n):
            k = i % 64
            if k == 0:
                real += 1
                obj = completion(f"{tag}-{i}", f"{tag} memory {i}", 1)
            elif k < 32:
                obj = completion(f"{tag}-{i - k}", f"{tag} duplicate {i}", 1)    # duplicate custom_id
            elif k < 40:
                f.write(f'{{"custom_id": "{tag}-{i}", "body": not json}}\n')
                continue
            elif k < 48:
                obj = completion(f"{tag}-{i}", f"{tag} p {i}", 1, top_p=7)
            elif k < 56:
                obj = {**completion(f"{tag}-{i}", f"{tag} u {i}", 1), "url": "/v1/embeddings"}
            else:
                obj = completion(f"{tag}-{i}", f"{tag} f {i}", 1, frobnicate=i)
            f.write(json.dumps(obj) + "\n")
    return real


def test_peak_rss_flat_in_file_size(cluster, tmp_path):
    figures = {}
    for n in (20_000, 80_000):
        src = tmp_path / f"in-{n}.jsonl"
        real = memory_file(src, n, f"mem{n}")
        ran = bulk(tmp_path, src, "--out", tmp_path / f"out-{n}.jsonl", "--redis-url", cluster.url,
                   "--max-in-flight", 256, timeout=150, name=f"mem-{n}")
        total, outcomes, _ = summary_of(ran.stdout)
        assert total == n and sum(outcomes.values()) == n and outcomes["ok"] == real, outcomes
        assert complete_lines(tmp_path / f"out-{n}.jsonl") == n
        figures[n] = ran.peak_rss_kb
        print(f"\n[bulk] memory: {n} lines ({real} generated, {src.stat().st_size / 1e6:.1f} MB in): "
              f"peak RSS {ran.peak_rss_kb / 1024:.1f} MiB, {ran.wall_s:.1f}s; {ran.stdout.strip()}")
    growth_kb = figures[80_000] - figures[20_000]
    print(f"[bulk] memory: peak RSS growth from 20k to 80k lines: {growth_kb / 1024:+.1f} MiB "
          f"({100 * growth_kb / figures[20_000]:+.1f}%)")
    assert growth_kb < 10 * 1024 and growth_kb < 0.15 * figures[20_000], figures


@pytest.mark.parametrize("command", ["bulk", "submit"])
def test_unreachable_redis_is_one_clear_line_and_no_output_file(command, tmp_path):
    """Issue 22: against a Redis that refuses connections, `pravaha bulk --redis-url` and `pravaha
    submit` print one error line within seconds, exit 2, and bulk leaves no empty output file."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": "hi"}}) + "\n")
    args = ([command, str(src), "--out", str(out)] if command == "bulk" else [command, "hi"])
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "worker.cli", *args, "--redis-url", "redis://127.0.0.1:1/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 30
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("pravaha: error: cannot use Redis"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
