"""What the engine returns: one RequestOutput per request, one CompletionOutput per sample.

Shape: `RequestOutput.outputs` is a list of CompletionOutput (one entry today; n > 1 will add
more). `token_ids`, `text`, `finish_reason` and `error` on RequestOutput read outputs[0].
From `step()` and `stream()` they hold what is new since the last report (deltas); from
`generate()` they hold the whole completion.
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
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
