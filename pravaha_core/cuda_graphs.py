"""Decode steps replayed from CUDA graphs.

The decode forward is captured once per batch-size bucket (1, 2, 4, 8, then steps of 16 up to
max_num_seqs) into static input buffers: token ids, positions, slots, query starts, context
lengths and block tables. A decode-only step copies its inputs into the smallest bucket that
fits, pads the rest (padding rows store nothing: slot -1; they attend to one key), and replays
that bucket's graph. Prefill and mixed steps stay eager. The graphs share one memory pool and
are captured at start-up, after the KV cache is allocated.

Without capture (`capture=False`: the CPU, tests) the same buffers, padding and metadata run
eagerly, so everything but the capture itself is exercised anywhere.
"""

from __future__ import annotations

import logging

import torch

from .attention.base import StepLayout
from .attention.triton_backend import TritonMetadata

log = logging.getLogger("pravaha.cuda_graphs")


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Static buffers and, where captured, one CUDA graph per bucket, for `runner`'s model
    with the Triton attention backend (its kernels take static shapes)."""

    def __init__(self, runner, max_num_seqs: int, max_blocks_per_seq: int, capture: bool):
        if runner.attention.name != "triton":
            raise ValueError("CUDA graphs need the triton attention backend (static shapes)")
        self.runner = runner
        self.sizes = bucket_sizes(max_num_seqs)
        self.max_blocks = max_blocks_per_seq
        n, dev = self.sizes[-1], runner.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)   # one row per sequence
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket holding `num_seqs` rows, or None past the largest."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def fits(self, layout: StepLayout) -> bool:
        """A decode-only step within the largest bucket and the captured block-table width."""
        return (layout.num_decode == layout.num_seqs and self.bucket(layout.num_seqs) is not None
                and layout.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] of a decode step that `fits`."""
        n = layout.num_seqs
        size = self.bucket(n)
        self.fill(input_ids, layout, size)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self._forward(size)[:n]

    def fill(self, input_ids: torch.Tensor, layout: StepLayout, size: int) -> None:
        """Copy the step into the buffers; rows n..size are padding."""
        n, width = layout.num_seqs, layout.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(layout.positions, non_blocking=True)
        self.slots[:n].copy_(layout.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(layout.context_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(layout.block_tables, non_blocking=True)
        if size > n:
            self.input_ids[n:size] = 0
            self.positions[n:size] = 0
            self.slots[n:size] = -1           # padding stores nothing
            self.seq_lens[n:size] = 1         # and attends to one key (block 0, slot 0)
            self.block_tables[n:size] = 0

    def metadata(self, size: int) -> TritonMetadata:
        backend = self.runner.attention
        segments = backend.forced_segments or backend.graph_segments(size)
        return TritonMetadata(backend, self.slots[:size], self.query_start_loc[:size + 1], self.seq_lens[:size],
                              self.block_tables[:size], size, 1, segments)

    def _forward(self, size: int) -> torch.Tensor:
        runner = self.runner
        return runner.model(self.input_ids[:size], self.positions[:size], self.metadata(size), runner.kv_caches)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):          # largest first: later ones reuse its pool
                self._forward(size)                    # warm up: compile kernels, settle allocations
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for %d batch sizes (1 to %d)", len(self.sizes), self.sizes[-1])
