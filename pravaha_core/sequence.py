"""A request's sequence: its token ids, its block table and its progress. No torch."""

from __future__ import annotations

import enum
import itertools

from .sampling_params import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One generation stream. `token_ids` holds the prompt followed by the output.

    Invariant: `num_computed_tokens` tokens have their K/V in the blocks of `block_table`;
    the rest (at least one while unfinished) still have to go through the model.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        assert prompt_token_ids, "a sequence needs at least one prompt token"
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.arrival = next(_arrival_counter)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.num_preemptions = 0

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
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
