"""GEMV for the projections and the lm_head: out[B, N] = x[B, K] @ w[N, K]^T.

Decode is bandwidth-bound: the Triton kernels stream each weight row exactly once for the whole
batch, with wide contiguous loads along K, fp32 accumulation and one rounding to the output dtype.
B = 1 (and fp32 weights): CUDA-core FMAs into a [BLOCK_N, BLOCK_K] accumulator reduced once at the
end. B >= 2 with bf16/fp16 weights: the weight tile times x^T on the tensor cores (batch padded to
16), which keeps the weight stream at full width whatever the batch. Launch configuration is a pure
function of the shape (no autotuning), so it is safe inside a CUDA-graph capture.

norm_gemv also applies the residual add + RMSNorm that precedes a projection: on the CUDA-core path
every program computes it in its prologue (the rows are a few KB in L2), which saves a kernel per
norm; with PDL (see _util.pdl) the first weight tile is loaded before waiting on the previous
kernel, so the norm's latency overlaps the weight stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._util import INTERPRET, check_rows, next_pow2, pdl, pdl_wait
from ..hardware import DeviceProfile, current_profile, profile_for
from ..moe.route import check_route, fusable, route_after_gemv, route_kernel_args, route_reference, route_triton

MAX_BATCH = 16
# the PDL weight prefetch pays off up to about this many programs per SM (H200, whole 35b step:
# prefetch for all 2.743 ms, none 2.711, up to 4096 programs on its 132 SMs 2.697)
_PREFETCH_PROGRAMS_PER_SM = 4096 / 132


def prefetch_max_programs(profile: DeviceProfile) -> int:
    return int(_PREFETCH_PROGRAMS_PER_SM * profile.sm_count)


def _check_w(w):
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"w must be a row-major [N, K] matrix, got shape {tuple(w.shape)} strides {w.stride()}")
    return w.shape


def _check(x, w, out):
    n, k = _check_w(w)
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
def _h_tile(x_ptr, r_ptr, offs_b, kk, m2, stride_xb, stride_rb, ADD: tl.constexpr):
    """The [BLOCK_B, BLOCK_K] tile of residual (+ x, rounded to the residual's dtype)."""
    h = tl.load(r_ptr + offs_b[:, None] * stride_rb + kk[None, :], mask=m2, other=0.0)
    if ADD:
        xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + kk[None, :], mask=m2, other=0.0)
        h = (h.to(tl.float32) + xv.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def _one_tile_rms(x_ptr, r_ptr, offs_b, offs_k, m2, K, eps, stride_xb, stride_rb, ADD: tl.constexpr):
    """(residual (+ x) tile, 1 / rms of each row) when one tile holds the whole rows (K <= BLOCK_K):
    the rows are loaded once, for the rms and for the product."""
    h = _h_tile(x_ptr, r_ptr, offs_b, offs_k, m2, stride_xb, stride_rb, ADD)
    hf = h.to(tl.float32)
    return h, tl.math.rsqrt(tl.sum(hf * hf, axis=1) / K + eps)


@triton.jit
def _inv_rms(x_ptr, r_ptr, offs_b, offs_k, mask_b, K, eps, stride_xb, stride_rb,
             ADD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of each row of residual (+ x), fp32 [BLOCK_B], over K in BLOCK_K tiles."""
    ss = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        hf = _h_tile(x_ptr, r_ptr, offs_b, kk, mask_b[:, None] & (kk < K)[None, :], stride_xb, stride_rb,
                     ADD).to(tl.float32)
        ss += tl.sum(hf * hf, axis=1)
    return tl.math.rsqrt(ss / K + eps)


@triton.jit
def _normed_tile(h, inv_rms, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, m2, mk, pid, stride_rob, stride_nob,
                 WRITE_R: tl.constexpr, WRITE_N: tl.constexpr):
    """rms-normalised h times (1 + w), rounded as the norm kernel does; program 0 also stores the
    new residual and the normed rows for later kernels (nothing in this kernel reads them)."""
    nw = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
    xt = (h.to(tl.float32) * inv_rms[:, None] * (1.0 + nw)[None, :]).to(h.dtype)
    if pid == 0:
        if WRITE_R:
            tl.store(rout_ptr + offs_b[:, None] * stride_rob + kk[None, :], h, mask=m2)
        if WRITE_N:
            tl.store(nout_ptr + offs_b[:, None] * stride_nob + kk[None, :], xt, mask=m2)
    return xt


@triton.jit
def _x_tile(x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b, mk, inv_rms, pid,
            stride_xb, stride_rb, stride_rob, stride_nob,
            NORM: tl.constexpr, ADD: tl.constexpr, WRITE_R: tl.constexpr, WRITE_N: tl.constexpr):
    """The [BLOCK_B, BLOCK_K] input tile at columns kk: x itself or, with NORM, the normed
    residual (+ x) (inv_rms from _inv_rms)."""
    m2 = mask_b[:, None] & mk[None, :]
    if NORM:
        h = _h_tile(x_ptr, r_ptr, offs_b, kk, m2, stride_xb, stride_rb, ADD)
        xt = _normed_tile(h, inv_rms, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, m2, mk, pid, stride_rob, stride_nob,
                          WRITE_R, WRITE_N)
    else:
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + kk[None, :], mask=m2, other=0.0)
    return xt


@triton.jit
def _input_tile(h1, x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b, mk, inv_rms, pid,
                stride_xb, stride_rb, stride_rob, stride_nob, NORM: tl.constexpr, ADD: tl.constexpr,
                WRITE_R: tl.constexpr, WRITE_N: tl.constexpr, ONE_TILE: tl.constexpr):
    """_x_tile, reusing the rows h1 already loaded when K fits one tile."""
    if NORM and ONE_TILE:
        xt = _normed_tile(h1, inv_rms, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b[:, None] & mk[None, :], mk,
                          pid, stride_rob, stride_nob, WRITE_R, WRITE_N)
    else:
        xt = _x_tile(x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b, mk, inv_rms, pid,
                     stride_xb, stride_rb, stride_rob, stride_nob, NORM, ADD, WRITE_R, WRITE_N)
    return xt


@triton.jit
def _gemv_kernel(x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, w_ptr, out_ptr, B, N, K, eps,
                 stride_xb, stride_rb, stride_rob, stride_nob, stride_wn, stride_ob,
                 NORM: tl.constexpr, ADD: tl.constexpr, WRITE_R: tl.constexpr, WRITE_N: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ONE_TILE: tl.constexpr, PREFETCH: tl.constexpr, USE_GDC: tl.constexpr,
                 rw_ptr, rid_ptr, cnt_ptr, ROUTER_PROGRAMS, R_E, R_TOPK, R_START, R_LOCAL,
                 ROUTE: tl.constexpr, R_BLOCK_E: tl.constexpr, R_BLOCK_K: tl.constexpr, R_LOCAL_ON: tl.constexpr):
    """B = 1 (or fp32): CUDA-core FMAs. ONE_TILE (K <= BLOCK_K): the norm's rows are loaded once.
    PREFETCH (with PDL): the first weight tile is loaded before waiting on the previous kernel;
    without PDL the plain loop (its software pipelining measured faster on H100). ROUTE: the
    router top-k of the first R_E output columns in the epilogue (moe/route.py)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_b = offs_b < B
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_first = 0
    if PREFETCH:
        mk = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
    pdl_wait(USE_GDC)
    h1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=r_ptr.dtype.element_ty)
    if NORM:
        if ONE_TILE:
            h1, inv_rms = _one_tile_rms(x_ptr, r_ptr, offs_b, offs_k, mask_b[:, None] & (offs_k < K)[None, :], K,
                                        eps, stride_xb, stride_rb, ADD)
        else:
            inv_rms = _inv_rms(x_ptr, r_ptr, offs_b, offs_k, mask_b, K, eps, stride_xb, stride_rb, ADD,
                               BLOCK_B, BLOCK_K)
    else:
        inv_rms = tl.zeros([BLOCK_B], tl.float32)
    if PREFETCH:
        xt = _input_tile(h1, x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, offs_k, mask_b, mk, inv_rms, pid,
                         stride_xb, stride_rb, stride_rob, stride_nob, NORM, ADD, WRITE_R, WRITE_N, ONE_TILE)
        acc += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        k_first = BLOCK_K
    for k0 in range(k_first, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
        xt = _input_tile(h1, x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b, mk, inv_rms, pid,
                         stride_xb, stride_rb, stride_rob, stride_nob, NORM, ADD, WRITE_R, WRITE_N, ONE_TILE)
        acc += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    res = tl.sum(acc, axis=2)
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])
    if ROUTE:
        if pid < ROUTER_PROGRAMS:
            route_after_gemv(out_ptr, rw_ptr, rid_ptr, cnt_ptr, ROUTER_PROGRAMS, B, R_E, R_TOPK, stride_ob, R_START,
                             R_LOCAL, R_BLOCK_E, R_BLOCK_K, R_LOCAL_ON)


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, out_ptr, B, N, K, stride_xb, stride_wn, stride_ob,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    """B >= 2: the weight tile [BLOCK_N, BLOCK_K] times x^T [BLOCK_K, BLOCK_B] on the tensor cores
    (batch padded to 16), so the weight stream stays wide whatever the batch."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_b = offs_b < B
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_cols = x_ptr + offs_b[None, :] * stride_xb
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
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


def gemv_config(b: int, n: int, k: int, elem_size: int, *, norm: bool = False,
                profile: DeviceProfile | None = None) -> GemvLaunch:
    """The _gemv_kernel configuration for a [b, k] x [n, k]^T GEMV (with norm: norm_gemv's) on a
    device of ``profile`` (the current device's by default); fixed per shape. H100, bf16, batch 1
    (tools/bench_gemv.py sweeps): whole 2048-column row slices and two programs per SM beat
    512-column slices by 4-13% at every layer shape; with the norm prologue, 1024-column slices
    beat 2048 by 2-11% (the second slice's load overlaps the norm)."""
    profile = current_profile() if profile is None else profile
    block_b = next_pow2(b)
    block_k = min(next_pow2(k), (1024 if norm else 2048) if elem_size <= 2 else 256)
    budget = 8192 if block_b == 1 else 4096  # fp32 accumulator elements per program (4 warps)
    block_n = max(1, min(16, budget // (block_b * block_k)))
    while block_n > 1 and triton.cdiv(n, block_n) < profile.stream_programs // 2:
        block_n //= 2
    return GemvLaunch(block_b, block_n, block_k, 4, 3)   # 3 stages: Triton's default


def gemv_dot_block_n(n: int, profile: DeviceProfile) -> int:
    """Weight rows per program of the tensor-core path (B >= 2): 64, halved down to 16 until the
    GPU has enough programs to stream."""
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < profile.stream_programs // 2:
        block_n //= 2
    return block_n


def gemv_triton(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, launch: GemvLaunch | None = None) -> None:
    """out = x @ w.T; `launch` overrides the CUDA-core kernel's configuration (benchmarks)."""
    b, n, k = _check(x, w, out)
    _launch_gemv(x, None, None, None, None, 0.0, w, out, b, n, k, launch)


def _launch_gemv(x, residual, norm_weight, residual_out, normed_out, eps, w, out, b, n, k, launch,
                 route=None) -> bool:
    """The GEMV launch for gemv (residual None) and norm_gemv, arguments already checked; absent
    pointers get a stand-in that the kernel's flags keep it from touching. route (checked, and
    fusable): the CUDA-core kernel takes it into its epilogue; returns whether it did."""
    if b > MAX_BATCH:
        raise ValueError(f"gemv handles batches up to {MAX_BATCH}, got B={b}")
    norm = residual is not None
    rows = residual if norm else x      # the input rows' dtype and strides
    dummy = rows
    args = (x if x is not None else dummy, residual if norm else dummy, norm_weight if norm else dummy,
            residual_out if residual_out is not None else dummy, normed_out if normed_out is not None else dummy,
            w, out, b, n, k, float(eps),
            x.stride(0) if x is not None else 0, rows.stride(0),
            residual_out.stride(0) if residual_out is not None else 0,
            normed_out.stride(0) if normed_out is not None else 0, w.stride(0), out.stride(0))
    flags = dict(NORM=norm, ADD=norm and x is not None, WRITE_R=residual_out is not None,
                 WRITE_N=normed_out is not None)
    profile = profile_for(out)
    opts = pdl(out)   # = pdl_options(profile)
    if launch is None and b >= 2 and w.dtype in (torch.bfloat16, torch.float16) and rows.dtype == w.dtype:
        if norm:   # the tensor-core path keeps the norm a kernel of its own (measured faster at B 2-4)
            from ..norm import launch_rmsnorm

            if normed_out is None:
                normed_out = torch.empty_like(residual)
            launch_rmsnorm(x, residual, norm_weight, eps, normed_out, residual_out)
            x = normed_out
        block_n = gemv_dot_block_n(n, profile)
        block_k = min(256, max(16, next_pow2(k)))
        _gemv_dot_kernel[(triton.cdiv(n, block_n),)](x, w, out, b, n, k, x.stride(0), w.stride(0), out.stride(0),
                                                    BLOCK_B=max(16, next_pow2(b)), BLOCK_N=block_n, BLOCK_K=block_k,
                                                    DOT_FP32=INTERPRET, num_warps=4, num_stages=4, **opts)
        return False
    cfg = launch or gemv_config(b, n, k, w.element_size(), norm=norm, profile=profile)
    if cfg.block_b < b:
        raise ValueError(f"launch.block_b={cfg.block_b} is smaller than the batch {b}")
    programs = triton.cdiv(n, cfg.block_n)
    # the weight prefetch before the PDL wait helps the first wave only; GEMVs of many waves (the
    # lm_head) keep the plain loop, whose software pipelining streams faster
    prefetch = opts["USE_GDC"] and programs <= prefetch_max_programs(profile)
    epilogue = route_kernel_args(route, out, cfg.block_n, programs)
    _gemv_kernel[(programs,)](*args, **flags, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              ONE_TILE=k <= cfg.block_k, PREFETCH=prefetch, num_warps=cfg.warps,
                              num_stages=cfg.stages, **opts, **epilogue)
    return route is not None


# ----------------------------------------------------------------------------- RMSNorm + GEMV
def _check_norm_gemv(x, residual, norm_weight, w, out, residual_out, normed_out):
    n, k = _check_w(w)
    if residual.dim() != 2:
        raise ValueError(f"residual must be [B, {k}], got shape {tuple(residual.shape)}")
    b = residual.shape[0]
    check_rows("residual", residual, b, k)
    check_rows("out", out, b, n)
    if norm_weight.dim() != 1 or norm_weight.numel() != k:
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    named = [("x", x), ("residual_out", residual_out), ("normed_out", normed_out)]
    for name, t in named:
        if t is not None:
            check_rows(name, t, b, k)
            if t.dtype != residual.dtype:
                raise TypeError(f"{name} must be {residual.dtype} like residual, got {t.dtype}")
    if residual_out is not None and x is None:
        raise ValueError("residual_out needs x (without an add the residual is unchanged)")
    # every program reads x and residual while program 0 writes the outputs: they must not overlap
    for name, t in (("residual_out", residual_out), ("normed_out", normed_out)):
        for src_name, src in (("x", x), ("residual", residual)):
            if t is not None and src is not None and _overlap(t, src):
                raise ValueError(f"{name} overlaps {src_name}: the fused kernel reads {src_name} in every "
                                 f"program while it writes {name}")
    return b, n, k


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "meta":   # no memory (launch planning, tools/launch_audit.py)
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (a.shape[0] - 1) * a.stride(0) * a.element_size() + a.shape[1] * a.element_size()
    b1 = b0 + (b.shape[0] - 1) * b.stride(0) * b.element_size() + b.shape[1] * b.element_size()
    return a.device == b.device and a0 < b1 and b0 < a1


def norm_gemv_reference(x, residual, norm_weight, eps, w, out, *, residual_out=None, normed_out=None,
                        route=None) -> None:
    """h = residual + x (rounded; residual alone when x is None), n = rms(h) * (1 + norm_weight),
    out = n @ w.T; optionally residual_out = h and normed_out = n. Equal to add_rmsnorm (or rmsnorm)
    followed by gemv. route (moe/route.py's Route): then router_topk on out's first columns."""
    from ..norm import _rms_ref

    _check_norm_gemv(x, residual, norm_weight, w, out, residual_out, normed_out)
    if route is not None:
        check_route(route, out)
    h = residual if x is None else residual + x
    normed = _rms_ref(h, norm_weight, eps)
    out.copy_(torch.nn.functional.linear(normed.to(w.dtype), w))
    if residual_out is not None:
        residual_out.copy_(h)
    if normed_out is not None:
        normed_out.copy_(normed)
    if route is not None:
        route_reference(route, out)


def norm_gemv_triton(x, residual, norm_weight, eps, w, out, *, residual_out=None, normed_out=None,
                     launch: GemvLaunch | None = None, route=None) -> None:
    """The RMSNorm computed in the GEMV's prologue by every program (a whole row is a few KB from
    L2), which saves the separate norm kernel; program 0 stores residual_out and normed_out. On the
    tensor-core path (B >= 2, bf16/fp16) the norm runs as its own kernel first, into normed_out
    (a temporary when not given: pass it for a step that must not allocate). route: as
    norm_gemv_reference, in the CUDA-core kernel's epilogue where moe/route.py allows."""
    b, n, k = _check_norm_gemv(x, residual, norm_weight, w, out, residual_out, normed_out)
    logits = check_route(route, out) if route is not None else None
    fused = _launch_gemv(x, residual, norm_weight, residual_out, normed_out, eps, w, out, b, n, k, launch,
                         route if fusable(route) else None)
    if route is not None and not fused:
        route_triton(route, logits)
