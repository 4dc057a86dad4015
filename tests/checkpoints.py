"""Tiny real HF checkpoints made on the spot: random weights plus a freshly trained tokenizer."""

from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pravaha means flow: prompts flow in, tokens flow out.",
    "Continuous batching keeps the accelerator busy while requests come and go.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "नमस्ते दुनिया — प्रवाह। Grüße, señor! 你好，世界。 🙂🚀",
    "def add(a, b):\n    return a + b\n",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :",
] * 20

FAMILY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=512, sliding_window=4096),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on CORPUS, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def make_checkpoint(family: str, path: str, seed: int = 0, **overrides) -> str:
    """Save a random-weight HF model of `family` and its tokenizer into `path`."""
    import transformers

    tokenizer = train_tokenizer()
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "gpt2": transformers.GPT2Config}[family]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[family]
    eos = tokenizer.eos_token_id
    kwargs = dict(FAMILY_CONFIGS[family], vocab_size=len(tokenizer), eos_token_id=eos,
                  bos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs))
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference: HF `generate`, greedy, one prompt at a time; generated ids only."""
    from transformers import AutoModelForCausalLM

    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


_models: dict[str, object] = {}


def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    if path not in _models:
        _models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _models[path]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def make_chat_checkpoint(path: str) -> str:
    """A tiny llama checkpoint whose tokenizer has a plain "role: content" chat template."""
    from transformers import AutoTokenizer

    make_checkpoint("llama", path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path
