"""Copy HF-named tensors into our (partly fused) parameters, checking every shape."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# (our fused parameter, HF's piece, shard index), e.g. ("qkv_proj", "k_proj", 1)
Stacked = list[tuple[str, str, int]]
# Tensors of a fused layer that every piece holds whole (and must agree on), not stacked:
# a quantized layer's input-column -> group map.
WHOLE = (".g_idx",)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       rename: Callable[[str], str | None], stacked: Stacked = (),
                       shard_sizes: Callable[[str], list[int]] | None = None,
                       transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """`rename` maps an HF name to ours (None: skip); `stacked` lists fused parameters whose
    dim-0 split `shard_sizes(our_name)` gives; `transform` may reshape a tensor (e.g. transpose).

    Raises ValueError when a tensor has no home or the wrong shape, or a parameter stays unset.
    """
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    for hf_name, tensor in weights:
        name = rename(hf_name)
        if name is None:
            continue
        target, shard = _locate(name, stacked)
        if target not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter ({target!r})")
        dest = params[target].data
        if shard is not None and target.endswith(WHOLE):
            if any(t == target for t, _ in loaded) and not torch.equal(dest, tensor.to(dest.dtype)):
                raise ValueError(f"checkpoint tensor {hf_name!r} differs from the other pieces of the fused "
                                 f"layer {target!r}; fusing them is not supported")
        elif shard is not None:
            sizes = shard_sizes(target)
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if transform is not None:
            tensor = transform(target, tensor)
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)}")
        dest.copy_(tensor.to(dest.dtype))
        loaded.add((target, shard))
    missing = [n for n in params if not _is_loaded(n, loaded, stacked)]
    if missing:
        raise ValueError(f"checkpoint lacks tensors for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))


def _locate(name: str, stacked: Stacked) -> tuple[str, int | None]:
    for fused, piece, shard in stacked:
        if f".{piece}." in name:
            return name.replace(f".{piece}.", f".{fused}."), shard
    return name, None


def _is_loaded(name: str, loaded: set[tuple[str, int | None]], stacked: Stacked) -> bool:
    if (name, None) in loaded:
        return True
    shards = {s for fused, _, s in stacked if f".{fused}." in name}
    return bool(shards) and all((name, s) in loaded for s in shards)
