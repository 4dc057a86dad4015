"""Weight-only quantization: INT8 on load, and GPTQ / AWQ integer checkpoints, in plain torch.

Every quantized linear layer ends up as a `QuantLinear` whose weight is, exactly,

    W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]        g = g_idx: input column -> group

with integer codes q, integer zero points z and float scales s. Checkpoints are read into that
form (`decode_gptq`, `decode_awq`), then `QuantLinear.from_codes` picks a runtime kernel:

  int4pack_mm  4-bit codes, groups of 32..256 contiguous after an act-order permutation of the
               input (torch's int4 kernels: `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm`)
  int8pack_mm  8-bit symmetric, one scale per output channel (`torch._weight_int8pack_mm`)
  dequant      anything else: dequantize per call into the activation dtype, then `F.linear`

The kernels take bfloat16 activations; with a float32 model the layer casts around them (torch's
int8 kernel with float32 activations is far slower than float32 matmul). Each kernel is checked
against the dequantized weights once at load; a kernel that is missing or disagrees falls back to
`dequant` with a warning, and `model_info()` counts which path every layer uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from .models.layers import PackedLinear

log = logging.getLogger("pravaha.quantization")

METHODS = ("int8", "gptq", "awq")
GPTQ_BITS = (2, 4, 8)
INT4_GROUP_SIZES = (256, 128, 64, 32)      # group sizes torch's int4 kernels accept, largest first
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # AWQ packs output columns in this order per int32
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass
class QuantSpec:
    """What a checkpoint (or the user) asks for. zero_offset: GPTQ v1 stores zero points minus 1."""

    method: str
    bits: int = 8
    group_size: int = -1
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0
    lm_head: bool = False
    exclude: list[str] = field(default_factory=list)

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)


def resolve(requested: str | None, hf_config: dict, from_preset: bool = False) -> QuantSpec | None:
    """The spec to load with: the checkpoint's `quantization_config` when it has one (and it
    agrees with `requested`), else `requested` applied on load. Raises ValueError naming what is
    unsupported. Dummy presets have no checkpoint: gptq/awq then means random weights rounded to
    nearest in 4 bits, groups of 128 (for benchmarks)."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization: {requested!r} is not one of {', '.join(METHODS)} (or None)")
    qc = hf_config.get("quantization_config")
    if qc is None:
        if requested in ("gptq", "awq") and not from_preset:
            raise ValueError(f"quantization={requested!r} needs a {requested.upper()} checkpoint, and this "
                             "config.json has no quantization_config; use quantization='int8' to quantize "
                             "on load, or `pravaha quantize` to write a GPTQ checkpoint")
        if requested in ("gptq", "awq"):
            return QuantSpec(requested, bits=4, group_size=128, sym=False)
        return QuantSpec("int8") if requested == "int8" else None
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise ValueError(f"checkpoint quantization {method!r} is not supported (supported: gptq, awq, "
                         "and int8 on load for unquantized checkpoints)")
    if requested is not None and requested != method:
        raise ValueError(f"quantization={requested!r} does not apply: the checkpoint is already "
                         f"quantized with {method}")
    return _gptq_spec(qc) if method == "gptq" else _awq_spec(qc)


def _gptq_spec(qc: dict) -> QuantSpec:
    bits = int(qc.get("bits", 4))
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits={bits} is not supported (supported: {', '.join(map(str, GPTQ_BITS))})")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (supported: gptq, gptq_v2)")
    if qc.get("dynamic"):
        raise ValueError("GPTQ per-module `dynamic` overrides are not supported")
    if qc.get("is_marlin_format"):
        raise ValueError("GPTQ marlin-format checkpoints are not supported (supported: gptq, gptq_v2)")
    return QuantSpec("gptq", bits=bits, group_size=_group_size(qc), desc_act=bool(qc.get("desc_act", False)),
                     sym=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0,
                     lm_head=bool(qc.get("lm_head", False)))


def _awq_spec(qc: dict) -> QuantSpec:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise ValueError(f"AWQ bits={bits} is not supported (supported: 4)")
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (supported: gemm)")
    if not qc.get("zero_point", True):
        raise ValueError("AWQ without zero points is not supported")
    return QuantSpec("awq", bits=4, group_size=_group_size(qc, "q_group_size"), sym=False,
                     exclude=list(qc.get("modules_to_not_convert") or []))


def _group_size(qc: dict, alias: str = "group_size") -> int:
    gs = int(qc.get("group_size", qc.get(alias, 128)))
    if gs != -1 and gs < 1:
        raise ValueError(f"quantization group_size={gs} is not valid (a positive size or -1)")
    return gs


# ---- checkpoint formats -> (codes, zeros, scales, g_idx) ------------------------------------------

def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits codes each, lowest bits first, unpacked along `dim`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32)
    if dim == 0:
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, packed.shape[1])
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def decode_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, spec: QuantSpec):
    """GPTQ tensors (qweight [in/p, out], qzeros [G, out/p], scales [G, out], g_idx [in]) ->
    codes [out, in] uint8, zeros [out, G], scales [out, G] float32, g_idx [in] int64."""
    bits = spec.bits
    codes = _unpack(qweight, bits, dim=0)                                     # [in, out]
    in_features, out_features = codes.shape
    zeros = (_unpack(qzeros, bits, dim=1)[:, :out_features] + spec.zero_offset) & ((1 << bits) - 1)
    _check_groups(scales, zeros, in_features, out_features, spec)
    if g_idx is None:
        g_idx = _default_g_idx(in_features, spec.group_size)
    g_idx = g_idx.to(torch.int64)
    if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
        raise ValueError(f"GPTQ g_idx has shape {tuple(g_idx.shape)} / range outside {scales.shape[0]} groups")
    return (codes.t().contiguous().to(torch.uint8), zeros.t().float().contiguous(),
            scales.t().float().contiguous(), g_idx)


def decode_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, spec: QuantSpec):
    """AWQ GEMM tensors (qweight [in, out/8], qzeros [G, out/8], scales [G, out]) -> as decode_gptq."""
    reverse = torch.tensor([AWQ_ORDER.index(i) for i in range(8)])

    def columns(packed: torch.Tensor) -> torch.Tensor:
        codes = _unpack(packed, 4, dim=1).view(packed.shape[0], -1, 8)
        return codes[:, :, reverse].reshape(packed.shape[0], -1)

    codes, zeros = columns(qweight), columns(qzeros)                           # [in, out], [G, out]
    in_features, out_features = codes.shape
    _check_groups(scales, zeros, in_features, out_features, spec)
    return (codes.t().contiguous().to(torch.uint8), zeros.t().float().contiguous(),
            scales.t().float().contiguous(), _default_g_idx(in_features, spec.group_size))


def _check_groups(scales, zeros, in_features: int, out_features: int, spec: QuantSpec) -> None:
    groups = spec.num_groups(in_features)
    if tuple(scales.shape) != (groups, out_features) or tuple(zeros.shape) != (groups, out_features):
        raise ValueError(f"{spec.method} scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match "
                         f"{groups} groups x {out_features} outputs (group_size {spec.group_size}, "
                         f"in_features {in_features})")


def _default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int64)
    return torch.arange(in_features) // group_size


def decode_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], spec: QuantSpec
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with each quantized module's packed tensors replaced by
    `<module>.codes/.zeros/.scales/.g_idx` (what `QuantSlot` holds). Packed tensors are kept until
    the end because a module's pieces may sit in different shards."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        suffix = next((s for s in QUANT_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, tensor
        else:
            parts.setdefault(name[: -len(suffix)], {})[suffix[1:]] = tensor
    for prefix, p in parts.items():
        missing = [k for k in ("qweight", "qzeros", "scales") if k not in p]
        if missing:
            raise ValueError(f"quantized module {prefix!r} lacks {', '.join(missing)} in the checkpoint")
        if spec.method == "gptq":
            decoded = decode_gptq(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), spec)
        else:
            decoded = decode_awq(p["qweight"], p["qzeros"], p["scales"], spec)
        for key, value in zip(("codes", "zeros", "scales", "g_idx"), decoded):
            yield f"{prefix}.{key}", value


# ---- round to nearest (dummy presets, `pravaha quantize --method rtn`) -----------------------------

def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest quantization of weight [out, in] -> codes, zeros, scales, g_idx (as decode_*)."""
    out_features, in_features = weight.shape
    gs = in_features if group_size == -1 else group_size
    if in_features % gs:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {gs}")
    w = weight.float().reshape(out_features, -1, gs)
    top = (1 << bits) - 1
    if sym:
        scales = (w.abs().amax(-1) * 2 / top).clamp(min=1e-8)
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = ((hi - lo) / top).clamp(min=1e-8)
        zeros = (-lo / scales).round().clamp(0, top)
    codes = (w / scales[..., None] + zeros[..., None]).round().clamp(0, top)
    return (codes.reshape(out_features, in_features).to(torch.uint8), zeros, scales,
            _default_g_idx(in_features, gs))


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int, v1: bool = True) -> dict[str, torch.Tensor]:
    """codes [out, in], zeros/scales [out, G] -> GPTQ qweight/qzeros/scales/g_idx (v1 zeros minus 1)."""
    per = 32 // bits

    def pack(values: torch.Tensor) -> torch.Tensor:       # [..., n] -> [..., n / per] along the last dim
        v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per)
        words = (v << (torch.arange(per) * bits)).sum(-1)
        return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)

    stored = (zeros.to(torch.int64) - (1 if v1 else 0)) & ((1 << bits) - 1)
    return {"qweight": pack(codes).t().contiguous(), "qzeros": pack(stored.t().contiguous()),
            "scales": scales.t().contiguous().half(), "g_idx": g_idx.to(torch.int32)}


# ---- layers ----------------------------------------------------------------------------------------

class QuantSlot(nn.Module):
    """Holds a quantized layer's decoded tensors while the checkpoint loads (fused shards stack along
    the output dim, as for plain weights); `finalize` turns it into a QuantLinear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, groups: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

        def frozen(*shape, dtype=torch.float32):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

        self.codes = frozen(out_features, in_features, dtype=torch.uint8)
        self.zeros = frozen(out_features, groups)
        self.scales = frozen(out_features, groups)
        self.g_idx = frozen(in_features, dtype=torch.int64)
        self.bias = frozen(out_features) if bias else None


class QuantLinear(nn.Module):
    """A linear layer over integer weights (see the module docstring); `kernel` names its path."""

    def __init__(self, in_features: int, out_features: int, bits: int, kernel: str,
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.kernel = in_features, out_features, bits, kernel
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("perm", None)      # act-order: input columns sorted by group
        self.group_size = 0

    @classmethod
    def from_codes(cls, codes, zeros, scales, g_idx, bits: int, bias=None, dtype=torch.float32):
        device = codes.device
        codes, zeros, scales, g_idx = codes.cpu(), zeros.cpu().float(), scales.cpu().float(), g_idx.cpu()
        out_features, in_features = codes.shape
        bias = None if bias is None else bias.detach().to(dtype)
        reference = _dequantize(codes, zeros, scales, g_idx)
        for kernel in _kernel_candidates(bits, zeros, g_idx, device):
            layer = cls(in_features, out_features, bits, kernel, bias)
            try:
                layer._build(kernel, codes, zeros, scales, g_idx, device)
                if layer._agrees_with(reference):
                    return layer
                log.warning("%s disagrees with the dequantized weights for a %dx%d layer; using dequant",
                            kernel, out_features, in_features)
            except (RuntimeError, NotImplementedError) as exc:
                log.warning("%s is unavailable for a %dx%d layer (%s); using dequant", kernel,
                            out_features, in_features, str(exc).splitlines()[0])
        layer = cls(in_features, out_features, bits, "dequant", bias)
        layer._build("dequant", codes, zeros, scales, g_idx, device)
        return layer.to(device)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        """INT8 on load: symmetric, one scale per output channel."""
        w = weight.detach().float().cpu()
        scales = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        codes = (w / scales).round().clamp(-127, 127) + 128
        return cls.from_codes(codes.to(torch.uint8).to(weight.device), torch.full_like(scales, 128.0), scales,
                              torch.zeros(w.shape[1], dtype=torch.int64), 8, bias, weight.dtype)

    def _build(self, kernel, codes, zeros, scales, g_idx, device) -> None:
        if kernel == "int8pack_mm":
            self.register_buffer("weight_int8", (codes.to(torch.int16) - 128).to(torch.int8).to(device))
            self.register_buffer("channel_scales", scales[:, 0].to(torch.bfloat16).to(device))
        elif kernel == "int4pack_mm":
            if not _is_sorted(g_idx):
                self.perm = torch.argsort(g_idx, stable=True).to(device)     # a registered buffer
                codes, g_idx = codes[:, self.perm.cpu()], g_idx[self.perm.cpu()]
            per_group = self.in_features // zeros.shape[1]
            self.group_size = next(g for g in INT4_GROUP_SIZES if per_group % g == 0)
            cols = torch.arange(0, self.in_features, self.group_size)
            s, z = scales[:, g_idx[cols]], zeros[:, g_idx[cols]]                # [out, in / group_size]
            # The kernels compute (q - 8) * scale + zero; ours is (q - z) * s.
            sz = torch.stack([s.t(), ((8 - z) * s).t()], -1).to(torch.bfloat16).contiguous()
            self.register_buffer("scales_zeros", sz.to(device))
            q = codes.to(torch.int32)
            if torch.device(device).type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            else:
                nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
                packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, _inner_k_tiles(self.in_features))
            self.register_buffer("packed", packed.to(device))
        else:
            per_byte = 8 // self.bits if self.bits <= 4 and self.in_features % (8 // self.bits) == 0 else 1
            self.codes_per_byte = per_byte
            self.register_buffer("codes", _pack_bytes(codes, self.bits, per_byte).to(device))
            self.register_buffer("zeros", zeros.to(device))
            self.register_buffer("scales", scales.to(device))
            self.register_buffer("g_idx", g_idx.to(device))

    def _agrees_with(self, reference: torch.Tensor) -> bool:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, self.in_features, generator=gen)
        device = next(iter(self.buffers())).device
        want = x @ reference.t()
        got = self._matmul(x.to(device)).float().cpu()
        return bool((got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3)

    def dequantized(self) -> torch.Tensor:
        """The layer's weight [out, in] in float32 (for checks and the dequant path)."""
        if self.kernel == "dequant":
            codes = _unpack_bytes(self.codes, self.bits, self.codes_per_byte, self.in_features)
            return _dequantize(codes, self.zeros, self.scales, self.g_idx)
        eye = torch.eye(self.in_features, device=next(iter(self.buffers())).device)
        return self._matmul(eye).float().t()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequant":
            return F.linear(x, self.dequantized().to(x.dtype))
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        xb = x.to(torch.bfloat16)
        if self.kernel == "int8pack_mm":
            return torch._weight_int8pack_mm(xb, self.weight_int8, self.channel_scales)
        if self.packed.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm(xb, self.packed, self.group_size, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, kernel={self.kernel}"


class QuantEmbedding(nn.Module):
    """Token embedding read from an INT8 tied LM head (rows = output channels)."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.head = [head]          # a list: the head is registered once, as the model's lm_head
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        if head.kernel == "int8pack_mm":
            return head.weight_int8[ids].to(self.dtype) * head.channel_scales[ids, None].to(self.dtype)
        return head.dequantized()[ids].to(self.dtype)


def _kernel_candidates(bits, zeros, g_idx, device) -> list[str]:
    # torch's CPU int8 kernel crashes or returns garbage when in_features % 16 != 0, which the
    # load-time check cannot catch; such layers use dequant.
    if bits == 8 and zeros.shape[1] == 1 and bool((zeros == 128).all()) and g_idx.numel() % 16 == 0:
        return ["int8pack_mm"]
    if bits == 4 and (zeros.shape[0] % 16 == 0 or torch.device(device).type != "cpu"):   # CPU: N % 16
        counts = torch.bincount(g_idx, minlength=zeros.shape[1])
        if bool((counts == counts[0]).all()) and any(int(counts[0]) % g == 0 for g in INT4_GROUP_SIZES):
            return ["int4pack_mm"]
    return []


def _inner_k_tiles(in_features: int) -> int:
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), 2)


def _is_sorted(g_idx: torch.Tensor) -> bool:
    return bool((g_idx[1:] >= g_idx[:-1]).all())


def _dequantize(codes, zeros, scales, g_idx) -> torch.Tensor:
    return (codes.float() - zeros[:, g_idx]) * scales[:, g_idx]


def _pack_bytes(codes: torch.Tensor, bits: int, per_byte: int) -> torch.Tensor:
    if per_byte == 1:
        return codes.contiguous()
    c = codes.to(torch.int32).view(codes.shape[0], -1, per_byte)
    return (c << (torch.arange(per_byte, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)


def _unpack_bytes(packed: torch.Tensor, bits: int, per_byte: int, in_features: int) -> torch.Tensor:
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    return ((packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).view(packed.shape[0], in_features)


# ---- whole models ---------------------------------------------------------------------------------

def prepare(model: nn.Module, spec: QuantSpec) -> None:
    """Before loading a GPTQ/AWQ checkpoint: its quantized linear layers become QuantSlots."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _quantized_in_checkpoint(name, spec):
            slot = QuantSlot(module.in_features, module.out_features, module.bias is not None,
                             spec.num_groups(module.in_features))
            _replace(model, name, slot.to(module.weight.device))


def _quantized_in_checkpoint(name: str, spec: QuantSpec) -> bool:
    if name == "lm_head":
        return spec.lm_head
    return not any(e and e in f"model.{name}" for e in spec.exclude)


def finalize(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> None:
    """After loading: slots become QuantLinears; for int8, every nn.Linear (and a tied LM head
    with its embedding) is quantized from its loaded float weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantSlot):
            _replace(model, name, QuantLinear.from_codes(module.codes.data, module.zeros.data, module.scales.data,
                                                         module.g_idx.data, spec.bits, module.bias, dtype))
        elif spec.method == "int8" and isinstance(module, nn.Linear):
            _replace(model, name, QuantLinear.from_float(module.weight, module.bias))
    if spec.method == "int8":
        tied = getattr(model, "tied_embedding", None)
        if tied is not None:
            head = QuantLinear.from_float(tied.weight)
            model.lm_head = head
            _replace(model, _name_of(model, tied), QuantEmbedding(head, dtype))
    counts = kernel_counts(model)
    log.info("quantization %s: %s", spec.method, ", ".join(f"{n} layers {k}" for k, n in counts.items()))


def quantize_rtn(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> None:
    """Random-weight presets under gptq/awq: round every decoder linear layer to nearest."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and _quantized_in_checkpoint(name, spec):
            gs = spec.group_size if module.in_features % spec.group_size == 0 else -1
            codes, zeros, scales, g_idx = rtn(module.weight, spec.bits, gs, spec.sym)
            _replace(model, name, QuantLinear.from_codes(codes, zeros, scales, g_idx, spec.bits, module.bias, dtype))
    log.info("quantization %s (round to nearest): %s", spec.method, kernel_counts(model))


def kernel_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            counts[module.kernel] = counts.get(module.kernel, 0) + 1
    return counts


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by linear layers (quantized or not) and the LM head, a tied embedding counted as
    the head: what quantization shrinks."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear, PackedLinear))]
    tied = getattr(model, "tied_embedding", None)
    return sum(weight_bytes(m) for m in layers) + (weight_bytes(tied) if tied is not None else 0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each tensor counted once), quantized or not. A
    tensor's own bytes, not its storage's: weights moved onto huge pages share one buffer."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.nbytes, t.device)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total + sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)
