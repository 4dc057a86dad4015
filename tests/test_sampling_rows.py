"""Persistent per-sequence sampling rows: written once per sequence, reused after it finishes,
grown when full; the batch they give equals one built from the parameters directly."""

import torch

from pravaha_core.sampling_params import SamplingParams
from pravaha_core.sampling_rows import SamplingRows
from pravaha_core.sequence import Sequence


def seq(i: int, **params) -> Sequence:
    return Sequence(f"r{i}", [1, 2, 3], SamplingParams(**params), seed=i)


def test_rows_hold_each_sequences_parameters_and_are_reused_then_grown():
    rows = SamplingRows(torch.device("cpu"), vocab=100, capacity=2)
    a, b = seq(1, temperature=0.5, top_k=7, top_p=0.9, min_p=0.1), seq(2, temperature=1.0)
    batch = rows.batch([b, a], eos_token_ids=[0])
    assert not batch.all_greedy and batch.needs_truncation
    assert batch.temperature.tolist() == [1.0, 0.5] and batch.top_k.tolist() == [100, 7]
    assert batch.seed_keys.tolist() == [b.seed_key, a.seed_key] and batch.positions.tolist() == [0, 0]
    assert torch.allclose(batch.top_p, torch.tensor([1.0, 0.9])) and torch.allclose(batch.min_p, torch.tensor([0.0, 0.1]))
    assert rows.batch([a], [0]).temperature.tolist() == [0.5]           # the same row, not rewritten
    a.finish("stop")                                                    # a finished: its row is reused
    c = seq(3, temperature=0.25)
    assert rows.batch([c], [0]).temperature.tolist() == [0.25] and len(rows.host["temperature"]) == 2
    d = seq(4, temperature=2.0)                                         # every row live: the table grows
    assert rows.batch([b, c, d], [0]).temperature.tolist() == [1.0, 0.25, 2.0]
    assert len(rows.host["temperature"]) == 4


def test_an_all_greedy_batch_builds_no_parameter_tensors():
    rows = SamplingRows(torch.device("cpu"), vocab=100)
    batch = rows.batch([seq(1, temperature=0), seq(2, temperature=0, logprobs=2)], eos_token_ids=[0])
    assert batch.all_greedy and batch.temperature is None and batch.max_logprobs == 2 and not rows.rows
