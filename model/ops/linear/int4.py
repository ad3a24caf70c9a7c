"""int4 GEMV for the projections: out[B, N] = x[B, K] @ dequant(w)[N, K]^T, w a QuantizedLinear.

The weight is read as it is stored (docs/int4.md): int32 words of eight 4-bit codes along K, low
nibble first, and one scale and zero per row and group. Each program unpacks a
[BLOCK_N, BLOCK_K // 8] tile of words in registers, dequantizes it exactly as
QuantizedLinear.dequantize does ((q - z) * s in fp32, rounded to the model dtype) and then does the
bf16 GEMV's math (gemv.py): x and the rounded weight in fp32, fp32 products accumulated over K,
one rounding to out's dtype. So a kernel equals its reference (dequantize, then gemv_reference)
up to the fp32 summation order. The model dtype is the input rows' dtype (x, or the residual for
norm_gemv_int4).

As in gemv.py: B = 1 (or fp32 rows) runs on the CUDA cores, the norm fused into the prologue;
B >= 2 with bf16/fp16 rows multiplies the dequantized tile by x^T on the tensor cores (batch padded
to 16), the norm then a kernel of its own. Launch configuration is a pure function of the shape,
so a launch is safe inside a graph capture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...quant.format import QuantizedLinear
from ...settings import SETTINGS
from .._util import INTERPRET, MODEL_DTYPES, check_rows, next_pow2, pdl, pdl_wait
from ..hardware import DeviceProfile, current_profile, profile_for
from ..moe.route import check_route, fusable, route_after_gemv, route_kernel_args, route_triton
from .gemv import (MAX_BATCH, _check_norm_gemv, _input_tile, _inv_rms, _normed_tile, _one_tile_rms,
                   gemv_dot_block_n, gemv_reference, norm_gemv_reference)


# ----------------------------------------------------------------------------- argument checks
def check_int4_linear(name: str, w) -> tuple[int, int]:
    """w: a 2-D QuantizedLinear whose three tensors have contiguous rows; returns (N, K)."""
    if not isinstance(w, QuantizedLinear):
        raise TypeError(f"{name} must be a QuantizedLinear, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{name} ({w.name}) must be an [N, K] int4 weight, got shape {list(w.shape)}")
    n, k = w.shape
    if k % w.group_size:   # QuantizedLinear refuses this too; a mutated one must not reach a kernel
        raise ValueError(f"{name} ({w.name}): K={k} is not a multiple of group_size={w.group_size}")
    for attr in ("qweight", "scales", "zeros"):
        t = getattr(w, attr)
        if t.stride(1) != 1:
            raise ValueError(f"{name}.{attr} ({w.name}) must have contiguous rows, got strides {t.stride()}")
    return n, k


def _check_model_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in MODEL_DTYPES:
        raise TypeError(f"{name} must be one of {[str(d) for d in MODEL_DTYPES]} (the model dtype the weight "
                        f"is dequantized to), got {t.dtype}")


def _check(x, w, out):
    n, k = check_int4_linear("w", w)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [B, {k}], got shape {tuple(getattr(x, 'shape', ()))}")
    b = x.shape[0]
    check_rows("x", x, b, k)
    check_rows("out", out, b, n)
    _check_model_dtype("x", x)
    if x.device != w.device or out.device != w.device:
        raise ValueError(f"x ({x.device}), out ({out.device}) and {w.name} ({w.device}) must be on one device")
    return b, n, k


# ----------------------------------------------------------------------------- references
def gemv_int4_reference(x: torch.Tensor, w: QuantizedLinear, out: torch.Tensor) -> None:
    """out = x @ dequant(w).T: w dequantized to x's dtype, then exactly gemv_reference."""
    _check(x, w, out)
    gemv_reference(x, w.dequantize(x.dtype), out)


def norm_gemv_int4_reference(x, residual, norm_weight, eps, w: QuantizedLinear, out, *, residual_out=None,
                             normed_out=None, route=None) -> None:
    """norm_gemv_reference with w dequantized to the residual's dtype."""
    _check_norm_int4(x, residual, norm_weight, w, out, residual_out, normed_out)
    norm_gemv_reference(x, residual, norm_weight, eps, w.dequantize(residual.dtype), out,
                        residual_out=residual_out, normed_out=normed_out, route=route)


# ----------------------------------------------------------------------------- kernel
# PTX written out where the compiler's own choice costs instructions per weight (see _dequant_words);
# Triton's CPU interpreter runs no PTX and takes the plain expressions.
_PTX = tl.constexpr(not INTERPRET)


@triton.jit
def _round_through(w, DT: tl.constexpr):
    """fp32 w rounded to DT (nearest even), returned as fp32. For bf16, cvt.rn.bf16x2.f32 with a zero
    low half gives the rounded value's fp32 bits in one instruction, where .to(DT).to(fp32) costs
    a slower single conversion and a shift."""
    if _PTX and DT == tl.bfloat16:
        bits = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, 0f00000000;", "=r,f", [w], dtype=tl.int32,
                                         is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(DT).to(tl.float32)


@triton.jit
def _dequant_codes(src, s, z, nib, DT: tl.constexpr):
    """The weights of words `src` (int32 [..., 1]) at code positions `nib` ([1, ..., 8], the same
    rank), given their groups' scale and zero (fp32, broadcastable): [..., 8] in fp32, as
    QuantizedLinear.dequantize rounds them ((q - z) * s in fp32, then DT). Any rank: the callers
    shape the operands (_dequant_words for [R, W] words).

    Few instructions per weight, since decode at batch 1 is otherwise bound by this arithmetic
    rather than by the bytes: the code is OR-ed into the mantissa of 2^(23 - shift), so subtracting
    that power gives q exactly without an int-to-float conversion; and fma(q, s, -z*s) is
    round((q - z) * s), the reference's value, because z*s is exact in fp32 (two bf16/fp16
    significands; fp32 scales round it, within an fp32 ulp) and so is q - z when z = 0 or it fits
    fp32's 24 bits (2^-13 <= |z| < 2^23 for a bf16 zero, |z| >= 2^-10 for fp16). A smaller nonzero
    zero makes the reference round twice where the kernel rounds once: the two then differ by one
    bf16 ulp where that flips the last bit (tests/test_ops_int4_dequant.py). The mask-and-OR is
    written as one lop3 (the compiler otherwise emits two: it will not hold the constants in
    registers)."""
    src = tl.where(nib < 4, src, src >> 16)
    shift = (nib % 4) * 4
    power = (150 - shift) << 23                     # the bits of the float 2^(23 - shift)
    if _PTX:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [src, 15 << shift, power],
                                         dtype=tl.int32, is_pure=True, pack=1)   # (a & b) | c
    else:
        bits = (src & (15 << shift)) | power
    code = bits.to(tl.float32, bitcast=True) - power.to(tl.float32, bitcast=True)
    w = tl.fma(code, s, z * -s)
    return _round_through(w, DT)


@triton.jit
def _dequant_words(words, s, z, DT: tl.constexpr):
    """[R, W] int32 words (eight codes each, low nibble first) and their groups' scale and zero
    (fp32 [R, W] or [R, 1]) -> the [R, W, 8] weights (code j of word w is column 8w + j), in fp32
    (_dequant_codes)."""
    return _dequant_codes(words[:, :, None], s[:, :, None], z[:, :, None], tl.arange(0, 8)[None, None, :], DT)


@triton.jit
def _load_words(q_rows, s_rows, z_rows, offs_w, mask_r, NW, GROUP: tl.constexpr):
    """The [R, W] words at word columns offs_w of rows q_rows (pointers [R, 1]; NW words per row),
    and each word's group's scale and zero in fp32 (repeated addresses: served from L1)."""
    m2 = mask_r & (offs_w < NW)[None, :]
    words = tl.load(q_rows + offs_w[None, :], mask=m2, other=0)
    grp = (offs_w // (GROUP // 8))[None, :]
    s = tl.load(s_rows + grp, mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_rows + grp, mask=m2, other=0.0).to(tl.float32)
    return words, s, z


@triton.jit
def _gemv_int4_kernel(x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, q_ptr, s_ptr, z_ptr, out_ptr, B, N, K, eps,
                      stride_xb, stride_rb, stride_rob, stride_nob, stride_qn, stride_sn, stride_ob,
                      GROUP: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr, WRITE_R: tl.constexpr,
                      WRITE_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, USE_GDC: tl.constexpr):
    """_gemv_kernel's loop (CUDA-core FMAs into an fp32 accumulator, optional RMSNorm prologue)
    over int4 words dequantized in registers; the accumulator is [BLOCK_B, BLOCK_N, words, 8] so
    that no tile is reshaped but the input rows'. BLOCK_K is a multiple of GROUP."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mask_n = offs_n < N
    mask_b = offs_b < B
    rows64 = offs_n.to(tl.int64)[:, None]
    q_rows = q_ptr + rows64 * stride_qn
    s_rows = s_ptr + rows64 * stride_sn
    z_rows = z_ptr + rows64 * stride_sn
    DT = r_ptr.dtype.element_ty   # the model dtype: the input rows' (x when not NORM)
    h1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=DT)
    if NORM:
        if ONE_TILE:
            h1, inv_rms = _one_tile_rms(x_ptr, r_ptr, offs_b, offs_k, mask_b[:, None] & (offs_k < K)[None, :], K,
                                        eps, stride_xb, stride_rb, ADD)
        else:
            inv_rms = _inv_rms(x_ptr, r_ptr, offs_b, offs_k, mask_b, K, eps, stride_xb, stride_rb, ADD,
                               BLOCK_B, BLOCK_K)
    else:
        inv_rms = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        words, s, z = _load_words(q_rows, s_rows, z_rows, k0 // 8 + offs_w, mask_n[:, None], K // 8, GROUP)
        w = _dequant_words(words, s, z, DT)
        xt = _input_tile(h1, x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, offs_b, kk, mask_b, mk, inv_rms, pid,
                         stride_xb, stride_rb, stride_rob, stride_nob, NORM, ADD, WRITE_R, WRITE_N, ONE_TILE)
        x4 = tl.reshape(xt.to(tl.float32), (BLOCK_B, 1, BLOCK_K // 8, 8))
        acc += tl.sum(x4 * w[None, :, :, :], axis=3)   # the eight codes of a word: in-thread FMAs
    res = tl.sum(acc, axis=2)
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.jit
def _load_row_block(q_ptr, s_ptr, z_ptr, blk, N, NW, stride_qn, stride_sn, offs_w, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """The words, scales and zeros of the whole rows of block blk (_load_words); a block past
    the last row loads nothing."""
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)[:, None]
    return _load_words(q_ptr + rows64 * stride_qn, s_ptr + rows64 * stride_sn, z_ptr + rows64 * stride_sn,
                       offs_w, (rows < N)[:, None], NW, GROUP)


@triton.jit
def _gemv_int4_rows_kernel(x_ptr, r_ptr, nw_ptr, rout_ptr, nout_ptr, q_ptr, s_ptr, z_ptr, out_ptr, B, N, K, eps,
                           stride_xb, stride_rb, stride_rob, stride_nob, stride_qn, stride_sn, stride_ob,
                           GROUP: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr, WRITE_R: tl.constexpr,
                           WRITE_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr,
                           rw_ptr, rid_ptr, cnt_ptr, ROUTER_PROGRAMS, R_E, R_TOPK, R_START, R_LOCAL,
                           ROUTE: tl.constexpr, R_BLOCK_E: tl.constexpr, R_BLOCK_K: tl.constexpr,
                           R_LOCAL_ON: tl.constexpr):
    """_gemv_int4_kernel's math over blocks of BLOCK_N whole rows (K <= BLOCK_K), a fixed number
    of programs each taking every P-th block. A program forms its input rows (the norm) once for
    all its blocks, loads its first block before the PDL wait, and the next block's words before
    it dequantizes the current one, so that the weight stream does not stop for the
    dequantization or for the prologue. ROUTE: the router top-k of the first R_E output columns
    in the epilogue (moe/route.py; the programs below ROUTER_PROGRAMS hold the router blocks)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_n = tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mk = offs_k < K
    NW = K // 8
    words, s, z = _load_row_block(q_ptr, s_ptr, z_ptr, pid, N, NW, stride_qn, stride_sn, offs_w, GROUP, BLOCK_N)
    pdl_wait(USE_GDC)
    DT = r_ptr.dtype.element_ty   # the model dtype: the input rows' (x when not NORM)
    m2 = mask_b[:, None] & mk[None, :]
    if NORM:
        h, inv_rms = _one_tile_rms(x_ptr, r_ptr, offs_b, offs_k, m2, K, eps, stride_xb, stride_rb, ADD)
        xt = _normed_tile(h, inv_rms, nw_ptr, rout_ptr, nout_ptr, offs_b, offs_k, m2, mk, pid, stride_rob,
                          stride_nob, WRITE_R, WRITE_N)
    else:
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=m2, other=0.0)
    x4 = tl.reshape(xt.to(tl.float32), (BLOCK_B, 1, BLOCK_K // 8, 8))
    for blk in range(pid, tl.cdiv(N, BLOCK_N), nprog):
        nxt = _load_row_block(q_ptr, s_ptr, z_ptr, blk + nprog, N, NW, stride_qn, stride_sn, offs_w, GROUP,
                              BLOCK_N)
        w = _dequant_words(words, s, z, DT)
        res = tl.sum(tl.sum(x4 * w[None, :, :, :], axis=3), axis=2)   # a word's eight codes in-thread
        rows = blk * BLOCK_N + offs_n
        tl.store(out_ptr + offs_b[:, None] * stride_ob + rows[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=mask_b[:, None] & (rows < N)[None, :])
        words, s, z = nxt
    if ROUTE:
        if pid < ROUTER_PROGRAMS:
            route_after_gemv(out_ptr, rw_ptr, rid_ptr, cnt_ptr, ROUTER_PROGRAMS, B, R_E, R_TOPK, stride_ob, R_START,
                             R_LOCAL, R_BLOCK_E, R_BLOCK_K, R_LOCAL_ON)


@triton.jit
def _gemv_int4_dot_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, B, N, K, stride_xb, stride_qn, stride_sn, stride_ob,
                          GROUP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    """_gemv_dot_kernel (B >= 2: the weight tile times x^T on the tensor cores, fp32 accumulation)
    over int4 weight tiles dequantized in registers to x's dtype."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mask_n = offs_n < N
    mask_b = offs_b < B
    rows64 = offs_n.to(tl.int64)[:, None]
    x_cols = x_ptr + offs_b[None, :] * stride_xb
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        words, s, z = _load_words(q_ptr + rows64 * stride_qn, s_ptr + rows64 * stride_sn,
                                  z_ptr + rows64 * stride_sn, k0 // 8 + offs_w, mask_n[:, None], K // 8, GROUP)
        w = tl.reshape(_dequant_words(words, s, z, dt), (BLOCK_N, BLOCK_K)).to(dt)
        xt = tl.load(x_cols + kk[:, None], mask=mk[:, None] & mask_b[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, xt)
    out_ptrs = out_ptr + offs_b[None, :] * stride_ob + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_b[None, :])


# building blocks of the tensor-core expert kernels (moe/int4.py): one code position over a tile
@triton.jit
def _code(src, J: tl.constexpr):
    """Code J (0..3: the nibble at bit 4J) of each int32 word of src, as an exact fp32: the lop3
    and the subtraction of _dequant_codes, for one code position over a whole tile."""
    power = tl.full(src.shape, (150 - 4 * J) << 23, tl.int32)   # the bits of the float 2^(23 - 4J)
    mask = tl.full(src.shape, 15 << (4 * J), tl.int32)
    if _PTX:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [src, mask, power],
                                         dtype=tl.int32, is_pure=True, pack=1)   # (a & b) | c
    else:
        bits = (src & mask) | power
    return bits.to(tl.float32, bitcast=True) - power.to(tl.float32, bitcast=True)


@triton.jit
def _to_dt(w, DT: tl.constexpr):
    """fp32 -> DT, nearest even, two values per cvt (the compiler converts one at a time and
    packs them with a PRMT)."""
    if _PTX and DT == tl.bfloat16:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [w], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    elif _PTX and DT == tl.float16:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [w], dtype=tl.float16,
                                         is_pure=True, pack=2)
    else:
        return w.to(DT)


@triton.jit
def _per_word(v, R: tl.constexpr, G: tl.constexpr, GW: tl.constexpr):
    """[R, G] per-group values -> [R, G * GW], each repeated over its group's GW words. Loading
    them per word instead makes the compiler lay the word tile out along the rows (the scale
    pointers are not contiguous along K), and the tile then reaches the tensor cores through
    shared memory one element at a time."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (R, G, GW)), (R, G * GW))


# ----------------------------------------------------------------------------- launch
# the most weights per program of the CUDA-core kernel (x the batch); its accumulator is one fp32
# per word ([B, N, K / 8]), so a program can hold many (the interpreter's wide programs)
_INT4_WEIGHTS_PER_PROGRAM = 32768


@dataclass(frozen=True)
class GemvInt4Launch:
    """Launch configuration of _gemv_int4_kernel; a pure function of the shape."""
    block_b: int
    block_n: int      # weight rows per program
    block_k: int      # columns per loop iteration (a multiple of the group size)
    warps: int
    stages: int
    programs: int = 0  # > 0: _gemv_int4_rows_kernel (block_k holds whole rows) on this many programs


def gemv_int4_rows_config(k: int, profile: DeviceProfile) -> GemvInt4Launch:
    """The whole-row kernel at batch 1: blocks of 8192 weights (4 rows of K = 2048, 2 of 4096), four
    programs per SM. On an H100 at 35b-a3b (diag sweep over 2-8 rows, 2-8 programs per SM, 4/8
    warps) this was the fastest or within 0.1 us of it at every shape but the router's (8 warps
    3.40 us); the int4 GEMVs of a step take 824 us against the per-block kernel's 1,037."""
    block_k = next_pow2(k)
    return GemvInt4Launch(1, max(1, 8192 // block_k), block_k, 4, 1, programs=4 * profile.sm_count)


def gemv_int4_config(b: int, n: int, k: int, group_size: int, *, norm: bool = False,
                     profile: DeviceProfile | None = None, rows: bool | None = None) -> GemvInt4Launch:
    """The CUDA-core int4 kernel's configuration: K tiles of whole groups, narrowed as the batch
    grows (the accumulator is B x N x K / 8). At batch 1 (H200, tools/bench_gemv.py --quant int4
    --sweep at 35b-a3b): 8 rows x 1024 columns per program for the wide K = 2048 projections
    (gdn in_proj 16.6 -> 13.0 us, attn qkv 14.7 -> 10.1 us against 16 x 2048) and 2 x 2048 for
    K = 4096 (out/o_proj 7.9 -> 5.8 us against 4 x 2048): the dequantization is compute-bound, and
    more, smaller programs keep more SMs busy. rows (default: the MODEL_INT4_ROWS setting): at
    batch 1 and K <= 4096 the whole-row kernel instead (gemv_int4_rows_config)."""
    profile = current_profile() if profile is None else profile
    if rows is None:
        rows = SETTINGS.int4_rows
    if rows and b == 1 and k <= 4096:
        return gemv_int4_rows_config(k, profile)
    block_b = next_pow2(b)
    budget = 8192 if block_b == 1 else 4096
    widest = (1024 if norm or (k <= 2048 and n >= 4096) else 2048) if block_b == 1 else max(128, budget // block_b)
    block_k = max(group_size, min(next_pow2(k), widest))
    if profile.interpreter:   # Triton's CPU interpreter runs programs one after another: fewer, wider ones
        cap, weights = 64, _INT4_WEIGHTS_PER_PROGRAM
    else:
        cap, weights = 16, 8192 if k <= 2048 else 4096
    block_n = max(1, min(cap, weights // (block_b * block_k)))
    while block_n > 1 and triton.cdiv(n, block_n) < profile.stream_programs // 2:
        block_n //= 2
    return GemvInt4Launch(block_b, block_n, block_k, 4, 3)


def _launch(x, residual, norm_weight, residual_out, normed_out, eps, w: QuantizedLinear, out, b, n, k, launch,
            route=None) -> bool:
    """route (checked, and fusable): the whole-row kernel takes it into its epilogue; returns
    whether it did (the other kernels do not)."""
    if b > MAX_BATCH:
        raise ValueError(f"gemv_int4 handles batches up to {MAX_BATCH}, got B={b}")
    norm = residual is not None
    rows = residual if norm else x
    dummy = rows
    if launch is None and b >= 2 and rows.dtype in (torch.bfloat16, torch.float16):
        if norm:   # as gemv.py: on the tensor-core path the norm is a kernel of its own
            from ..norm import launch_rmsnorm

            if normed_out is None:
                normed_out = torch.empty_like(residual)
            launch_rmsnorm(x, residual, norm_weight, eps, normed_out, residual_out)
            x = normed_out
        block_n = gemv_dot_block_n(n, profile_for(out))
        block_k = max(w.group_size, min(256, next_pow2(k)))   # whole groups
        _gemv_int4_dot_kernel[(triton.cdiv(n, block_n),)](
            x, w.qweight, w.scales, w.zeros, out, b, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0),
            out.stride(0), GROUP=w.group_size, BLOCK_B=max(16, next_pow2(b)), BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_FP32=INTERPRET, num_warps=4, num_stages=4, **pdl(out))
        return False
    cfg = launch or gemv_int4_config(b, n, k, w.group_size, norm=norm, profile=profile_for(out))
    if cfg.block_b < b:
        raise ValueError(f"launch.block_b={cfg.block_b} is smaller than the batch {b}")
    if cfg.block_k % w.group_size or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"launch.block_k={cfg.block_k} must be a power of two holding whole groups of "
                         f"{w.group_size}")
    if cfg.programs < 0 or (cfg.programs and cfg.block_k < k):
        raise ValueError(f"launch.programs={cfg.programs} must be 0, or > 0 with whole rows (block_k="
                         f"{cfg.block_k} >= K={k})")
    kernel, grid = _gemv_int4_kernel, triton.cdiv(n, cfg.block_n)
    extra = dict(ONE_TILE=k <= cfg.block_k)
    fused = False
    if cfg.programs:
        kernel, grid = _gemv_int4_rows_kernel, min(grid, cfg.programs)
        fused = route is not None
        extra = route_kernel_args(route, out, cfg.block_n, grid)
    kernel[(grid,)](
        x if x is not None else dummy, residual if norm else dummy, norm_weight if norm else dummy,
        residual_out if residual_out is not None else dummy, normed_out if normed_out is not None else dummy,
        w.qweight, w.scales, w.zeros, out, b, n, k, float(eps),
        x.stride(0) if x is not None else 0, rows.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        normed_out.stride(0) if normed_out is not None else 0,
        w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        GROUP=w.group_size, NORM=norm, ADD=norm and x is not None, WRITE_R=residual_out is not None,
        WRITE_N=normed_out is not None, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **extra, num_warps=cfg.warps, num_stages=cfg.stages, **pdl(out))
    return fused


def gemv_int4_triton(x: torch.Tensor, w: QuantizedLinear, out: torch.Tensor, *,
                     launch: GemvInt4Launch | None = None) -> None:
    """out = x @ dequant(w).T, the weight read as int4 (B <= 16); `launch` forces the CUDA-core
    kernel with that configuration."""
    b, n, k = _check(x, w, out)
    if w.scales.stride(0) != w.zeros.stride(0):
        raise ValueError(f"{w.name}: scales and zeros must have the same row stride, got "
                         f"{w.scales.stride(0)} and {w.zeros.stride(0)}")
    _launch(x, None, None, None, None, 0.0, w, out, b, n, k, launch)


# ----------------------------------------------------------------------------- RMSNorm + GEMV
def _check_norm_int4(x, residual, norm_weight, w, out, residual_out, normed_out):
    n, k = check_int4_linear("w", w)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    _check_model_dtype("residual", residual)
    # the bf16 checks on a stand-in of the weight's logical shape (they read only its shape)
    stand_in = torch.empty((n, k), device="meta")
    b, n, k = _check_norm_gemv(x, residual, norm_weight, stand_in, out, residual_out, normed_out)
    for name, t in (("residual", residual), ("out", out)):
        if t.device != w.device:
            raise ValueError(f"{name} ({t.device}) and {w.name} ({w.device}) must be on one device")
    return b, n, k


def norm_gemv_int4_triton(x, residual, norm_weight, eps, w: QuantizedLinear, out, *, residual_out=None,
                          normed_out=None, launch: GemvInt4Launch | None = None, route=None) -> None:
    """norm_gemv_triton's fused prologue (residual add + RMSNorm in every program, program 0 storing
    residual_out and normed_out) before the int4 GEMV. On the tensor-core path (B >= 2, bf16/fp16)
    the norm runs as its own kernel first, into normed_out (a temporary when not given: pass it for
    a step that must not allocate). route: as norm_gemv_triton (fused into the whole-row kernel)."""
    b, n, k = _check_norm_int4(x, residual, norm_weight, w, out, residual_out, normed_out)
    if w.scales.stride(0) != w.zeros.stride(0):
        raise ValueError(f"{w.name}: scales and zeros must have the same row stride, got "
                         f"{w.scales.stride(0)} and {w.zeros.stride(0)}")
    logits = check_route(route, out) if route is not None else None
    fused = _launch(x, residual, norm_weight, residual_out, normed_out, eps, w, out, b, n, k, launch,
                    route if fusable(route) else None)
    if route is not None and not fused:
        route_triton(route, logits)
