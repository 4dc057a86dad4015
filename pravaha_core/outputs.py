"""What the engine returns: one RequestOutput per request, one CompletionOutput per sample.

Shape: `RequestOutput.outputs` is a list of CompletionOutput, one per sample of the request
(`SamplingParams.n`), each with its `index`. From `generate()` it holds all n whole
completions in index order. From `step()` and `stream()` each RequestOutput is a delta: it
lists only the completions that changed in that step, each with what is new since the last
report, and `finished` is True once every sample has finished. `token_ids`, `text`,
`finish_reason`, `error` and `logprobs` on RequestOutput read outputs[0].

`logprobs` (when SamplingParams.logprobs = k): one dict per generated token mapping token id
to log-probability under the model's raw distribution: the top-k alternatives (best first)
plus the sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        return self.outputs[0].error

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def append_delta(completion, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None) -> None:
    """Append one delta's new tokens, text and logprobs to a completion accumulated so far.

    The one accumulator for deltas: the engine's `generate` (CompletionOutput), the worker's
    published record (the wire `Completion`), or a client adding up `TokenEvent`s; anything
    with `token_ids`, `text` and `logprobs` attributes. Finish reasons are the caller's.
    """
    completion.token_ids.extend(token_ids)
    completion.text += text
    if logprobs is not None:
        if completion.logprobs is None:
            completion.logprobs = []
        completion.logprobs.extend(logprobs)
