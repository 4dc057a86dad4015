"""The engine: requests in, per-step token deltas out, over a paged KV cache."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch

from . import kernels, quantization
from .block_manager import BlockManager
from .config import EngineConfig
from .loader import load_model
from .metrics import EngineStats
from .model_runner import ModelRunner, bytes_per_block
from .output_processor import CompletionStream
from .outputs import CompletionOutput, RequestOutput, append_delta
from .sampling_params import SamplingParams
from .scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput
from .sequence import Sequence, _arrival_counter
from .spec_decode import NgramSpeculator, parse_speculative_config
from .structured import StructuredOutputs

Prompt = str | list[int]


@dataclass
class _Request:
    prompt_token_ids: list[int]
    streams: dict[int, CompletionStream] = field(default_factory=dict)  # sample index -> stream

    @property
    def finished(self) -> bool:
        if len(self.streams) == 1:
            return self.streams[0].seq.is_finished
        return all(s.seq.is_finished for s in self.streams.values())


class Engine:
    """Continuous-batching engine. `generate` / `stream` for offline use; `add_request`,
    `step`, `abort`, `has_unfinished`, `num_admittable` for a serving loop (don't mix the two
    on one engine at the same time)."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **settings):
        """`Engine(model, **settings)` with EngineConfig's field names, or `Engine(config=...)`.
        Unknown settings, or a config given with settings beside it, raise ValueError."""
        self.config = config = _engine_config(model, config, settings)
        cpu = (kernels.setup_cpu(config.native_kernels, config.kernel_march, config.huge_pages)
               if config.device_type == "cpu" else None)
        loaded = load_model(config, cpu)
        self._model_info = {"quantization": loaded.quant.method if loaded.quant else None,
                            "dtype": config.dtype,
                            "weight_bytes": quantization.weight_bytes(loaded.model),
                            "linear_weight_bytes": quantization.linear_weight_bytes(loaded.model),
                            "kernels": quantization.kernel_counts(loaded.model)}
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.model.vocab_size
        self.bytes_per_block = bytes_per_block(loaded.model, config.block_size, config.cache_dtype)
        num_blocks = self._num_blocks(config)
        eos = self.tokenizer.eos_token_ids
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size)
        self.runner = ModelRunner(loaded, config, num_blocks, eos, cpu, self.structured)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        speculator = (NgramSpeculator(parse_speculative_config(config.speculative_config))
                      if config.speculative_config else None)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len, eos, speculator)
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self._reports: list[RequestOutput] = []   # finished outside a step (error at add, abort)
        self._parked: list[tuple[Sequence, Future]] = []   # waiting for their grammar to compile
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)   # seeds for requests that give none

    def _num_blocks(self, config: EngineConfig) -> int:
        budget = config.kv_cache_bytes
        if budget is None:
            budget = int(free_memory_bytes(config.device) * config.effective_kv_cache_fraction)
            if config.device_type == "cpu":   # host memory is shared: take no more than can be used
                blocks_per_seq = -(-self.max_model_len // config.block_size)
                budget = min(budget, config.max_num_seqs * blocks_per_seq * self.bytes_per_block)
        num_blocks = budget // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes: {budget} bytes is less than one KV block "
                             f"({self.bytes_per_block} bytes)")
        return num_blocks

    # ---- serving API -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | dict | None = None,
                    output_prefix: list[int] | None = None) -> None:
        """Queue a request. Bad arguments raise ValueError; a request that can never fit is
        accepted and reported by the next `step()` with finish_reason "error".

        `output_prefix`: tokens this request already generated (e.g. streamed by a worker that
        died). They count as output (max_tokens, min_tokens, penalties, the seeded draw's
        position), so generation continues exactly where it stopped; they are not reported again.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        params = _params(params)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(64)
        seq = Sequence(request_id, self._token_ids(prompt), params, seed=seed)
        if output_prefix:
            if params.n != 1 or len(output_prefix) >= params.max_tokens:
                raise ValueError("output_prefix: needs n == 1 and fewer tokens than max_tokens")
            seq.token_ids += self._token_ids(list(output_prefix))
        req = self._requests[request_id] = _Request(seq.prompt_token_ids)
        req.streams[0] = CompletionStream(seq, self.tokenizer)
        if params.structured_outputs is not None:   # scheduled once its grammar is compiled
            self._parked.append((seq, self.structured.submit(params.structured_outputs)))
        else:
            self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Hand a new request's sequence to the scheduler; streams for its other samples."""
        self.scheduler.add(seq)
        streams = self._requests[seq.request_id].streams
        for s in seq.pending_forks:
            streams[s.index] = CompletionStream(s, self.tokenizer)
        if seq.is_finished:
            self._reports.append(self._report(seq.request_id, [seq]))

    def _admit_compiled(self) -> None:
        """Schedule the parked requests whose grammar is ready (waiting for one when nothing
        else can run, so a step never spins)."""
        if not self._parked:
            return
        if not self.scheduler.has_unfinished():
            wait([f for _, f in self._parked], return_when=FIRST_COMPLETED)
        parked, self._parked = self._parked, []
        for seq, future in parked:
            if not future.done():
                self._parked.append((seq, future))
            elif future.exception() is not None:
                seq.finish("error", f"structured_outputs: {future.exception()}")
                self._reports.append(self._report(seq.request_id, [seq]))
            else:
                self.structured.bind(seq.request_id, future.result())
                seq.arrival = next(_arrival_counter)   # keeps the waiting queue in arrival order
                self._enqueue(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; the next `step()` reports it ("abort")."""
        parked = next((p for p in self._parked if p[0].request_id == request_id), None)
        if parked is not None:   # still waiting for its grammar
            self._parked.remove(parked)
            parked[0].finish("abort")
        seqs = [parked[0]] if parked is not None else self.scheduler.abort(request_id)
        if not seqs:
            return False
        self._reports.append(self._report(request_id, seqs))
        return True

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and forward pass; returns each changed request's delta."""
        started = time.perf_counter()
        self._admit_compiled()
        outputs, self._reports = self._reports, []
        if self.scheduler.has_unfinished():
            plan = self.scheduler.schedule()
            assert plan.chunks, "unfinished requests but nothing schedulable"
            result = self.runner.execute(plan)
            changed = self.scheduler.update(plan, result)
            outputs += self._absorb(changed, result)
            self._count(plan, len(changed))
        self.stats.step_time_s += time.perf_counter() - started
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._reports) or bool(self._parked)

    def num_admittable(self) -> int:
        """How many more requests can be added now without overcommitting seats or KV blocks."""
        return max(0, self.scheduler.num_admittable() - sum(seq.params.n for seq, _ in self._parked))

    def kv_cache_info(self) -> dict:
        bm = self.block_manager
        return {"block_size": bm.block_size, "num_blocks": bm.num_blocks,
                "bytes_per_block": self.bytes_per_block,
                "bytes_total": bm.num_blocks * self.bytes_per_block,
                "blocks_free": bm.num_free_blocks, "blocks_used": bm.num_blocks - bm.num_free_blocks,
                "dtype": self.config.cache_dtype}

    def model_info(self) -> dict:
        """quantization (method or None), dtype, weight_bytes (all parameters and buffers),
        linear_weight_bytes (the part in linear layers, what quantization shrinks), and
        kernels: how many quantized linear layers use each path (int4pack_mm, int8pack_mm, dequant)."""
        return dict(self._model_info, kernels=dict(self._model_info["kernels"]))

    # ---- offline API -------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order, whole completions."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts: expected a list of prompts (strings or token-id lists)")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"params: {len(per_prompt)} given for {len(prompts)} prompts")
        self._require_idle()
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        results: dict[str, RequestOutput] = {}
        for rid, prompt, p in zip(ids, prompts, per_prompt):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for delta in self.step():
                _accumulate(results, delta)
        for out in results.values():
            out.outputs.sort(key=lambda c: c.index)
        return [results[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's deltas as they are generated; the last has finished=True."""
        self._require_idle()
        rid = f"stream-{next(self._ids)}"
        self.add_request(rid, prompt, params)
        try:
            while self.has_unfinished():
                yield from self.step()
        finally:
            self.abort(rid)
            self._reports.clear()

    # ---- internals ---------------------------------------------------------------------
    def _absorb(self, changed: list[Sequence], result: ModelRunnerOutput) -> list[RequestOutput]:
        """Detokenize the step's new tokens, apply stop strings, and build the deltas."""
        by_request: dict[str, list[Sequence]] = {}
        logprobs, constrained = result.logprobs, self.structured.has_bound
        for seq in changed:
            stream = self._requests[seq.request_id].streams[seq.index]
            if logprobs and seq.seq_id in logprobs:
                stream.pending_logprobs.append(logprobs[seq.seq_id])
            if constrained:
                self._follow_grammar(seq)
            if stream.absorb():
                self.scheduler.finish(seq, "stop")
            seqs = by_request.get(seq.request_id)
            if seqs is None:
                by_request[seq.request_id] = [seq]
            else:
                seqs.append(seq)
        return [self._report(rid, seqs) for rid, seqs in by_request.items()]

    def _follow_grammar(self, seq: Sequence) -> None:
        """Advance a constrained sequence's matcher; the grammar's end finishes it ("stop")."""
        outcome = None if seq.is_finished else self.structured.advance(seq)
        if outcome is not None:
            self.scheduler.finish(seq, outcome)
            if outcome == "error":
                seq.error = "structured_outputs: a token the grammar does not allow (output_prefix?)"

    def _report(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        req = self._requests[request_id]
        completions = []
        for seq in (sorted(seqs, key=lambda s: s.index) if len(seqs) > 1 else seqs):
            stream = req.streams[seq.index]
            if seq.is_finished:
                stream.absorb()   # flush text held back by the detokenizer
            completions.append(stream.delta())
        finished = req.finished
        if finished:
            del self._requests[request_id]
            self.structured.release(request_id, [s.seq.seq_id for s in req.streams.values()])
        return RequestOutput(request_id, req.prompt_token_ids, completions, finished)

    def _require_idle(self) -> None:
        if self.has_unfinished():
            raise RuntimeError("generate/stream need an idle engine; requests added with "
                               "add_request are still in flight")

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError("prompt: must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: is empty")
        return ids

    def _count(self, plan: SchedulerOutput, num_sampled: int) -> None:
        s = self.stats
        s.num_steps += 1
        for c in plan.chunks:
            p = c.seq.num_prompt_tokens
            s.num_prompt_tokens += max(0, min(c.start + c.num_tokens, p) - c.start)
        s.num_generated_tokens += num_sampled
        if self.scheduler.speculator is not None:
            spec = self.scheduler.speculator.stats
            s.num_spec_draft_tokens, s.num_spec_accepted_tokens = spec.num_draft_tokens, spec.num_accepted_tokens
            s.num_spec_steps = spec.num_steps
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_cached_prompt_tokens = self.scheduler.num_cached_tokens
        g = self.structured.stats
        s.num_grammars_compiled, s.num_grammar_cache_hits = g.num_compiled, g.num_cache_hits
        s.grammar_compile_time_s = g.compile_time_s


def _engine_config(model: str | None, config: EngineConfig | None, settings: dict) -> EngineConfig:
    if config is None:
        return EngineConfig.from_dict(settings if model is None else dict(settings, model=model))
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config: expected an EngineConfig, got {type(config).__name__}")
    given = sorted(settings) + (["model"] if model is not None else [])
    if given:
        raise ValueError(f"config: given together with {', '.join(given)}; pass an EngineConfig or "
                         "settings, not both")
    return config


def _params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        return SamplingParams.from_dict(params)
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params: expected SamplingParams or dict, got {type(params).__name__}")
    return params


def _accumulate(results: dict[str, RequestOutput], delta: RequestOutput) -> None:
    acc = results.setdefault(delta.request_id, RequestOutput(delta.request_id, delta.prompt_token_ids, []))
    have = {c.index: c for c in acc.outputs}
    for part in delta.outputs:
        out = have.get(part.index)
        if out is None:
            out = CompletionOutput(part.index)
            acc.outputs.append(out)
        append_delta(out, part.token_ids, part.text, part.logprobs)
        out.finish_reason, out.error = part.finish_reason, part.error
    acc.finished = delta.finished


def free_memory_bytes(device: str) -> int:
    """Free device memory (CUDA) or the kernel's MemAvailable (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
