"""Scheduler tests with no model: hand-made ModelRunnerOutput fed back through `update`."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pravaha_core.block_manager import BlockManager
from pravaha_core.sampling_params import SamplingParams
from pravaha_core.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from pravaha_core.sequence import Sequence, SequenceStatus

EOS = 0
TOK = 7          # an ordinary sampled token: neither EOS nor a stop token
PROMPT_TOK = 5


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   max_model_len=256, eos_token_ids=(EOS,)) -> Scheduler:
    bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, eos_token_ids=set(eos_token_ids))


def make_seq(rid: str, num_prompt: int, max_tokens: int = 16, **params) -> Sequence:
    return Sequence(rid, [PROMPT_TOK] * num_prompt, SamplingParams(max_tokens=max_tokens, **params))


def run_step(sched: Scheduler, tokens: dict[str, int] | None = None, default: int = TOK):
    """schedule + update; each sampling chunk gets tokens[rid] or `default`."""
    tokens = tokens or {}
    plan = sched.schedule()
    plan._chunk_map = chunk_map(plan)   # snapshot: `samples` is only meaningful before update
    result = ModelRunnerOutput({c.seq.seq_id: tokens.get(c.seq.request_id, default)
                                for c in plan.chunks if c.samples})
    changed = sched.update(plan, result)
    return plan, changed


def chunk_map(plan: SchedulerOutput) -> dict[str, tuple[int, int, bool]]:
    """request_id -> (start, num_tokens, samples), as scheduled (before update)."""
    if hasattr(plan, "_chunk_map"):
        return plan._chunk_map
    return {c.seq.request_id: (c.start, c.num_tokens, c.samples) for c in plan.chunks}


def check_blocks(sched: Scheduler, seqs) -> None:
    """Ref counts match holders; free + held == all; waiting/finished hold nothing."""
    bm = sched.block_manager
    holders: dict[int, int] = {}
    for s in seqs:
        if s.status is not SequenceStatus.RUNNING:
            assert s.block_table == [], s
        for b in s.block_table:
            holders[b] = holders.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.allocator.ref_counts[b] == holders.get(b, 0)
    free = list(bm.allocator._free)
    assert len(free) == len(set(free))
    assert not set(free) & set(holders)
    assert bm.num_free_blocks + len(holders) == bm.num_blocks


def run_to_completion(sched: Scheduler, seqs, max_steps: int = 1000, default: int = TOK) -> int:
    for n in range(max_steps):
        if not sched.has_unfinished():
            return n
        plan, _ = run_step(sched, default=default)
        assert plan.chunks
        assert plan.num_batched_tokens <= sched.max_num_batched_tokens
        check_blocks(sched, seqs)
    raise AssertionError("scheduler did not finish")


# ---- budget and batching -------------------------------------------------------------

def test_token_budget_respected_every_step():
    sched = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    seqs = [make_seq(f"r{i}", n, max_tokens=5) for i, n in enumerate([5, 6, 7, 13, 1])]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        plan, _ = run_step(sched)
        assert 0 < plan.num_batched_tokens <= 8
        assert plan.num_batched_tokens == sum(c.num_tokens for c in plan.chunks)
        steps += 1
        assert steps < 100
    for s in seqs:
        assert s.finish_reason == "length"
        assert s.output_token_ids == [TOK] * 5
    # 32 prompt tokens + 5 decode tokens each (the last sampled token is never fed back)
    assert sched.block_manager.num_free_blocks == 64


def test_budget_is_spent_fully_when_there_is_work():
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add(make_seq("a", 6))
    sched.add(make_seq("b", 6))
    plan = sched.schedule()
    assert chunk_map(plan) == {"a": (0, 6, True), "b": (0, 4, False)}
    assert plan.num_batched_tokens == 10


def test_chunked_prefill_of_long_prompt():
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    seq = make_seq("long", 20, max_tokens=3)
    sched.add(seq)

    plan, changed = run_step(sched)
    assert chunk_map(plan) == {"long": (0, 8, False)}
    assert changed == []
    assert seq.num_computed_tokens == 8 and len(seq.block_table) == 2
    assert seq.num_output_tokens == 0 and seq.status is SequenceStatus.RUNNING

    plan, changed = run_step(sched)
    assert chunk_map(plan) == {"long": (8, 8, False)}
    assert changed == []
    assert seq.num_computed_tokens == 16 and len(seq.block_table) == 4

    plan, changed = run_step(sched, {"long": 11})
    assert chunk_map(plan) == {"long": (16, 4, True)}
    assert changed == [seq]
    assert seq.num_computed_tokens == 20 and len(seq.block_table) == 5
    assert seq.output_token_ids == [11]

    plan, changed = run_step(sched, {"long": 12})
    assert chunk_map(plan) == {"long": (20, 1, True)}
    assert seq.num_computed_tokens == 21 and len(seq.block_table) == 6
    plan, changed = run_step(sched, {"long": 13})
    assert seq.output_token_ids == [11, 12, 13]
    assert seq.finish_reason == "length"
    assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == 16
    assert not sched.has_unfinished()


def test_new_requests_join_while_others_decode():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq("a", 4, max_tokens=10)
    sched.add(a)
    run_step(sched)
    run_step(sched)
    assert a.num_output_tokens == 2
    b = make_seq("b", 12, max_tokens=10)
    sched.add(b)
    plan, changed = run_step(sched)
    # the running decode goes first, the newcomer's prefill fills the rest of the budget
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]
    assert chunk_map(plan) == {"a": (5, 1, True), "b": (0, 12, True)}
    assert changed == [a, b]
    assert sched.running == [a, b]
    c = make_seq("c", 20, max_tokens=10)
    sched.add(c)
    plan, _ = run_step(sched)
    # two decodes + a chunk of c's prompt that uses up the remaining budget
    assert chunk_map(plan) == {"a": (6, 1, True), "b": (12, 1, True), "c": (0, 14, False)}
    plan, _ = run_step(sched)
    assert chunk_map(plan) == {"a": (7, 1, True), "b": (13, 1, True), "c": (14, 6, True)}
    assert a.num_output_tokens == 5 and b.num_output_tokens == 3 and c.num_output_tokens == 1


def test_waiting_request_waits_when_running_ones_use_the_budget():
    sched = make_scheduler(max_num_batched_tokens=4)
    a = make_seq("a", 4)
    b = make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert chunk_map(plan) == {"a": (0, 4, True)}
    assert list(sched.waiting) == [b]
    assert b.block_table == []


def test_admission_is_fifo_a_small_request_does_not_overtake_a_blocked_head():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    a = make_seq("a", 4, max_tokens=4)            # holds 2 blocks once prefilled
    big = make_seq("big", 6, max_tokens=2)        # needs 3 blocks: does not fit next to a
    small = make_seq("small", 1, max_tokens=1)    # would fit, but arrived later
    sched.add(a)
    run_step(sched)
    sched.add(big)
    sched.add(small)
    plan, _ = run_step(sched)
    assert [c.seq for c in plan.chunks] == [a]
    assert list(sched.waiting) == [big, small]
    assert big.block_table == [] and small.block_table == []
    run_to_completion(sched, [a, big, small])
    assert big.finish_reason == small.finish_reason == "length"


def test_max_num_seqs_respected():
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=64)
    a = make_seq("a", 3, max_tokens=2)
    b = make_seq("b", 3, max_tokens=5)
    c = make_seq("c", 3, max_tokens=5)
    d = make_seq("d", 3, max_tokens=5)
    seqs = [a, b, c, d]
    for s in seqs:
        sched.add(s)
    plan, _ = run_step(sched)
    assert [ch.seq for ch in plan.chunks] == [a, b]
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c, d]
    assert c.block_table == [] and d.block_table == []
    plan, _ = run_step(sched)                     # a finishes (max_tokens=2)
    assert a.finish_reason == "length"
    assert sched.running == [b]
    plan, _ = run_step(sched)                     # a's seat goes to c
    assert [ch.seq for ch in plan.chunks] == [b, c]
    assert list(sched.waiting) == [d]
    while sched.has_unfinished():
        plan, _ = run_step(sched)
        assert len(sched.running) <= 2
        assert len(plan.chunks) <= 2
    assert all(s.finish_reason == "length" for s in seqs)


def test_finished_sequence_frees_blocks_in_the_same_update():
    sched = make_scheduler(num_blocks=8, block_size=4)
    a = make_seq("a", 6, max_tokens=5)
    b = make_seq("b", 6, max_tokens=5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 4
    plan, changed = run_step(sched, {"a": EOS})
    assert changed == [a, b]
    assert a.is_finished and a.finish_reason == "stop"
    assert a.block_table == []
    assert sched.running == [b]
    assert sched.block_manager.num_free_blocks == 6
    check_blocks(sched, [a, b])


def test_update_returns_only_sequences_that_got_a_token():
    sched = make_scheduler(max_num_batched_tokens=6)
    a = make_seq("a", 2)
    b = make_seq("b", 10)
    sched.add(a)
    sched.add(b)
    plan, changed = run_step(sched)
    assert chunk_map(plan) == {"a": (0, 2, True), "b": (0, 4, False)}
    assert changed == [a]
    assert b.num_output_tokens == 0 and b.num_computed_tokens == 4


# ---- stop rules ----------------------------------------------------------------------

def test_eos_stops_and_is_kept_in_output():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched, {"a": 9})
    run_step(sched, {"a": EOS})
    assert seq.output_token_ids == [9, EOS]
    assert seq.finish_reason == "stop"
    assert seq.error is None
    assert seq.status is SequenceStatus.FINISHED
    assert not sched.has_unfinished()


def test_any_of_several_eos_ids_stops():
    sched = make_scheduler(eos_token_ids={0, 2})
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched, {"a": 2})
    assert seq.finish_reason == "stop"


def test_ignore_eos_keeps_generating_until_max_tokens():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=4, ignore_eos=True)
    sched.add(seq)
    for _ in range(3):
        run_step(sched, {"a": EOS})
        assert not seq.is_finished
    run_step(sched, {"a": EOS})
    assert seq.output_token_ids == [EOS] * 4
    assert seq.finish_reason == "length"


def test_stop_token_ids_stop_even_with_ignore_eos():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=10, stop_token_ids=[42, 43], ignore_eos=True)
    sched.add(seq)
    run_step(sched, {"a": EOS})
    run_step(sched, {"a": 43})
    assert seq.output_token_ids == [EOS, 43]
    assert seq.finish_reason == "stop"


def test_stop_token_in_prompt_does_not_stop():
    sched = make_scheduler()
    seq = Sequence("a", [42, EOS, 42], SamplingParams(max_tokens=3, stop_token_ids=[42]))
    sched.add(seq)
    run_step(sched)
    assert not seq.is_finished
    assert seq.num_output_tokens == 1


def test_max_tokens_gives_exactly_that_many_tokens():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=3)
    sched.add(seq)
    for _ in range(2):
        run_step(sched)
        assert not seq.is_finished
    run_step(sched)
    assert seq.num_output_tokens == 3
    assert seq.finish_reason == "length"


def test_eos_on_last_allowed_token_reports_stop():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=1)
    sched.add(seq)
    run_step(sched, {"a": EOS})
    assert seq.finish_reason == "stop"


def test_sequence_filling_the_context_exactly_stops_by_length():
    sched = make_scheduler(max_model_len=8)
    seq = make_seq("a", 5, max_tokens=3)         # 5 + 3 == max_model_len: allowed
    sched.add(seq)
    assert list(sched.waiting) == [seq]
    run_to_completion(sched, [seq])
    assert seq.num_tokens == 8
    assert seq.finish_reason == "length"


# ---- preemption ----------------------------------------------------------------------

def test_preempts_newest_running_sequence_not_the_one_asking():
    # 4 blocks of 2; a, b, c each hold 1 block after their 2-token prompt
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=3)
    a, b, c = make_seq("a", 2, 6), make_seq("b", 2, 6), make_seq("c", 2, 6)
    d = make_seq("d", 2, 6)                       # later arrival, no seat yet
    seqs = [a, b, c, d]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert sched.running == [a, b, c]
    assert list(sched.waiting) == [d]
    assert sched.block_manager.num_free_blocks == 1
    # a takes the last free block; b needs one more -> the newest (c) is preempted
    plan, _ = run_step(sched)
    assert plan.preempted == [c]
    assert [ch.seq for ch in plan.chunks] == [a, b]
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c, d]          # back ahead of the later arrival
    assert c.status is SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.output_token_ids == [TOK]            # tokens are kept, only the KV is dropped
    check_blocks(sched, seqs)


def test_sequence_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=3, block_size=2)
    a, b = make_seq("a", 2, 4), make_seq("b", 2, 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 1
    plan, _ = run_step(sched)                     # a takes the last block; b has no room
    assert plan.preempted == [b]
    assert [ch.seq for ch in plan.chunks] == [a]
    assert sched.running == [a]
    assert list(sched.waiting) == [b]
    assert b.num_computed_tokens == 0 and b.block_table == []


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a, b = make_seq("a", 2, 4), make_seq("b", 2, 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    plan, _ = run_step(sched)
    assert plan.preempted == [b]
    assert b not in [ch.seq for ch in plan.chunks]
    assert sched.block_manager.num_free_blocks == 1   # b's freed block not re-spent on b


def test_preempted_sequence_resumes_and_recomputes_all_tokens():
    sched = make_scheduler(num_blocks=3, block_size=2, max_num_seqs=4)
    a, b = make_seq("a", 2, 3), make_seq("b", 2, 3)
    sched.add(a)
    sched.add(b)
    run_step(sched, {"a": 10, "b": 20})           # both prefill, sample one token
    plan, _ = run_step(sched, {"a": 11})          # b preempted
    assert plan.preempted == [b]
    late = make_seq("late", 2, 3)
    sched.add(late)
    assert list(sched.waiting) == [b, late]
    # b resumes: all its tokens (prompt + its sampled token) go through the model again
    plans = []
    while not b.is_finished:
        plan, _ = run_step(sched, {"a": 12, "b": 21, "late": 30})
        plans.append(plan)
        assert len(plans) < 20
    resume = next(p for p in plans if any(ch.seq is b for ch in p.chunks))
    assert chunk_map(resume)["b"] == (0, 3, True)
    assert b.prompt_token_ids == [PROMPT_TOK] * 2
    assert b.output_token_ids == [20, 21, 21]
    assert b.num_preemptions >= 1
    run_to_completion(sched, [a, b, late])
    assert a.output_token_ids == [10, 11, 12]
    assert late.finish_reason == "length" and late.num_output_tokens == 3
    assert late.output_token_ids[0] == 30


def test_preemption_during_chunked_prefill_resets_progress():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=5)
    a = make_seq("a", 2, 6)
    b = make_seq("b", 6, 2)
    sched.add(a)
    sched.add(b)
    plan, _ = run_step(sched)
    assert chunk_map(plan) == {"a": (0, 2, True), "b": (0, 3, False)}
    assert b.num_computed_tokens == 3 and len(b.block_table) == 2
    plan, _ = run_step(sched)                     # a takes 1 block, b needs 2 more, 1 free
    assert plan.preempted == [b]
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_tokens == 6 and b.num_output_tokens == 0
    run_to_completion(sched, [a, b])
    assert a.finish_reason == b.finish_reason == "length"


# ---- requests that can never fit -----------------------------------------------------

def test_request_longer_than_context_is_rejected_with_error():
    sched = make_scheduler(max_model_len=16)
    seq = make_seq("big", 10, max_tokens=7)
    sched.add(seq)
    assert seq.is_finished
    assert seq.finish_reason == "error"
    assert "10" in seq.error and "7" in seq.error and "17" in seq.error and "16" in seq.error
    assert "context length" in seq.error
    assert seq not in sched.waiting and seq not in sched.running
    assert not sched.has_unfinished()
    assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_request_needing_more_blocks_than_cache_is_rejected_with_error():
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=256)
    seq = make_seq("big", 6, max_tokens=4)        # 9 computed tokens -> 3 blocks > 2
    sched.add(seq)
    assert seq.finish_reason == "error"
    assert "needs 3 KV blocks" in seq.error
    assert "holds 2" in seq.error
    assert not sched.has_unfinished()


def test_requests_exactly_at_the_limits_are_accepted():
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=8)
    seq = make_seq("ok", 5, max_tokens=3)         # 8 tokens == max_model_len == 2 blocks
    sched.add(seq)
    assert not seq.is_finished
    assert sched.why_never_fits(seq) is None
    run_to_completion(sched, [seq])
    assert seq.finish_reason == "length"
    assert seq.num_output_tokens == 3


def test_last_sampled_token_needs_no_kv_slot():
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=9)
    seq = make_seq("ok", 5, max_tokens=4)         # 9 tokens, only 8 ever computed == 2 blocks
    sched.add(seq)
    assert sched.why_never_fits(seq) is None
    run_to_completion(sched, [seq])
    assert seq.finish_reason == "length" and seq.num_output_tokens == 4


def test_rejected_request_does_not_disturb_others():
    sched = make_scheduler(max_model_len=16)
    ok = make_seq("ok", 4, max_tokens=2)
    sched.add(ok)
    sched.add(make_seq("bad", 20, max_tokens=1))
    assert list(sched.waiting) == [ok]
    run_to_completion(sched, [ok])
    assert ok.finish_reason == "length"


# ---- abort ---------------------------------------------------------------------------

def test_abort_waiting_sequence():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 4), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert list(sched.waiting) == [b]
    assert sched.abort("b") == [b]
    assert b.finish_reason == "abort" and b.is_finished
    assert list(sched.waiting) == []
    assert sched.running == [a]


def test_abort_running_sequence_frees_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4)
    a, b = make_seq("a", 8), make_seq("b", 8)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 4
    assert sched.abort("a") == [a]
    assert a.finish_reason == "abort"
    assert a.block_table == []
    assert sched.running == [b]
    assert sched.block_manager.num_free_blocks == 6
    check_blocks(sched, [a, b])
    run_to_completion(sched, [a, b])
    assert a.finish_reason == "abort"
    assert b.finish_reason == "length"


def test_abort_mid_prefill_frees_partial_blocks():
    sched = make_scheduler(num_blocks=8, block_size=2, max_num_batched_tokens=4)
    a = make_seq("a", 10, max_tokens=4)
    sched.add(a)
    run_step(sched)
    assert a.num_computed_tokens == 4
    assert len(a.block_table) == 2
    sched.abort("a")
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished()


def test_abort_unknown_or_finished_request_returns_none():
    sched = make_scheduler()
    assert sched.abort("nope") == []
    a = make_seq("a", 2, max_tokens=1)
    sched.add(a)
    run_step(sched)
    assert a.finish_reason == "length"
    assert sched.abort("a") == []
    assert a.finish_reason == "length"
    b = make_seq("b", 2)
    sched.add(b)
    assert sched.abort("b") == [b]
    assert sched.abort("b") == []


# ---- admission control ---------------------------------------------------------------

def test_num_admittable_limited_by_seats():
    sched = make_scheduler(num_blocks=100, block_size=4, max_num_seqs=3)
    assert sched.num_admittable() == 3
    sched.add(make_seq("a", 4))
    assert sched.num_admittable() == 2
    run_step(sched)
    assert sched.num_admittable() == 2            # running also takes a seat
    sched.add(make_seq("b", 4))
    sched.add(make_seq("c", 4))
    assert sched.num_admittable() == 0
    sched.add(make_seq("d", 4))                   # over-adding is allowed; no negative answer
    assert sched.num_admittable() == 0


def test_num_admittable_limited_by_free_blocks_including_promises():
    sched = make_scheduler(num_blocks=5, block_size=4, max_num_seqs=10)
    assert sched.num_admittable() == 5
    sched.add(make_seq("a", 9, max_tokens=4))     # waiting: promises 3 blocks
    assert sched.num_admittable() == 2
    run_step(sched)                               # now running, holding 3 blocks
    assert sched.block_manager.num_free_blocks == 2
    assert sched.num_admittable() == 2
    sched.add(make_seq("b", 8, max_tokens=4))     # promises 2 more
    assert sched.num_admittable() == 0


def test_num_admittable_ignores_rejected_requests():
    sched = make_scheduler(num_blocks=4, max_num_seqs=2, max_model_len=8)
    sched.add(make_seq("bad", 8, max_tokens=8))
    assert sched.num_admittable() == 2


def test_has_unfinished():
    sched = make_scheduler()
    assert not sched.has_unfinished()
    a = make_seq("a", 2, max_tokens=1)
    sched.add(a)
    assert sched.has_unfinished()
    run_step(sched)
    assert not sched.has_unfinished()


# ---- the plan stays a faithful record of the step ------------------------------------

def test_chunk_samples_flag_survives_update():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq("a", 4)
    sched.add(a)
    plan = sched.schedule()
    assert [c.samples for c in plan.chunks] == [True]
    sched.update(plan, ModelRunnerOutput({a.seq_id: TOK}))
    assert [c.samples for c in plan.chunks] == [True]


# ---- property test -------------------------------------------------------------------

_rid = itertools.count()

request = st.tuples(st.integers(1, 10), st.integers(1, 8), st.booleans(), st.booleans())
add_op = st.tuples(st.just("add"), st.lists(request, min_size=1, max_size=4))  # a burst
step_op = st.tuples(st.just("step"), st.lists(st.integers(0, 9), min_size=1, max_size=6))
abort_op = st.tuples(st.just("abort"), st.integers(0, 30))
ops_strategy = st.lists(st.one_of(add_op, add_op, step_op, step_op, step_op, abort_op),
                        min_size=1, max_size=50)
config_strategy = st.fixed_dictionaries({
    "num_blocks": st.integers(2, 12),
    "block_size": st.sampled_from([1, 2, 4]),
    "max_num_seqs": st.integers(1, 5),
    "max_num_batched_tokens": st.integers(1, 16),
    "max_model_len": st.integers(8, 24),
    "prefix_caching": st.booleans(),
})
STOP_TOKEN = 3           # for requests that ask for it; EOS is 0; 1, 2, 4..9 are ordinary


def _check_invariants(sched: Scheduler, all_seqs: list[Sequence]) -> None:
    bm = sched.block_manager
    running, waiting = sched.running, list(sched.waiting)
    live = running + waiting
    assert len({id(s) for s in live}) == len(live), "a sequence is queued twice"
    assert len({s.request_id for s in live}) == len(live)
    assert [s.arrival for s in running] == sorted(s.arrival for s in running)
    assert [s.arrival for s in waiting] == sorted(s.arrival for s in waiting)
    assert len(running) <= sched.max_num_seqs
    check_blocks(sched, all_seqs)
    for h, block in bm.cached.items():   # the prefix cache names each block at most once
        assert bm.block_hash[block] == h
    assert len(bm.block_hash) == len(bm.cached)
    live_ids = {id(s) for s in live}
    for s in all_seqs:
        assert s.num_computed_tokens <= s.num_tokens
        if s.status is SequenceStatus.RUNNING:
            assert s in running
            assert len(s.block_table) == bm.blocks_for(s.num_computed_tokens)
            assert s.num_uncomputed_tokens >= 1
        elif s.status is SequenceStatus.WAITING:
            assert s in waiting
            assert s.num_computed_tokens == 0
            assert s.num_uncomputed_tokens >= 1
        else:
            assert id(s) not in live_ids
            assert s.finish_reason in {"stop", "length", "abort", "error"}
            if s.finish_reason == "error":
                assert s.error
        assert s.num_output_tokens <= s.params.max_tokens
        assert s.num_tokens <= sched.max_model_len or s.finish_reason == "error"


def _step_and_check(sched: Scheduler, all_seqs: list[Sequence], tokens: list[int]) -> SchedulerOutput:
    running_before = list(sched.running)
    plan = sched.schedule()
    assert plan.chunks, "unfinished requests but nothing schedulable"
    assert plan.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    bm = sched.block_manager
    scheduled = [c.seq for c in plan.chunks]
    assert len(set(map(id, scheduled))) == len(scheduled)
    for c in plan.chunks:
        assert c.num_tokens >= 1
        assert c.start == c.seq.num_computed_tokens
        assert c.start + c.num_tokens <= c.seq.num_tokens
        assert c.seq in sched.running
        assert len(c.seq.block_table) >= bm.blocks_for(c.start + c.num_tokens)
    for v in plan.preempted:
        # victims are running sequences newer than every sequence still running
        assert v in running_before
        assert v.status is SequenceStatus.WAITING and v in sched.waiting
        assert v.block_table == [] and v.num_computed_tokens == 0
        assert all(r.arrival < v.arrival for r in sched.running)
    samplers = [c for c in plan.chunks if c.samples]
    result = ModelRunnerOutput({c.seq.seq_id: tokens[i % len(tokens)]
                                for i, c in enumerate(samplers)})
    changed = sched.update(plan, result)
    assert {id(s) for s in changed} == {id(c.seq) for c in samplers}
    for s in changed:
        token = result.sampled_token_ids[s.seq_id]
        assert s.token_ids[-1] == token
        if token in s.params.stop_token_ids or (token == EOS and not s.params.ignore_eos):
            assert s.finish_reason == "stop"
        elif s.num_output_tokens == s.params.max_tokens:
            assert s.finish_reason == "length"
        else:
            assert not s.is_finished
        if s.is_finished:
            assert s.block_table == []
            assert s not in sched.running
    return plan


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=config_strategy, ops=ops_strategy)
def test_scheduler_invariants_and_liveness(config, ops):
    bm = BlockManager(config["num_blocks"], config["block_size"], config["prefix_caching"])
    sched = Scheduler(bm, config["max_num_seqs"], config["max_num_batched_tokens"],
                      config["max_model_len"], {EOS})
    all_seqs: list[Sequence] = []
    for op in ops:
        kind = op[0]
        if kind == "add":
            for n_prompt, max_tokens, ignore_eos, use_stop in op[1]:
                seq = Sequence(f"q{next(_rid)}", [4] * n_prompt,
                               SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                              stop_token_ids=[STOP_TOKEN] if use_stop else []))
                all_seqs.append(seq)
                sched.add(seq)
                if sched.why_never_fits(seq):
                    assert seq.finish_reason == "error" and seq.error
                else:
                    assert seq in sched.waiting
        elif kind == "step":
            if sched.has_unfinished():
                _step_and_check(sched, all_seqs, op[1])
        else:
            idx = op[1]
            if all_seqs:
                target = all_seqs[idx % len(all_seqs)]
                was_live = target in sched.running or target in sched.waiting
                got = sched.abort(target.request_id)
                if was_live:
                    assert got == [target] and target.finish_reason == "abort"
                else:
                    assert got == []
        _check_invariants(sched, all_seqs)

    # liveness: with no new requests everything finishes. The oldest unfinished request
    # computes at least one token per step and is never preempted, so this bound suffices.
    bound = sum(s.num_prompt_tokens + s.params.max_tokens for s in all_seqs if not s.is_finished) + 1
    steps = 0
    while sched.has_unfinished():
        assert steps <= bound, f"no progress after {steps} steps: {sched.running} {sched.waiting}"
        _step_and_check(sched, all_seqs, [4, 5, 1])
        _check_invariants(sched, all_seqs)
        steps += 1
    assert bm.num_free_blocks == bm.num_blocks
    assert all(s.is_finished for s in all_seqs)
    for s in all_seqs:
        if s.finish_reason == "length":
            assert s.num_output_tokens == s.params.max_tokens
