"""Pravāha's inference engine: paged KV cache, continuous batching, our own model code."""

from .config import EngineConfig
from .engine import Engine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
