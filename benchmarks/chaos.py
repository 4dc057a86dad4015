"""Chaos suite (`make chaos`): real redis-servers on free ports, real `pravaha worker` processes on
dummy:llama-tiny, real SIGKILL/SIGSTOP/SIGTERM. One table row per scenario; exit 1 if any
scenario lost or duplicated anything or failed its own check.

    python benchmarks/chaos.py                   # every scenario
    python benchmarks/chaos.py --only load kill  # a subset; --scale 0.2 for a quick run

Columns: sent; completed (a final result exists); lost (sent, no result or a failed wait);
dup_results (a sample with more than one distinct finished event); dup_events (a repeated
(request_id, sample, index) on the raw pub/sub channel, counted by a pattern subscriber);
dead (dead-letter entries).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter

import msgspec
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from producer import Client, Names  # noqa: E402
from producer.wire import Result, TokenEvent, decode  # noqa: E402
from tests.redis_helpers import RedisServer, WorkerProcess, wait_until  # noqa: E402

NAMES = Names()
LONG = {"max_tokens": 64, "ignore_eos": True, "temperature": 1.0}


class Row(dict):
    """sent, completed, lost, dup_results, dup_events, dead, ok, note."""


class RawEvents:
    """A pattern subscriber on every request's token channel, counting (rid, sample, index)."""

    def __init__(self, url: str):
        self.seen: Counter = Counter()
        self.finished: Counter = Counter()
        self.raw: dict[str, list[bytes]] = {}
        self.pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(**{NAMES.channel("*"): self._on})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.01, daemon=True,
                                                exception_handler=lambda *a: None)

    def _on(self, message) -> None:
        data = message["data"]
        try:
            ev = decode(data, TokenEvent)
        except msgspec.DecodeError:
            return
        self.raw.setdefault(ev.request_id, []).append(data)
        key = (ev.request_id, ev.sample, ev.index)
        self.seen[key] += 1
        if ev.finished and self.seen[key] == 1:
            self.finished[(ev.request_id, ev.sample)] += 1

    def counts(self) -> tuple[int, int]:
        """(duplicated results, duplicated events)."""
        return (sum(n > 1 for n in self.finished.values()), sum(n - 1 for n in self.seen.values()))

    def stop(self) -> None:
        self.thread.stop()


class Stage:
    """One scenario's redis-server, workers and raw subscriber, stopped together."""

    def __init__(self, tmp: str, name: str, aof: bool = False):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.server = RedisServer(self.dir, appendonly=aof).start()
        self.url = self.server.url
        self.workers: list[WorkerProcess] = []
        self.events = RawEvents(self.url)

    def worker(self, name: str, **flags) -> WorkerProcess:
        flags.setdefault("reclaim_idle_s", 3)
        proc = WorkerProcess(self.url, os.path.join(self.dir, f"{name}.log"), consumer=name, **flags)
        self.workers.append(proc)
        return proc

    def client(self) -> Client:
        return Client(self.url)

    def dead(self) -> int:
        return self.server.client().xlen(NAMES.dead_letter)

    def row(self, rids: list[str], failed_waits: int = 0, **extra) -> Row:
        r = self.server.client()
        done = sum(r.exists(NAMES.result(rid)) for rid in rids)
        dup_results, dup_events = self.events.counts()
        row = Row(sent=len(rids), completed=done, lost=len(rids) - done + failed_waits,
                  dup_results=dup_results, dup_events=dup_events, dead=self.dead(), ok=True, note="")
        row.update(extra)
        row["ok"] = row["ok"] and row["lost"] == 0 and dup_results == 0 and dup_events == 0
        return row

    def close(self) -> None:
        self.events.stop()
        for w in self.workers:
            w.stop()
        self.server.kill()


def ready(*workers: WorkerProcess) -> None:
    for w in workers:
        w.wait_ready(300)


def wait_results(client: Client, rids: list[str], timeout: float) -> int:
    """Wait for every result; returns how many waits raised (timeouts, connection errors)."""
    failed = 0
    deadline = time.monotonic() + timeout
    for rid in rids:
        try:
            client.result(rid, timeout=max(0.1, deadline - time.monotonic()))
        except Exception:   # noqa: BLE001 - a failed wait is what we count
            failed += 1
    return failed


def holding(r: redis.Redis, consumer: str) -> int:
    return sum(1 for p in r.xpending_range(NAMES.stream, NAMES.group, "-", "+", 100_000)
               if p["consumer"].decode() == consumer)


# ---- scenarios ------------------------------------------------------------------------------
def load(st: Stage, scale: float) -> Row:
    """Several producers, 2 workers, many requests: each exactly once."""
    a, b = st.worker("a"), st.worker("b")
    ready(a, b)
    n_producers, per = 4, max(5, int(100 * scale))
    rids: list[str] = []
    lock = threading.Lock()

    def produce(p: int) -> None:
        c = st.client()
        mine = [c.submit(f"producer {p} job {i}", {"max_tokens": 8, "temperature": 0}) for i in range(per)]
        with lock:
            rids.extend(mine)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return st.row(rids, wait_results(st.client(), rids, 300))


def kill(st: Stage, scale: float) -> Row:
    """SIGKILL a worker holding requests; the other takes them over; the tokens equal an
    uninterrupted rerun of the same seeded jobs."""
    a, b = st.worker("a"), st.worker("b")
    ready(a, b)
    c, r = st.client(), st.server.client()
    n = max(6, int(40 * scale))
    jobs = [(f"kill prompt {i}", dict(LONG, seed=1000 + i)) for i in range(n)]
    rids = [c.submit(p, sp) for p, sp in jobs]
    wait_until(lambda: holding(r, "a") > 0 and st.events.seen, 120, "worker a holding requests")
    held = holding(r, "a")
    a.proc.send_signal(signal.SIGKILL)
    failed = wait_results(c, rids, 300)
    reruns = [c.submit(p, sp) for p, sp in jobs]
    failed += wait_results(c, reruns, 300)
    differ = sum(c.result(x, 1).completions[0].token_ids != c.result(y, 1).completions[0].token_ids
                 for x, y in zip(rids, reruns) if r.exists(NAMES.result(x)) and r.exists(NAMES.result(y)))
    return st.row(rids, failed, ok=differ == 0, note=f"a held {held}; {differ} differ from rerun")


def redis_restart(st: Stage, scale: float) -> Row:
    """SIGKILL redis-server mid-run and restart it from its AOF: nothing lost."""
    a = st.worker("a")
    ready(a)
    c = st.client()
    rids = [c.submit(f"aof prompt {i}", dict(LONG, seed=i)) for i in range(max(6, int(30 * scale)))]
    wait_until(lambda: st.events.seen, 60, "first tokens")
    st.server.kill()
    time.sleep(1)
    st.server.start()
    st.events.stop()
    st.events = RawEvents(st.url)   # the old subscriber died with the server; counts restart here
    return st.row(rids, wait_results(st.client(), rids, 300))


BAD_JOBS: list[tuple[str, dict]] = [
    ("not msgpack", {"job": b"\xc1\xc1garbage"}),
    ("json", {"job": b'{"request_id": "j1", "prompt": "hi"}'}),
    ("wrong field", {"payload": msgspec.msgpack.encode({"request_id": "wf", "prompt": "x", "created_at": 1.0})}),
    ("int", {"job": msgspec.msgpack.encode(7)}),
    ("empty", {"job": b""}),
    ("no request id", {"job": msgspec.msgpack.encode({"prompt": "x", "created_at": 1.0})}),
    ("unknown field", {"job": msgspec.msgpack.encode({"request_id": "uf", "prompt": "x", "created_at": 1.0,
                                                      "evil": 1})}),
    ("empty prompt", {"job": msgspec.msgpack.encode({"request_id": "ep", "prompt": "", "created_at": 1.0})}),
    ("no prompt", {"job": msgspec.msgpack.encode({"request_id": "np", "created_at": 1.0})}),
    ("token id out of range", {"job": msgspec.msgpack.encode({"request_id": "oor", "prompt": [10**9],
                                                              "created_at": 1.0})}),
    ("negative max_tokens", {"job": msgspec.msgpack.encode({"request_id": "nm", "prompt": "x", "created_at": 1.0,
                                                            "params": {"max_tokens": -1}})}),
    ("nan temperature", {"job": msgspec.msgpack.encode({"request_id": "nt", "prompt": "x", "created_at": 1.0,
                                                        "params": {"temperature": math.nan}})}),
    ("inf penalty", {"job": msgspec.msgpack.encode({"request_id": "ip", "prompt": "x", "created_at": 1.0,
                                                    "params": {"presence_penalty": math.inf}})}),
    ("unknown param", {"job": msgspec.msgpack.encode({"request_id": "up", "prompt": "x", "created_at": 1.0,
                                                      "params": {"bogus": 1}})}),
    ("brace id", {"job": msgspec.msgpack.encode({"request_id": "a{b}", "prompt": "x", "created_at": 1.0})}),
    ("prompt too long", {"job": msgspec.msgpack.encode({"request_id": "tl", "prompt": [1] * 100_000,
                                                        "created_at": 1.0})}),
    ("bad messages", {"job": msgspec.msgpack.encode({"request_id": "bm", "messages": [{"x": 1}],
                                                     "created_at": 1.0})}),
    ("future schema", {"job": msgspec.msgpack.encode({"v": 99, "request_id": "fs", "prompt": "x",
                                                      "created_at": 1.0})}),
]


def bad_input(st: Stage, scale: float) -> Row:
    """Malformed jobs: each dead-lettered or answered with an error; none stuck in the PEL; the
    worker stays alive and still serves a good job."""
    a = st.worker("a", max_deliveries=2)
    ready(a)
    r, c = st.server.client(), st.client()
    for _, fields in BAD_JOBS:
        r.xadd(NAMES.stream, fields)
    good = c.submit("a good job after the bad ones", {"max_tokens": 4, "temperature": 0})
    failed = wait_results(c, [good], 120)
    time.sleep(2)   # the bad entries were read before the good one; give their writes time
    stuck = len(r.xpending_range(NAMES.stream, NAMES.group, "-", "+", 1000))
    alive = a.proc.poll() is None
    row = st.row([good], failed, ok=stuck == 0 and alive,
                 note=f"{len(BAD_JOBS)} bad kinds; {stuck} stuck in PEL; worker {'alive' if alive else 'DEAD'}")
    row["sent"] += len(BAD_JOBS)
    return row


def duplicate_id(st: Stage, scale: float) -> Row:
    """Issue 22 item 1: the same request id submitted twice, 1 s apart, while the original runs.
    Wanted: the original finishes without error; its record holds as many events as its result."""
    a = st.worker("a", reclaim_idle_s=3, max_deliveries=2)
    ready(a)
    c, r = st.client(), st.server.client()
    params = dict(LONG, max_tokens=2000, seed=7)
    rid = c.submit("the duplicated job", params, request_id="job-42")
    time.sleep(1)
    c.submit("the duplicated job", params, request_id="job-42")
    failed = wait_results(c, [rid], 300)
    result = decode(r.get(NAMES.result(rid)), Result) if r.exists(NAMES.result(rid)) else None
    error = result.completions[0].error if result else "no result"
    record = len(r.xrange(NAMES.events(rid)))
    unique = len({(e.sample, e.index) for e in (decode(f[b"event"], TokenEvent) for _, f in r.xrange(NAMES.events(rid)))})
    ok = error is None and record == unique
    return st.row([rid], failed, ok=ok, note=f"error={error!r}; record {record} events, {unique} distinct")


def outage(st: Stage, scale: float) -> Row:
    """Issue 22 item 6: Redis frozen (SIGSTOP) longer than --reclaim-idle-s with 2 workers busy:
    each reclaims the other's jobs; the raw channel must carry no repeated event."""
    a, b = st.worker("a", reclaim_idle_s=2), st.worker("b", reclaim_idle_s=2)
    ready(a, b)
    c, r = st.client(), st.server.client()
    rids = [c.submit(f"outage prompt {i}", dict(LONG, max_tokens=200, seed=i)) for i in range(max(8, int(40 * scale)))]
    wait_until(lambda: holding(r, "a") and holding(r, "b") and len(st.events.seen) > 20, 120, "both busy")
    st.server.proc.send_signal(signal.SIGSTOP)
    time.sleep(5)
    st.server.proc.send_signal(signal.SIGCONT)
    return st.row(rids, wait_results(c, rids, 300))


def drain(st: Stage, scale: float) -> Row:
    """Issue 22 item 8: SIGTERM with a short drain timeout leaves requests pending; their callers
    must hear they were handed back (a message on their channel saying so), and another worker
    completes them."""
    a = st.worker("a", drain_timeout_s=1, reclaim_idle_s=2)
    ready(a)
    c, r = st.client(), st.server.client()
    rids = [c.submit(f"drain prompt {i}", dict(LONG, max_tokens=400, seed=i)) for i in range(max(6, int(20 * scale)))]
    wait_until(lambda: holding(r, "a") and st.events.seen, 120, "a busy")
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(60)
    handed = [rid for rid in rids if not r.exists(NAMES.result(rid))]
    b = st.worker("b", reclaim_idle_s=2)
    ready(b)
    failed = wait_results(c, rids, 300)
    # "handed back" in a message on the channel, in whatever shape the wire gives it
    told = 0
    for rid in handed:
        told += any(b"handed back" in m.lower() for m in st.events.raw.get(rid, []))
    return st.row(rids, failed, ok=told == len(handed) and bool(handed),
                  note=f"{len(handed)} handed back, {told} callers told")


def sdk_blip(st: Stage, scale: float) -> Row:
    """Issue 22 item 3: Client.result()/stream() waiting across a Redis restart and CLIENT KILL
    keep waiting (with backoff) and get their answer; stream() resumes without dup or gap."""
    a = st.worker("a")
    ready(a)
    c = st.client()
    rids = [c.submit(f"blip prompt {i}", dict(LONG, max_tokens=300, seed=i)) for i in range(4)]
    failures: list[str] = []
    streamed: dict[str, list[int]] = {}

    def wait_result(rid: str) -> None:
        try:
            st.client().result(rid, timeout=240)
        except Exception as exc:   # noqa: BLE001
            failures.append(f"result: {type(exc).__name__}")

    def wait_stream(rid: str) -> None:
        try:
            seen = [(e.sample, e.index) for e in st.client().stream(rid, timeout=240)]
            streamed[rid] = [i for _, i in seen]
        except Exception as exc:   # noqa: BLE001
            failures.append(f"stream: {type(exc).__name__}")

    threads = [threading.Thread(target=f, args=(rid,)) for rid in rids for f in (wait_result, wait_stream)]
    [t.start() for t in threads]
    wait_until(lambda: st.events.seen, 60, "first tokens")
    st.server.client().client_kill_filter(_type="normal", skipme=True)
    time.sleep(0.5)
    st.server.kill()
    time.sleep(1)
    st.server.start()
    st.events.stop()
    st.events = RawEvents(st.url)
    [t.join(300) for t in threads]
    wait_results(st.client(), rids, 240)   # a caller's failed wait is lost to it; count completions anyway
    gaps = sum(ix != list(range(len(ix))) for ix in streamed.values())
    return st.row(rids, len(failures), ok=gaps == 0,
                  note=f"{len(failures)} waits raised {sorted(set(failures))}; {gaps} streams with gap/dup")


SCENARIOS = {"load": (load, False), "kill": (kill, False), "redis-restart": (redis_restart, True),
             "bad-input": (bad_input, False), "duplicate-id": (duplicate_id, False),
             "outage": (outage, False), "drain": (drain, False), "sdk-blip": (sdk_blip, True)}
COLUMNS = ("sent", "completed", "lost", "dup_results", "dup_events", "dead")


def run(name: str, tmp: str, scale: float) -> Row:
    fn, aof = SCENARIOS[name]
    st = Stage(tmp, name, aof=aof)
    started = time.monotonic()
    try:
        row = fn(st, scale)
    except Exception as exc:   # noqa: BLE001 - a scenario that could not run is a failed row
        row = Row({k: 0 for k in COLUMNS}, ok=False, note=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        st.close()
    row["seconds"] = round(time.monotonic() - started, 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="scenarios to run (default: all)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the request counts")
    args = ap.parse_args()
    print(f"{'scenario':<14}" + "".join(f"{c:>12}" for c in COLUMNS) + f"{'s':>7}  result", flush=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or SCENARIOS:
            row = run(name, tmp, args.scale)
            bad += not row["ok"]
            print(f"{name:<14}" + "".join(f"{row[c]:>12}" for c in COLUMNS) + f"{row['seconds']:>7}  "
                  f"{'ok' if row['ok'] else 'FAIL'}  {row['note']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
