"""Continuous batching: spend a token budget on running sequences, then on waiting ones.

No torch here. One step's plan (`SchedulerOutput`) goes to the model runner; its result
(`ModelRunnerOutput`) comes back through `update`.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .spec_decode import NgramSpeculator


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, from position `start`, go through the model this step.
    `samples`: the chunk reaches the sequence's end, so a next token is sampled.
    `draft_ids`: speculative tokens appended to the chunk (its last num_tokens - 1 rows)."""

    seq: Sequence
    start: int
    num_tokens: int
    draft_ids: list[int] = field(default_factory=list)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens - len(self.draft_ids) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[int, int]  # seq_id -> next token, for chunks that sample
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)  # seq_id -> {token: logprob}
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> verified tokens (1..k+1)


class Scheduler:
    """Owns the waiting queue and the running set; nothing else moves sequences between them.

    Invariants: `running` and `waiting` are sorted by arrival (a preempted sequence goes back
    in its arrival place, ahead of later requests); a sequence holds blocks only while
    running; a request of n samples takes n seats from admission on.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: set[int],
                 speculator: NgramSpeculator | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0     # prompt tokens served from the prefix cache
        self.speculator = speculator

    # ---- admission -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue `seq`, or finish it at once with an error if it can never fit."""
        problem = self.why_never_fits(seq)
        if problem:
            seq.finish("error", problem)
            return
        if seq.params.n > 1:
            seq.make_forks(self.block_manager.block_size)
        self.waiting.append(seq)

    def why_never_fits(self, seq: Sequence) -> str | None:
        if seq.params.n > self.max_num_seqs:
            return f"n ({seq.params.n}) exceeds max_num_seqs ({self.max_num_seqs}): the samples never fit at once"
        total = seq.num_prompt_tokens + seq.params.max_tokens
        if total > self.max_model_len:
            return (f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.params.max_tokens}) "
                    f"= {total} exceeds the model's context length ({self.max_model_len})")
        needed = self.block_manager.blocks_for(total - 1)  # the last token is never computed
        if needed > self.block_manager.num_blocks:
            return (f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.params.max_tokens}) "
                    f"needs {needed} KV blocks but the whole cache holds {self.block_manager.num_blocks}")
        return None

    def num_admittable(self) -> int:
        """How many more requests the engine can take now without overcommitting the cache."""
        slots = self.max_num_seqs - len(self.running) - sum(map(_seats, self.waiting))
        promised = sum(self.block_manager.blocks_for(s.num_tokens) for s in self.waiting)
        free = self.block_manager.num_free_blocks - promised
        return max(0, min(slots, free))

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sample of `request_id` with "abort" and free their blocks."""
        aborted = []
        for queue in (self.waiting, self.running):
            for seq in [s for s in queue if s.request_id == request_id]:
                queue.remove(seq)
                self.block_manager.free(seq)
                aborted += [seq] + seq.pending_forks
                seq.pending_forks = []
        for seq in aborted:
            seq.finish("abort")
        return aborted

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` for a reason found outside the scheduler (a stop string)."""
        if not seq.is_finished:
            self.block_manager.free(seq)
            self.running.remove(seq)
        seq.finish(reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            drafts = self._drafts(seq, budget) if num_tokens == 1 else []
            if not self._make_room(seq, num_tokens + len(drafts), out.preempted):
                break  # `seq` itself was preempted; it was the newest, so nothing follows it
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens + len(drafts), drafts))
            num_tokens += len(drafts)
            budget -= num_tokens
            i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a decode row: never past max_tokens or the context (the verified
        run adds one token of its own) nor the step's token budget."""
        if self.speculator is None:
            return []
        limit = min(budget - 1, seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens - 1)
        return self.speculator.propose(seq, limit)

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Allocate slots for `seq`, preempting the newest running sequences as needed."""
        while not self.block_manager.allocate_slots(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + _seats(seq) > self.max_num_seqs:
                break
            reused = self.block_manager.reuse_cached_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate_slots(seq, num_tokens):
                if reused:   # waiting sequences hold no blocks
                    self.block_manager.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.num_cached_tokens += reused
            self.waiting.popleft()
            self._run(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
            if seq.pending_forks and seq.num_computed_tokens >= seq.fork_at:
                self._fork(seq)

    def _run(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_order)

    def _fork(self, seq: Sequence) -> None:
        """Start the request's other samples on `seq`'s first full blocks (shared)."""
        shared = seq.block_table[: seq.fork_at // self.block_manager.block_size]
        for child in seq.pending_forks:
            child.block_table = [self.block_manager.allocator.fork(b) for b in shared]
            child.num_computed_tokens = seq.fork_at
            self._run(child)
        seq.pending_forks = []

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens, requeue in arrival order."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_order)

    def update(self, plan: SchedulerOutput, result: ModelRunnerOutput) -> list[Sequence]:
        """Absorb a step's result; returns the sequences that got a token (finished or not)."""
        changed = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if chunk.draft_ids:
                self._absorb_verified(chunk, result.spec_token_ids[seq.seq_id], changed)
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.commit(seq)
            if seq.pending_forks and seq.num_computed_tokens >= seq.fork_at:
                self._fork(seq)
            token = result.sampled_token_ids.get(seq.seq_id)
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                seq.finish(reason)
                self.block_manager.free(seq)
            changed.append(seq)
        if any(seq.is_finished for seq in changed):
            self.running = [s for s in self.running if not s.is_finished]
        return changed

    def _absorb_verified(self, chunk: ScheduledChunk, tokens: list[int], changed: list[Sequence]) -> None:
        """Keep the verified run: the accepted drafts' K/V stays, the rejected rows' slots are
        rolled back (blocks past the kept ones freed); tokens are appended one by one, so EOS,
        stop tokens and max_tokens end the run exactly where one-token decoding would."""
        seq, num_accepted = chunk.seq, len(tokens) - 1
        self.speculator.stats.record(seq.seq_id, len(chunk.draft_ids), num_accepted)
        reason = None
        for token in tokens:
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                break
        # Computed rows: the chunk's real token and the accepted drafts, of which only those
        # kept (a stop may cut the run) have token ids to name their blocks by.
        num_computed = chunk.start + chunk.num_tokens - len(chunk.draft_ids) + num_accepted
        seq.num_computed_tokens = min(num_computed, seq.num_tokens)
        self.block_manager.trim(seq)
        self.block_manager.commit(seq)
        if reason:
            seq.finish(reason)
            self.block_manager.free(seq)
            self.speculator.stats.forget(seq.seq_id)
        changed.append(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.order


def _seats(seq: Sequence) -> int:
    return 1 + len(seq.pending_forks)
