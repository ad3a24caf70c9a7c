"""GEMV for the projections and the lm_head: out[B, N] = x[B, K] @ w[N, K]^T.

Decode is bandwidth-bound: the Triton kernels stream each weight row exactly once for the whole
batch, with wide contiguous loads along K, fp32 accumulation and one rounding to the output dtype.
B = 1 (and fp32 weights): CUDA-core FMAs into a [BLOCK_N, BLOCK_K] accumulator reduced once at the
end. B >= 2 with bf16/fp16 weights: the weight tile times x^T on the tensor cores (batch padded to
16), which keeps the weight stream at full width whatever the batch. Launch configuration is a pure
function of the shape (no autotuning), so it is safe inside a CUDA-graph capture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._util import INTERPRET, check_rows, next_pow2, pdl, pdl_wait

MAX_BATCH = 16
_TARGET_PROGRAMS = 1 if INTERPRET else 4 * 132  # enough CTAs to keep every SM of an H100 streaming


def _check(x, w, out):
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"w must be a row-major [N, K] matrix, got shape {tuple(w.shape)} strides {w.stride()}")
    n, k = w.shape
    if x.dim() != 2:
        raise ValueError(f"x must be [B, {k}], got shape {tuple(x.shape)}")
    b = x.shape[0]
    check_rows("x", x, b, k)
    check_rows("out", out, b, n)
    return b, n, k


def gemv_reference(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ w.T (transformers' nn.Linear without bias), rounded to out's dtype."""
    _check(x, w, out)
    out.copy_(torch.nn.functional.linear(x.to(w.dtype), w))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, B, N, K, stride_xb, stride_wn, stride_ob,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_b = offs_b < B
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    # the first weight tile depends on no earlier kernel: its load is issued before the PDL wait
    mk = offs_k < K
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
    pdl_wait(USE_GDC)
    x = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mk[None, :], other=0.0)
    acc = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        x = tl.load(x_rows + kk[None, :], mask=mask_b[:, None] & mk[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    res = tl.sum(acc, axis=2)
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, out_ptr, B, N, K, stride_xb, stride_wn, stride_ob,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    """B >= 2: the weight tile [BLOCK_N, BLOCK_K] times x^T [BLOCK_K, BLOCK_B] on the tensor cores
    (batch padded to 16), so the weight stream stays wide whatever the batch."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_b = offs_b < B
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + offs_b[None, :] * stride_xb
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    pdl_wait(USE_GDC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        xt = tl.load(x_cols + kk[:, None], mask=mk[:, None] & mask_b[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt.to(w.dtype))
    out_ptrs = out_ptr + offs_b[None, :] * stride_ob + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_b[None, :])


@dataclass(frozen=True)
class GemvLaunch:
    """Launch configuration of _gemv_kernel (the CUDA-core path); a pure function of the shape."""
    block_b: int
    block_n: int      # weight rows per program
    block_k: int      # columns per loop iteration
    warps: int
    stages: int


def gemv_config(b: int, n: int, k: int, elem_size: int) -> GemvLaunch:
    """The _gemv_kernel configuration for a [b, k] x [n, k]^T GEMV; fixed per shape."""
    # H100, bf16, batch 1 (tools/bench_gemv.py sweep): whole 2048-column row slices per load and
    # two programs per SM beat 512-column slices and four per SM by 4-13% at every layer shape
    block_b = next_pow2(b)
    block_k = min(next_pow2(k), 2048 if elem_size <= 2 else 256)
    budget = 8192 if block_b == 1 else 4096  # fp32 accumulator elements per program (4 warps)
    block_n = max(1, min(16, budget // (block_b * block_k)))
    while block_n > 1 and triton.cdiv(n, block_n) < _TARGET_PROGRAMS // 2:
        block_n //= 2
    return GemvLaunch(block_b, block_n, block_k, 4, 3)   # 3 stages: Triton's default


def gemv_triton(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, launch: GemvLaunch | None = None) -> None:
    """out = x @ w.T; `launch` overrides the CUDA-core kernel's configuration (benchmarks)."""
    b, n, k = _check(x, w, out)
    if b > MAX_BATCH:
        raise ValueError(f"gemv handles batches up to {MAX_BATCH}, got B={b}")
    if launch is None and b >= 2 and w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < _TARGET_PROGRAMS // 2:
            block_n //= 2
        block_k = min(256, max(16, next_pow2(k)))
        _gemv_dot_kernel[(triton.cdiv(n, block_n),)](x, w, out, b, n, k, x.stride(0), w.stride(0), out.stride(0),
                                                    BLOCK_B=max(16, next_pow2(b)), BLOCK_N=block_n, BLOCK_K=block_k,
                                                    DOT_FP32=INTERPRET, num_warps=4, num_stages=4, **pdl(x))
        return
    cfg = launch or gemv_config(b, n, k, w.element_size())
    if cfg.block_b < b:
        raise ValueError(f"launch.block_b={cfg.block_b} is smaller than the batch {b}")
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](x, w, out, b, n, k, x.stride(0), w.stride(0), out.stride(0),
                                                 BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                                 num_warps=cfg.warps, num_stages=cfg.stages, **pdl(x))
