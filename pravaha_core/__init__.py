"""Pravāha's inference engine: paged KV cache, continuous batching, our own model code.

Exports resolve lazily, so `pravaha_core.sampling_params` (used by the client SDK) can be
imported without loading torch.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": ".engine", "EngineConfig": ".config", "SamplingParams": ".sampling_params",
    "RequestOutput": ".outputs", "CompletionOutput": ".outputs",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'pravaha_core' has no attribute {name!r}")
