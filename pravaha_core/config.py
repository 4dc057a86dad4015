"""The one engine configuration object, validated once and passed down."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .fields import check_known, reject_unknown_keywords
from .spec_decode import parse_speculative_config

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATION_METHODS = ("int8", "gptq", "awq")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")

# Default share of free memory given to the KV cache when `kv_cache_bytes` is None,
# measured after the weights are loaded. CUDA: of free device memory. CPU: of the
# kernel's MemAvailable (the CPU share is lower because the host also runs everything else).
DEFAULT_KV_CACHE_FRACTION = {"cuda": 0.90, "cpu": 0.20}


@reject_unknown_keywords
@dataclass
class EngineConfig:
    """Everything the engine needs to know, checked in `__post_init__`.

    Each field's entry below is its help text: `pravaha worker --help` and `pravaha generate
    --help` show it beside the generated flag (a new field needs an entry; a test checks).

    model: checkpoint directory, HF hub id, or dummy:<preset> (random weights of a built-in shape).
    dtype: weights and activations: float32, float16 or bfloat16.
    device: cpu, cuda or cuda:N.
    block_size: tokens per KV-cache block.
    kv_cache_bytes: KV-cache budget in bytes; none: kv_cache_fraction of free memory (on CPU
      capped at what max_num_seqs sequences of max_model_len tokens can use).
    kv_cache_fraction: share of free memory for the KV cache when kv_cache_bytes is none;
      none: 0.9 on CUDA, 0.2 of MemAvailable on CPU.
    kv_cache_dtype: auto (the model's dtype) or float32 / bfloat16 / float16. A 16-bit cache
      under a float32 model holds twice the tokens; keys and values are rounded when stored,
      so greedy output can differ from the float32 reference.
    max_num_seqs: most sequences in one batch.
    max_num_batched_tokens: most tokens in one forward pass (longer prompts are chunked).
    max_model_len: context limit; none: the model's own (max_position_embeddings).
    load_format: auto (read the weights) or dummy (random weights for the checkpoint's config).
    seed: seeds the requests that give no seed of their own.
    tokenizer: tokenizer directory or hub id; none: the model's.
    native_kernels: CPU: the compiled kernels (attention, norms, GEMM) and packed float32
      linears; off: plain torch paths.
    kernel_march: CPU: the -march the native kernels are built for (native: this CPU;
      haswell: the AVX2 paths, for images shared across CPU kinds).
    huge_pages: CPU: weights and KV cache on transparent huge pages where the OS gives them.
    enable_prefix_caching: reuse the KV blocks of prompt prefixes seen before.
    quantization: none, int8 (quantize linear weights on load), gptq or awq (checkpoints in
      those formats; detected from config.json's quantization_config when none).
    attention_backend: auto (triton on CUDA, cpu on the CPU, where they work; else torch),
      torch (SDPA over gathered blocks, the reference), cpu (the native C++ kernels) or triton
      (one paged flash-attention kernel; CUDA, or TRITON_INTERPRET=1 on the CPU).
    cuda_graphs: CUDA: decode steps replayed from CUDA graphs captured at start-up (needs the
      triton backend); off: every step eager (vLLM's enforce_eager).
    speculative_config: none (off) or vLLM's object as a dict or JSON, e.g. {"method": "ngram",
      "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}; plain greedy
      n=1 sequences without stop strings, logprobs, penalties or structured outputs speculate.
    """

    model: str = "dummy:llama-tiny"
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    native_kernels: bool = True
    kernel_march: str = "native"
    huge_pages: bool = True
    enable_prefix_caching: bool = True
    quantization: str | None = None
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    speculative_config: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: must be a non-empty string (directory, hub id or dummy:<preset>)")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(SUPPORTED_DTYPES)}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not 'auto' or one of "
                             f"{', '.join(SUPPORTED_DTYPES)}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r} is not 'cpu' or 'cuda[:N]'")
        _require_positive("block_size", self.block_size)
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.kv_cache_bytes is not None:
            _require_positive("kv_cache_bytes", self.kv_cache_bytes)
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction: {self.kv_cache_fraction} is not in (0, 1]")
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization: {self.quantization!r} is not one of "
                             f"{', '.join(QUANTIZATION_METHODS)} (or None)")
        for name in ("native_kernels", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        for name in ("huge_pages", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.kernel_march, str) or not self.kernel_march.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"kernel_march: {self.kernel_march!r} is not a -march value")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend: {self.attention_backend!r} is not one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.speculative_config is not None:
            self.speculative_config = asdict(parse_speculative_config(self.speculative_config))
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: {self.load_format!r} is not 'auto' or 'dummy'")

    @property
    def device_type(self) -> str:
        return str(self.device).split(":", 1)[0]

    @property
    def cache_dtype(self) -> str:
        """The KV cache's dtype: kv_cache_dtype, or the model's dtype for "auto"."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def effective_kv_cache_fraction(self) -> float:
        if self.kv_cache_fraction is not None:
            return self.kv_cache_fraction
        return DEFAULT_KV_CACHE_FRACTION[self.device_type]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, settings: dict) -> EngineConfig:
        """Build from keyword settings; a name that is no field raises ValueError."""
        check_known(cls, settings, "engine setting")
        return cls(**settings)


def _require_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
