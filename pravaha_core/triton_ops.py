"""Fused per-layer operations as Triton kernels, for CUDA: RMSNorm (with the residual add folded
in), SiLU-and-multiply, and rotary embedding of q and k in place. Each is one launch where
torch takes several, and each rounds exactly where the torch reference rounds (the model's
dtype after every elementwise step), so greedy output does not move.

`TritonOps` has the interface of the native CPU module's fused ops (`rms_norm`,
`add_rms_norm_`, `silu_mul`, `rotary_`), so layers take either as their `native` ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_r, stride_o,
              ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if ADD:                                   # residual += x, rounded to the model's dtype
        x = (tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
             + x.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + offs, x, mask=ok)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _silu_mul(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=ok, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)                     # silu, rounded like F.silu
    tl.store(out_ptr + row * stride_o + offs, (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=ok)


@triton.jit
def _rotary(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_c, num_heads,
            HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """Rotate-half rotary on the first `num_heads` heads (q, then k) of one token's row."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF_P)
    ok = offs < HALF
    pos = tl.load(pos_ptr + t)
    base = qkv_ptr + t * stride_t + h * HEAD_DIM
    x1 = tl.load(base + offs, mask=ok, other=0.0)
    x2 = tl.load(base + HALF + offs, mask=ok, other=0.0)
    dt = x1.dtype
    cos1 = tl.load(cos_ptr + pos * stride_c + offs, mask=ok, other=0.0).to(dt)
    cos2 = tl.load(cos_ptr + pos * stride_c + HALF + offs, mask=ok, other=0.0).to(dt)
    sin1 = tl.load(sin_ptr + pos * stride_c + offs, mask=ok, other=0.0).to(dt)
    sin2 = tl.load(sin_ptr + pos * stride_c + HALF + offs, mask=ok, other=0.0).to(dt)
    # torch: x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
    out1 = ((x1.to(tl.float32) * cos1.to(tl.float32)).to(dt).to(tl.float32)
            + (-x2.to(tl.float32) * sin1.to(tl.float32)).to(dt).to(tl.float32)).to(dt)
    out2 = ((x2.to(tl.float32) * cos2.to(tl.float32)).to(dt).to(tl.float32)
            + (x1.to(tl.float32) * sin2.to(tl.float32)).to(dt).to(tl.float32)).to(dt)
    tl.store(base + offs, out1, mask=ok)
    tl.store(base + HALF + offs, out2, mask=ok)


class TritonOps:
    """The fused ops on CUDA tensors of any float dtype."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        _launch_norm(x, x, weight, out, eps, add=False)
        return out

    @staticmethod
    def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x (in place); returns norm(residual)."""
        out = torch.empty_like(x)
        _launch_norm(x, residual, weight, out, eps, add=True)
        return out

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> silu(gate) * up, [T, I]."""
        t, two_inter = gate_up.shape
        inter = two_inter // 2
        out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=block)
        return out

    @staticmethod
    def rotary_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                num_heads: int, head_dim: int) -> None:
        """Rotate the first `num_heads` heads of each row of qkv [T, ...] in place."""
        if qkv.shape[0]:
            _rotary[(qkv.shape[0], num_heads)](qkv, positions, cos, sin, qkv.stride(0), cos.stride(0), num_heads,
                                               HEAD_DIM=head_dim, HALF=head_dim // 2,
                                               HALF_P=triton.next_power_of_2(head_dim // 2))


def _launch_norm(x, residual, weight, out, eps, add: bool) -> None:
    t, n = x.shape
    _rms_norm[(t,)](x, residual, weight, out, n, eps, x.stride(0), residual.stride(0), out.stride(0),
                    ADD=add, BLOCK=triton.next_power_of_2(n))


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run each op once against torch on small tensors; why they cannot be used, or None."""
    try:
        x = torch.randn(3, 256, device=device).to(dtype)
        w = torch.randn(256, device=device).to(dtype)
        want = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        gate, up = x.split(128, dim=-1)
        errs = [(TritonOps.rms_norm(x, w, 1e-6) - want).abs().max(),
                (TritonOps.silu_mul(x) - torch.nn.functional.silu(gate) * up).abs().max()]
        err = float(max(e.float() for e in errs))
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure means: use plain torch
        return f"{type(exc).__name__}: {exc}"
    return None if err < 0.1 else f"max error {err:.3g} against torch"
