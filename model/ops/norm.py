"""RMSNorm with (1 + w), fused residual add + RMSNorm, and the gated RMSNorm of Gated DeltaNet.

Rounding points follow transformers' qwen3_5_moe: the residual add is rounded to the model dtype;
RMSNorm computes in fp32 and multiplies by (1 + w) in fp32 before one rounding; the gated norm
rounds the normalised value to the model dtype, multiplies by w in the model dtype, then by
silu(z) in fp32 and rounds once more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import as_rows, check_rows, next_pow2, pdl, pdl_wait


# ----------------------------------------------------------------------------- references
def _rms_ref(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(h.dtype)


def rmsnorm_reference(x, weight, eps, out) -> None:
    """out = rms(x) * (1 + w)."""
    b, h = x.shape
    check_rows("x", x, b, h)
    check_rows("out", out, b, h)
    out.copy_(_rms_ref(x, weight, eps))


def add_rmsnorm_reference(x, residual, weight, eps, out) -> None:
    """residual += x (rounded to the model dtype), out = rms(residual) * (1 + w)."""
    b, h = x.shape
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        check_rows(name, t, b, h)
    residual.add_(x)
    out.copy_(_rms_ref(residual, weight, eps))


def _check_gated(o, z, weight, out):
    """(b, nv, v, o as [b, nv*v] rows, z as rows) for the gated norm of nv heads of v channels."""
    v = weight.numel()
    b = o.shape[0]
    o2 = as_rows("o", o, b, o[0].numel())
    nv = o2.shape[1] // v
    z2 = as_rows("z", z, b, nv * v)
    check_rows("out", out, b, nv * v)
    return b, nv, v, o2, z2


def gated_rmsnorm_reference(o, z, weight, eps, out) -> None:
    """out = (rms(o) rounded * w) * silu(z), per head of V = weight.numel() channels (no 1+)."""
    b, nv, v, o2, z2 = _check_gated(o, z, weight, out)
    dtype = o.dtype
    hf = o2.reshape(b, nv, v).float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    hw = weight * hf.to(dtype)
    y = hw * torch.nn.functional.silu(z2.reshape(b, nv, v).float())
    out.copy_(y.to(dtype).reshape(b, nv * v))


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, rout_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_r, stride_ro, stride_o,
                    ADD: tl.constexpr, WRITE_R: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        if WRITE_R:
            tl.store(rout_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = xf * tl.math.rsqrt(var + eps) * (1.0 + w)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def launch_rmsnorm(x, residual, weight, eps, out, residual_out) -> None:
    """out = rms(residual (+ x)) * (1 + w); with x, the sum goes to residual_out when given (which
    may be residual itself: add_rmsnorm). Arguments already checked by the caller."""
    b, h = residual.shape
    blk = next_pow2(h)
    add = x is not None
    xs = x if add else residual
    ro = residual_out if residual_out is not None else residual
    _rmsnorm_kernel[(b,)](xs, residual, ro, weight, out, h, float(eps), xs.stride(0), residual.stride(0),
                          ro.stride(0), out.stride(0), ADD=add, WRITE_R=add and residual_out is not None,
                          BLOCK_H=blk, num_warps=_norm_warps(blk), **pdl(out))


def rmsnorm_triton(x, weight, eps, out) -> None:
    b, h = x.shape
    check_rows("x", x, b, h)
    check_rows("out", out, b, h)
    launch_rmsnorm(None, x, weight, eps, out, None)


def add_rmsnorm_triton(x, residual, weight, eps, out) -> None:
    b, h = x.shape
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        check_rows(name, t, b, h)
    launch_rmsnorm(x, residual, weight, eps, out, residual)


@triton.jit
def _gated_rmsnorm_kernel(o_ptr, z_ptr, w_ptr, out_ptr, R, NV, V, eps, stride_o, stride_z, stride_out,
                          HEADS: tl.constexpr, BLOCK_V: tl.constexpr, USE_GDC: tl.constexpr):
    """HEADS (row, head) pairs per program, each normed over its V channels."""
    pdl_wait(USE_GDC)
    pair = tl.program_id(0) * HEADS + tl.arange(0, HEADS)     # flat (row, head) index
    row = (pair // NV).to(tl.int64)[:, None]
    head = (pair % NV)[:, None]
    offs = tl.arange(0, BLOCK_V)
    mask = (pair < R * NV)[:, None] & (offs < V)[None, :]
    col = head * V + offs[None, :]
    o = tl.load(o_ptr + row * stride_o + col, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + col, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < V, other=0.0)[None, :]
    dt = out_ptr.dtype.element_ty
    var = tl.sum(o * o, axis=1) / V
    hn = (o * tl.math.rsqrt(var + eps)[:, None]).to(dt)
    hw = (w.to(tl.float32) * hn.to(tl.float32)).to(dt).to(tl.float32)
    y = hw * (z * tl.sigmoid(z))
    tl.store(out_ptr + row * stride_out + col, y.to(dt), mask=mask)


def gated_rmsnorm_heads(pairs: int, v: int) -> int:
    """(row, head) pairs per program: one at decode (a few dozen pairs), up to 8 when a prefill
    chunk brings thousands (one 1-warp program per pair made 32k programs for 1,024 tokens)."""
    return 1 if pairs <= 4096 else max(1, min(8, 1024 // next_pow2(v)))


def gated_rmsnorm_triton(o, z, weight, eps, out) -> None:
    b, nv, v, o2, z2 = _check_gated(o, z, weight, out)
    heads = gated_rmsnorm_heads(b * nv, v)
    width = heads * next_pow2(v)
    _gated_rmsnorm_kernel[(triton.cdiv(b * nv, heads),)](
        o2, z2, weight, out, b, nv, v, float(eps), o2.stride(0), z2.stride(0), out.stride(0), HEADS=heads,
        BLOCK_V=next_pow2(v), num_warps=1 if width <= 256 else 4, **pdl(out))
