"""A request's sequence: its token ids, its block table and its progress. No torch."""

from __future__ import annotations

import enum
import itertools

from .sampling_params import SamplingParams

_arrival_counter = itertools.count()
_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


M64 = (1 << 64) - 1


def seed_key(seed: int, index: int) -> int:
    """A 32-bit key for the sampler's counter hash, from a request seed and a sample index."""
    x = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & M64   # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return (x ^ (x >> 31)) & 0xFFFFFFFF


class Sequence:
    """One generation stream (sample `index` of its request). `token_ids` holds the prompt
    followed by the output.

    Invariant: `num_computed_tokens` tokens have their K/V in the blocks of `block_table`;
    the rest (at least one while unfinished) still have to go through the model.
    `pending_forks` are the request's other samples: they are created with it and take over
    its first `fork_at // block_size` blocks (shared, ref-counted) once those are computed.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int = 0, index: int = 0):
        assert prompt_token_ids, "a sequence needs at least one prompt token"
        self.request_id = request_id
        self.index = index
        self.params = params
        self.seed = seed
        self.seed_key = seed_key(seed, index)
        self.seq_id = next(_seq_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.arrival = next(_arrival_counter)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_preemptions = 0
        self.fork_at = 0
        self.pending_forks: list[Sequence] = []
        self.block_hashes: list[int] = []     # prefix-cache names of its full blocks (memo)
        self.num_committed_blocks = 0         # leading blocks already named in the prefix cache

    def make_forks(self, block_size: int) -> None:
        """Create the request's samples 1..n-1, to share this one's full prompt blocks."""
        self.fork_at = (self.num_prompt_tokens - 1) // block_size * block_size
        self.pending_forks = [Sequence(self.request_id, self.prompt_token_ids, self.params,
                                       self.seed, i) for i in range(1, self.params.n)]
        for child in self.pending_forks:
            child.arrival = self.arrival

    @property
    def order(self) -> tuple[int, int]:
        """Queue order: arrival, then sample index."""
        return (self.arrival, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
