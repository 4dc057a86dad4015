"""Tokenizers (an HF wrapper and the byte-level one of the dummy presets) and streaming detokenization."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: set[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; then <|eos|> and <|bos|>. For random-weight presets.

    A random model also emits ids past the byte range; they fold onto printable ASCII
    (32 + id % 95) so the demo shows text for every token.
    """

    EOS, BOS = 256, 257

    def __init__(self, vocab_size: int):
        assert vocab_size >= 258
        self.vocab_size = vocab_size
        self.eos_token_ids = {self.EOS}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        raise ValueError("messages: this model has no chat template (use a prompt instead)")

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for tok in token_ids:
            if tok in (self.EOS, self.BOS):
                if not skip_special_tokens:
                    out.append(buf.decode("utf-8", errors="replace"))
                    out.append("<|eos|>" if tok == self.EOS else "<|bos|>")
                    buf = bytearray()
                continue
            buf.append(tok if tok < 256 else 32 + tok % 95)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """Wraps a transformers tokenizer loaded from a checkpoint directory or hub id."""

    def __init__(self, path: str, eos_token_ids: set[int]):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path that failed
            raise ValueError(f"could not load a tokenizer from {path!r}: {exc}") from exc
        self.vocab_size = len(self._tok)
        eos = set(eos_token_ids)
        if not eos and self._tok.eos_token_id is not None:
            eos = {self._tok.eos_token_id}
        self.eos_token_ids = eos

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Render chat messages with the checkpoint's template, ready for the assistant's turn."""
        if not getattr(self._tok, "chat_template", None):
            raise ValueError("messages: this model has no chat template (use a prompt instead)")
        try:
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's bad input
            raise ValueError(f"messages: the chat template failed: {exc}") from exc
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas that concatenate to the full text.

    It decodes a short window of earlier tokens with the new ones and emits what the new ones
    add, holding text back while it ends in an unfinished UTF-8 character (U+FFFD).
    """

    CONTEXT = 5  # prompt tokens decoded as left context (space handling of word-piece tokenizers)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self._prefix: str | None = None     # decode of ids[prefix_offset:read_offset], kept while they stand

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        if self._prefix is None:
            self._prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        prefix = self._prefix
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix = None
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character stays U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix = None
        self.text += delta
        return delta
