"""int4 GEMM for the prefill projections: out[T, N] = x[T, K] @ dequant(w)[N, K]^T on the tensor cores.

The bf16 prefill calls cuBLAS (torch.mm(x, W.t(), out=)); with a QuantizedLinear W this kernel takes
its place. Each program owns a [BLOCK_N, BLOCK_T] tile of out^T: per K step it loads the int32 word
tile [BLOCK_N, BLOCK_K // 8] of the weight (codes along K, low nibble first: docs/int4.md), unpacks
it in registers (shift and mask, then an order-keeping reshape [BLOCK_N, BLOCK_K // 8, 8] ->
[BLOCK_N, BLOCK_K]), dequantizes it exactly as QuantizedLinear.dequantize does ((q - z) * s in fp32,
rounded to the model dtype = x's dtype) and multiplies it by the x^T tile [BLOCK_K, BLOCK_T], fp32
accumulation, one rounding to the model dtype at the end. The weight is the dot's left operand
(rows = the MMA's M) so that a chunk of 16 tokens still fills an MMA tile, and the dequantized
tile stays in registers.

A word's group is its word index // (group_size / 8): a K tile may hold several groups
(BLOCK_K > group_size) or part of one (BLOCK_K < group_size), so any power-of-two BLOCK_K >= 16
serves group sizes 32, 64 and 128 alike (repeated scale/zero addresses are served from cache).

Tiles are a pure function of (T, N, K) and the device profile: T is static per captured prefill
bucket, so the choice happens on the host, never autotuned, and a launch is safe inside a CUDA
graph capture. Rows of x past T are never read; row t of out depends on row t of x only, so the
padding rows of a chunk cannot reach its valid rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...quant.format import QuantizedLinear
from .dense import mm_rows_aligned
from .._util import INTERPRET, MODEL_DTYPES, check_rows, next_pow2, pdl, pdl_wait
from ..hardware import DeviceProfile, current_profile, profile_for
# the model-dtype rounding (exact round-to-nearest-even under the interpreter) and the fp32/MMA dot
from ..moe.grouped import _mma, _rnd
from .int4 import check_int4_linear

__all__ = ["GemmInt4Launch", "gemm_int4_config", "gemm_int4_reference", "gemm_int4_triton"]


# ----------------------------------------------------------------------------- argument checks
def _check(x, w, out):
    n, k = check_int4_linear("w", w)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [T, {k}] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    t = x.shape[0]
    check_rows("x", x, t, k)
    if x.dtype not in MODEL_DTYPES:
        raise TypeError(f"x must be one of {[str(d) for d in MODEL_DTYPES]} (the model dtype the weight is "
                        f"dequantized to), got {x.dtype}")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_rows("out", out, t, n)
    if out.dtype != x.dtype:
        raise TypeError(f"out must be {x.dtype} like x, got {out.dtype}")
    if x.device != w.device or out.device != w.device:
        raise ValueError(f"x ({x.device}), out ({out.device}) and {w.name} ({w.device}) must be on one device")
    return t, n, k


# ----------------------------------------------------------------------------- reference
def gemm_int4_reference(x: torch.Tensor, w: QuantizedLinear, out: torch.Tensor) -> None:
    """out = x @ dequant(w).T: w dequantized to x's dtype, then the bf16 prefill's own GEMM
    (mm_rows_aligned: torch.mm, fp32 accumulation, one rounding)."""
    _check(x, w, out)
    mm_rows_aligned(x, w.dequantize(x.dtype), out)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _int4_tile(q_rows, s_rows, z_rows, words, m_rows, NW, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, DT: tl.constexpr, EMULATE: tl.constexpr):
    """The [BLOCK_R, BLOCK_K] weight tile of the rows whose words / scales / zeros start at q_rows /
    s_rows / z_rows ([BLOCK_R, 1] pointers, rows masked by m_rows) at the word indices `words`
    (BLOCK_K // 8 of them along K, NW words a row): codes unpacked low nibble first, (q - z) * s in
    fp32, rounded to DT (the model dtype) as QuantizedLinear.dequantize does."""
    m2 = m_rows & (words < NW)[None, :]
    wq = tl.load(q_rows + words[None, :], mask=m2, other=0)
    grp = words // (GROUP // 8)              # every word lies in one group
    s = tl.load(s_rows + grp[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_rows + grp[None, :], mask=m2, other=0.0).to(tl.float32)
    shifts = tl.arange(0, 8) * 4
    q = ((wq[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
    v = (q - z[:, :, None]) * s[:, :, None]
    if EMULATE:   # the interpreter's fp32 -> bf16 cast truncates: round exactly first
        v = _rnd(v, DT, EMULATE)
    return tl.reshape(v.to(DT), (BLOCK_R, BLOCK_K))   # [r, word, nibble] -> [r, 8 * word + nibble]


@triton.jit
def _gemm_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, T, N, K, stride_xt, stride_qn, stride_sn, stride_zn,
                      stride_ot, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mn = offs_n < N
    mt = offs_t < T
    rows = offs_n.to(tl.int64)[:, None]
    q_rows, s_rows, z_rows = q_ptr + rows * stride_qn, s_ptr + rows * stride_sn, z_ptr + rows * stride_zn
    x_cols = x_ptr + offs_t.to(tl.int64)[None, :] * stride_xt + offs_k[:, None]     # [BLOCK_K, BLOCK_T] of x^T
    dt: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _int4_tile(q_rows, s_rows, z_rows, k0 // 8 + offs_w, mn[:, None], K // 8, GROUP, BLOCK_N, BLOCK_K,
                       dt, EMULATE)
        xt = tl.load(x_cols + k0, mask=((k0 + offs_k) < K)[:, None] & mt[None, :], other=0.0)
        acc = _mma(w, xt, acc, DOT_FP32)
    res = _rnd(acc, dt, EMULATE).to(dt)
    tl.store(out_ptr + offs_t.to(tl.int64)[None, :] * stride_ot + offs_n[:, None], res,
             mask=mn[:, None] & mt[None, :])


# ----------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class GemmInt4Launch:
    """Tiles of _gemm_int4_kernel; a pure function of the shape (gemm_int4_config)."""
    block_t: int      # tokens per program (the MMA's N)
    block_n: int      # weight rows per program (the MMA's M)
    block_k: int      # columns per K step (any power of two >= 16: the group is found per word)
    warps: int
    stages: int


def gemm_int4_config(t: int, n: int, k: int, *, profile: DeviceProfile | None = None) -> GemmInt4Launch:
    """Two regimes, chosen by T on the host (static per prefill bucket). Not yet tuned on a GPU.

    T <= 32 (a short chunk): the weight's bytes dominate, as in a GEMV. One token tile, 64 weight
    rows a program (a full Hopper MMA), halved down to 16 until the GPU has two programs per SM to
    stream the words; wide K steps (256) and 4 stages keep many bytes in flight.
    T > 32: compute; 128 x 128 tiles (8 warps) where the grid still covers the SMs once, else
    the weight rows and then the token tile halved (never below 64 rows, 32 tokens); K steps of 64
    and 3 stages (74 KB of shared memory at 128 x 128, compiled for sm_90 by tools/int4_compile)."""
    profile = current_profile() if profile is None else profile
    kp = max(16, next_pow2(k))
    if t <= 32:
        block_t, block_n = max(16, next_pow2(t)), 64
        while block_n > 16 and triton.cdiv(n, block_n) < profile.fill_programs:
            block_n //= 2
        return GemmInt4Launch(block_t, block_n, min(256, kp), 4, 4)
    block_t, block_n = min(128, next_pow2(t)), 128

    def programs():
        return triton.cdiv(n, block_n) * triton.cdiv(t, block_t)

    while block_n > 64 and programs() < profile.sm_count:
        block_n //= 2
    while block_t > 32 and programs() < profile.sm_count:
        block_t //= 2
    warps = 8 if block_n * block_t >= 128 * 128 else 4
    return GemmInt4Launch(block_t, block_n, min(64, kp), warps, 3)


def gemm_int4_triton(x: torch.Tensor, w: QuantizedLinear, out: torch.Tensor, *,
                     launch: GemmInt4Launch | None = None) -> None:
    """out = x @ dequant(w).T with the weight read as int4 (any T; x's rows past T are not read).
    `launch` overrides the tiles (tests, benchmarks)."""
    t, n, k = _check(x, w, out)
    cfg = launch or gemm_int4_config(t, n, k, profile=profile_for(out))
    for name in ("block_t", "block_n", "block_k"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"launch.{name}={v} must be a power of two >= 16 (tl.dot's smallest tile)")
    if t == 0:
        return
    dot_fp32 = INTERPRET or x.dtype == torch.float32
    _gemm_int4_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(t, cfg.block_t))](
        x, w.qweight, w.scales, w.zeros, out, t, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0),
        w.zeros.stride(0), out.stride(0), GROUP=w.group_size, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, DOT_FP32=dot_fp32, EMULATE=INTERPRET and x.dtype == torch.bfloat16,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl(out))
