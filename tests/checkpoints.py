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
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
# The newer families: weights drawn wider (std 0.1) and norm weights perturbed, so that a norm,
# scale or soft cap we got wrong changes the greedy output.
NEW_FAMILY_CONFIGS = {
    "qwen3": dict(_SMALL, head_dim=32),
    # Phi-4-mini's rope: partial, longrope (the long factors past 200 tokens: see test_model_families).
    "phi3": dict(_SMALL, original_max_position_embeddings=200, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
        short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[1.0, 2.0, 4.0, 9.0])),
    "mixtral": dict(_SMALL, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_SMALL, head_dim=16, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    "gemma2": dict(_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    "gemma3": dict(_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                    "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0)}),
}
FAMILY_CONFIGS.update(NEW_FAMILY_CONFIGS)
# family -> the transformers (config, model) class names
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
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
    cfg_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[family])
    eos = tokenizer.eos_token_id
    kwargs = dict(FAMILY_CONFIGS[family], vocab_size=len(tokenizer), eos_token_id=eos,
                  bos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs))
    if family in NEW_FAMILY_CONFIGS:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.2)
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
