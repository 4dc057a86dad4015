"""Small building blocks shared by the model families."""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm computed in float32, as HF's Llama does. `native`: fused ops (the compiled CPU
    kernels for float32 inputs, or the Triton ops on CUDA; see `fusable`), or None."""

    def __init__(self, hidden_size: int, eps: float, native=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.native = native

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(residual + x), residual + x), the sum written into
        `residual` in place (the layer's residual stream, as vLLM carries it)."""
        fast = fusable(self.native, x) and x.dim() == 2
        if residual is not None:
            if fast and residual.dtype == x.dtype and residual.is_contiguous():
                return self.native.add_rms_norm_(x, residual, self.weight, self.eps), residual
            residual += x
            return self.forward(residual), residual
        if fast:
            return self.native.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def fusable(ops, x: torch.Tensor) -> bool:
    """Whether fused `ops` take `x`: the Triton ops any CUDA tensor, the CPU kernels float32."""
    return ops is not None and (x.is_cuda or x.dtype == torch.float32)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


def rope_inv_freq(head_dim: int, rope: dict, max_len: int = 0) -> torch.Tensor:
    """Inverse frequencies for the supported rope types (HF's formulas): [D/2], or [max_len, D/2]
    where they depend on the position (longrope)."""
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope_type(rope)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    if kind == "dynamic":
        # HF rescales the base only for sequences longer than max_position_embeddings, which
        # max_model_len never exceeds: within it, dynamic NTK is the default rope.
        return inv_freq
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, rope)
    return _longrope_inv_freq(head_dim, theta, rope, max_len)


def rope_type(rope: dict) -> str:
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind == "su" else kind         # Phi-3's first configs call longrope "su"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return kind


def rope_attention_factor(rope: dict) -> float:
    """The factor HF multiplies cos and sin by (yarn, longrope; 1 otherwise)."""
    kind = rope_type(rope)
    if kind not in ("yarn", "longrope") or rope.get("attention_factor") is not None:
        return float(rope.get("attention_factor") or 1.0)
    factor = _scaling_factor(rope)
    if kind == "longrope":
        old_len = rope["original_max_position_embeddings"]
        return math.sqrt(1 + math.log(factor) / math.log(old_len)) if factor > 1 else 1.0
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _scaling_factor(rope: dict) -> float:
    if rope.get("factor") is not None:
        return float(rope["factor"])
    return rope["max_position_embeddings"] / rope["original_max_position_embeddings"]


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, rope: dict) -> torch.Tensor:
    """YaRN: interpolated (divided by factor) below a ramp of dims, extrapolated above it."""
    factor, old_len = _scaling_factor(rope), rope["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high                  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _longrope_inv_freq(dim: int, theta: float, rope: dict, max_len: int) -> torch.Tensor:
    """[max_len, D/2]: the short factors below original_max_position_embeddings, the long ones
    from there on. HF rotates a whole sequence by the long factors once it is longer than that
    (its generate recomputes the cache at the switch); here a token's rotation depends on its
    position only, so cached blocks stay valid under prefix caching and recomputation. Greedy
    output therefore matches HF while sequences stay within that length, and may differ past it."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(rope["short_factor"], dtype=torch.float32) * theta ** shape)
    long = 1.0 / (torch.tensor(rope["long_factor"], dtype=torch.float32) * theta ** shape)
    use_long = torch.arange(max_len)[:, None] >= rope["original_max_position_embeddings"]
    return torch.where(use_long, long, short)


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_len, rotary_dim]; rotate-half layout like HF Llama. With
    a `partial_rotary_factor` under 1, only the first rotary_dim dims of each head rotate."""

    def __init__(self, head_dim: int, max_len: int, rope: dict):
        super().__init__()
        self.rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))
        inv_freq = rope_inv_freq(self.rotary_dim, rope, max_len)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq      # [max_len, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_factor(rope)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H, D]; k [T, KVH, D]."""
        d = self.rotary_dim
        if d < q.shape[-1]:
            q_rot, k_rot = self(positions, q[..., :d], k[..., :d])
            return torch.cat((q_rot, q[..., d:]), -1), torch.cat((k_rot, k[..., d:]), -1)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedLinear(nn.Module):
    """A float32 CPU linear layer whose weight is reordered once into a kernel's layout; the
    dense weight is dropped. Two layouts:

    - oneDNN's blocked layout (what torch's inductor does when it freezes a model): on CPUs
      where MKL's sgemm is slow for the thin decode shapes ([tokens, hidden] x [hidden,
      3*hidden]) this runs them 1.5-2.5x faster, and on AVX-512 hosts it is near the FMA peak;
    - with `native` (the compiled kernels module), column panels for its GEMM (kernels/gemm.cpp,
      AVX2 or AVX-512), which streams decode-sized weights near the DRAM's bandwidth where
      oneDNN falls well short of it (see `panel_gemm_preferred`).

    `glu` (panels only): the layer is a fused gate/up projection ([gate; up] rows) and returns
    silu(gate) * up, [.., out_features / 2], computed in the GEMM's epilogue (no [.., 2I]
    intermediate, no second pass)."""

    def __init__(self, linear: nn.Linear, native=None, glu: bool = False):
        super().__init__()
        if glu and (native is None or linear.out_features % 2):
            raise ValueError("PackedLinear: glu needs the native panels and an even out_features")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.native, self.glu = native, glu
        weight = linear.weight.detach()
        self.packed = (native.pack_panels(weight, glu) if native is not None
                       else torch.ops.mkldnn._reorder_linear_weight(weight, None))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        if x.dim() == 2:
            return self.native.panel_linear(x, self.packed, self.bias, self.out_features, self.glu)
        flat = x.reshape(-1, x.shape[-1])
        out = self.native.panel_linear(flat, self.packed, self.bias, self.out_features, self.glu)
        return out.view(*x.shape[:-1], out.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight, unpacked (a copy)."""
        if self.native is None:
            return self.packed.to_dense()
        rows = self.packed.transpose(1, 2)                       # [panels, P, in]
        if not self.glu:
            return rows.reshape(-1, self.in_features)[:self.out_features].clone()
        half, inter = rows.shape[1] // 2, self.out_features // 2
        return torch.cat([rows[:, :half].reshape(-1, self.in_features)[:inter],
                          rows[:, half:].reshape(-1, self.in_features)[:inter]])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


def panel_gemm_preferred(native) -> bool:
    """Whether float32 linears take the native panel GEMM instead of oneDNN: wherever it is built
    (AVX2 with FMA). SmolLM2-135M's 30 layers, 2 threads:

    - a 2-core AMD EPYC (Zen 3, AVX2): 29 vs 57 ms at 1 row, 45 vs 74 at 16, 136 vs 177 at 64,
      level at 2048;
    - a 2-core Intel Xeon with AVX-512: 19 vs 27 ms at 1 row, 29 vs 40 at 16, 61 vs 80 at 64,
      7% slower at 2048 (prefill), where oneDNN is near the FMA peak.
    """
    return native is not None and getattr(native, "panel_gemm", False)


@torch.no_grad()
def pack_linears(model: nn.Module, native=None) -> int:
    """Replace every float32 nn.Linear (and a tied LM head, as a separate head) with a
    PackedLinear (panels for the native GEMM where `panel_gemm_preferred(native)`, else oneDNN's
    layout), each checked against F.linear on a random input first; a layer that cannot be
    packed, or packs wrongly, stays as it is. A module naming one of its linears in
    `glu_projection` gets that one with the SiLU-multiply fused in (panels only). Returns how
    many layers were packed."""
    panels = panel_gemm_preferred(native)
    if not panels and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return 0
    packed = 0
    tied = getattr(model, "tied_embedding", None)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if tied is not None and hasattr(model, "lm_head"):
        head = nn.Linear(tied.weight.shape[1], tied.weight.shape[0], bias=False)
        head.weight = tied.weight
        targets.append(("lm_head", head))
    for name, module in targets:
        if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        glu = panels and getattr(parent, "glu_projection", None) == child
        try:
            new = PackedLinear(module, native if panels else None, glu=glu)
            x = torch.randn(3, module.in_features)
            want = torch.nn.functional.linear(x, module.weight, module.bias)
            if glu:
                gate, up = want.chunk(2, dim=-1)
                want = torch.nn.functional.silu(gate) * up
            if not torch.allclose(new(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6):
                continue
        except RuntimeError:
            continue
        setattr(parent, child, new)
        packed += 1
    return packed


@torch.no_grad()
def onto_huge_pages(model: nn.Module, min_bytes: int = 1 << 20) -> int:
    """Move the model's large dense CPU tensors (parameters, buffers, packed panels) into one
    buffer on transparent huge pages (see `kernels.advise_huge_pages`): decode streams every
    weight each step, and a 4 KiB page ends each hardware prefetch stream and costs a TLB
    entry. W1 on an AVX-512 EPYC: 12.14 -> 11.89 s (three runs each, interleaved). Tied
    tensors stay tied. Returns the bytes moved: 0 where the OS gives no huge pages, or where
    the two copies the move holds for a moment would take over half of the available memory."""
    from .. import kernels

    slots: dict[int, list] = {}                     # id(tensor) -> [tensor, [(owner, kind, name)]]
    for module in model.modules():
        named = [(module, "param", n, t) for n, t in module._parameters.items()]
        named += [(module, "buffer", n, t) for n, t in module._buffers.items()]
        if isinstance(module, PackedLinear):
            named.append((module, "attr", "packed", module.packed))
        for owner, kind, name, t in named:
            if (t is None or t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous()
                    or t.numel() * t.element_size() < min_bytes):
                continue
            slots.setdefault(id(t), [t, []])[1].append((owner, kind, name))
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t, _ in slots.values()]
    total, page = sum(sizes), kernels.HUGE_PAGE
    if total < page or total > kernels.available_memory() // 2:    # the move holds two copies at once
        return 0
    # Whole huge pages, aligned: the tensors start at the first huge-page boundary of the buffer.
    buffer = torch.empty(total + 2 * page, dtype=torch.uint8)
    offset = -buffer.data_ptr() % page
    arena = buffer[offset: offset + -(-total // page) * page]
    if kernels.advise_huge_pages(arena) < total:
        return 0
    offset = 0
    for (t, owners), size in zip(slots.values(), sizes):
        moved = arena[offset: offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        moved.copy_(t)
        offset += size
        for owner, kind, name in owners:
            if kind == "param":
                owner._parameters[name].data = moved
            elif kind == "buffer":
                owner._buffers[name] = moved
            else:
                setattr(owner, name, moved)
    return total
