"""Sparse-MoE decode experts over int4 weights: decode.py's two kernels reading packed experts.

gate_up_proj [E, 2I, H], down_proj [E, H, I] and shared_down [H, Is] are QuantizedLinear
(docs/int4.md: int32 words of eight codes along the input dim, one scale and zero per row and
group). Each kernel unpacks its weight tiles in registers, dequantizes them exactly as
QuantizedLinear.dequantize does ((q - z) * s in fp32, rounded to the model dtype = x's dtype) and
then does decode.py's math and roundings unchanged (fp32 products summed over the input dim, the
model-dtype rounding points of transformers' eager loop, experts added in ascending id). So each
equals its reference (dequantize, then moe_experts_reference) up to the fp32 summation order.
Experts are read in place by index: no gathers, no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...quant.format import QuantizedLinear
from .._util import INTERPRET, MODEL_DTYPES, next_pow2, pdl, pdl_wait
from ..hardware import current_profile, profile_for
from ..linear.int4 import _code, _dequant_codes, _dequant_words, _load_words, _per_word, _to_dt
from ...settings import SETTINGS
from .decode import MoeLaunch, _ascending_sum, _check_moe, moe_experts_reference, moe_launch_config
from .int4_rows import _moe_down_int4_rows_kernel, _moe_gate_up_int4_rows_kernel


# ----------------------------------------------------------------------------- argument checks
def _check_q(name, w, ndim):
    if not isinstance(w, QuantizedLinear):
        raise TypeError(f"{name} must be a QuantizedLinear, got {type(w).__name__}")
    if len(w.shape) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D int4 weight, got shape {list(w.shape)}")
    if w.shape[-1] % w.group_size:
        raise ValueError(f"{name}: K={w.shape[-1]} is not a multiple of group_size={w.group_size}")
    for attr in ("qweight", "scales", "zeros"):
        t = getattr(w, attr)
        if not t.is_contiguous():
            raise ValueError(f"{name}.{attr} must be contiguous, got strides {t.stride()}")


def check_int4_experts(x, gate_up_proj, down_proj, shared_down) -> None:
    """The int4 side of the expert ops' checks (decode and grouped): three QuantizedLinear of the
    right rank, x in a model dtype (what the experts dequantize to), everything on x's device."""
    for name, w, nd in (("gate_up_proj", gate_up_proj, 3), ("down_proj", down_proj, 3),
                        ("shared_down", shared_down, 2)):
        _check_q(name, w, nd)
    if not isinstance(x, torch.Tensor) or x.dtype not in MODEL_DTYPES:
        raise TypeError(f"x must be a tensor of one of {[str(d) for d in MODEL_DTYPES]} (the model dtype the "
                        f"experts are dequantized to), got {getattr(x, 'dtype', type(x).__name__)}")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("shared_down", shared_down)):
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}: they must be on one device")


def _check_int4_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                    act_ws, out):
    """decode.py's checks on the logical shapes, plus the int4 ones; (b, h, e, i, k, i_s)."""
    check_int4_experts(x, gate_up_proj, down_proj, shared_down)
    # the logical shapes through decode.py's checks (meta stand-ins: only shapes are read)
    meta = {n: torch.empty(w.shape, device="meta") for n, w in
            (("gu", gate_up_proj), ("dn", down_proj), ("sd", shared_down))}
    return _check_moe(x, meta["gu"], meta["dn"], ids, weights, shared_gate_up, meta["sd"], shared_gate_logit,
                      act_ws, out)


# ----------------------------------------------------------------------------- reference
def moe_experts_int4_reference(x, gate_up_proj: QuantizedLinear, down_proj: QuantizedLinear, ids, weights,
                               shared_gate_up, shared_down: QuantizedLinear, shared_gate_logit, act_ws, out) -> None:
    """moe_experts_reference on the experts dequantized to x's dtype."""
    _check_int4_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                    act_ws, out)
    dt = x.dtype
    moe_experts_reference(x, gate_up_proj.dequantize(dt), down_proj.dequantize(dt), ids, weights, shared_gate_up,
                          shared_down.dequantize(dt), shared_gate_logit, act_ws, out)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _moe_gate_up_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, act_ptr, H, I, TOPK, stride_x,
                             GROUP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                             USE_GDC: tl.constexpr):
    """_moe_gate_up_kernel over int4 gate and up rows (linear/int4.py's _dequant_words: [rows,
    words, 8] tiles, BLOCK_H whole groups)."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)     # row * TOPK + slot
    ib = tl.program_id(1)
    row = pid // TOPK
    e = tl.load(ids_ptr + pid).to(tl.int64)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_w = tl.arange(0, BLOCK_H // 8)
    offs_h = tl.arange(0, BLOCK_H)
    mi = offs_i < I
    mw = tl.where(e >= 0, mi, False)[:, None]   # id < 0: another rank's expert, not read (act = 0)
    g_idx = (e * 2 * I + offs_i)[:, None]          # [BLOCK_I, 1] row of gate_up_proj viewed as [E*2I, H]
    u_idx = g_idx + I
    NW = H // 8
    NG = H // GROUP
    dt = act_ptr.dtype.element_ty
    # one fp32 per word (its eight products summed in-thread): a program can hold 2 x 8 x 2048 weights
    acc_g = tl.zeros([BLOCK_I, BLOCK_H // 8], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_H // 8], tl.float32)
    for w0 in range(0, NW, BLOCK_H // 8):
        ww = w0 + offs_w
        hh = w0 * 8 + offs_h
        # loaded flat and reshaped, so that a thread holds a word's eight inputs (see _dequant_words)
        xv = tl.reshape(tl.load(x_ptr + row * stride_x + hh, mask=hh < H, other=0.0).to(tl.float32),
                        (1, BLOCK_H // 8, 8))
        words, sc, zr = _load_words(q_ptr + g_idx * NW, s_ptr + g_idx * NG, z_ptr + g_idx * NG, ww, mw, NW, GROUP)
        acc_g += tl.sum(_dequant_words(words, sc, zr, dt) * xv, axis=2)
        words, sc, zr = _load_words(q_ptr + u_idx * NW, s_ptr + u_idx * NG, z_ptr + u_idx * NG, ww, mw, NW, GROUP)
        acc_u += tl.sum(_dequant_words(words, sc, zr, dt) * xv, axis=2)
    g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    tl.store(act_ptr + pid.to(tl.int64) * I + offs_i, (a * u).to(dt), mask=mi)


@triton.jit
def _group_params(s_rows, z_rows, ww, w0, NW, m_row, m, GROUP: tl.constexpr, BLOCK_I: tl.constexpr):
    """The scale and zero (fp32) of the groups of words ww (starting at word w0) for row pointers
    s_rows/z_rows [..., 1] of NW words: when BLOCK_I == GROUP the tile is one group, so one pair
    per row ([..., 1], mask m_row, and none past the row's end: a caller's loop may run longer
    than this row, and a read there gave NaN x 0 when that memory held NaN) rather than one per
    word (mask m)."""
    if BLOCK_I == GROUP:
        m_tile = m_row & (w0 + tl.zeros([1], tl.int32) < NW)
        sc = tl.load(s_rows + w0 // (GROUP // 8), mask=m_tile, other=0.0).to(tl.float32)
        zr = tl.load(z_rows + w0 // (GROUP // 8), mask=m_tile, other=0.0).to(tl.float32)
    else:
        sc = tl.load(s_rows + ww // (GROUP // 8), mask=m, other=0.0).to(tl.float32)
        zr = tl.load(z_rows + ww // (GROUP // 8), mask=m, other=0.0).to(tl.float32)
    return sc, zr


@triton.jit
def _moe_down_int4_kernel(act_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, w_ptr, sgu_ptr, sq_ptr, ss_ptr, sz_ptr,
                          sgl_ptr, out_ptr, H, I, IS, TOPK, stride_sgu, stride_sgl, stride_out,
                          GROUP: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    """_moe_down_kernel over int4 routed and shared down rows (BLOCK_I whole groups). The routed
    tiles are [slots, rows, words, 8]: each slot's activations loaded once for its rows, and with
    BLOCK_I == GROUP one scale and zero per row and tile; the roundings and the ascending-id sum
    are decode.py's."""
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_I // 8)
    offs_i = tl.arange(0, BLOCK_I)
    nib = tl.arange(0, 8)[None, None, None, :]
    mh = offs_h < H
    mk = offs_k < TOPK
    dt = out_ptr.dtype.element_ty
    ids = tl.load(ids_ptr + row * TOPK + offs_k, mask=mk, other=0)
    wts = tl.load(w_ptr + row * TOPK + offs_k, mask=mk, other=0.0).to(tl.float32)
    mine = mk & (ids >= 0)     # id < 0: another rank's expert: not read, its y is 0 (adds nothing)
    rows = ids.to(tl.int64)[:, None] * H + offs_h[None, :]          # [K, HO] rows of down_proj as [E*H, I]
    m_rows = (mine[:, None] & mh[None, :])[:, :, None]              # [K, HO, 1]
    a_base = act_ptr + (row * TOPK + offs_k).to(tl.int64)[:, None] * I
    srows = offs_h.to(tl.int64)[:, None]                              # [HO, 1] rows of shared_down
    NW, NG, SW, SG = I // 8, I // GROUP, IS // 8, IS // GROUP
    acc = tl.zeros([BLOCK_K, BLOCK_HO, BLOCK_I // 8, 8], tl.float32)   # one FMA a weight; reduced after the loop
    acc2 = tl.zeros([BLOCK_HO, BLOCK_I // 8, 8], tl.float32)
    for w0 in range(0, tl.maximum(NW, SW), BLOCK_I // 8):
        ww = w0 + offs_w
        ii = w0 * 8 + offs_i
        # inputs loaded flat and reshaped, so that a thread holds a word's eight (see _dequant_codes)
        av = tl.load(a_base + ii[None, :], mask=mine[:, None] & (ii < I)[None, :], other=0.0)
        av = tl.reshape(av.to(tl.float32), (BLOCK_K, 1, BLOCK_I // 8, 8))
        m3 = m_rows & (ww < NW)[None, None, :]
        words = tl.load(q_ptr + rows[:, :, None] * NW + ww[None, None, :], mask=m3, other=0)
        # the loop runs over the longer of I and IS (_group_params reads nothing past a row's end)
        sc, zr = _group_params((s_ptr + rows * NG)[:, :, None], (z_ptr + rows * NG)[:, :, None],
                               ww[None, None, :], w0, NW, m_rows, m3, GROUP, BLOCK_I)
        acc += _dequant_codes(words[:, :, :, None], sc[:, :, :, None], zr[:, :, :, None], nib, dt) * av
        ms = ii < IS
        g = tl.load(sgu_ptr + row * stride_sgu + ii, mask=ms, other=0.0).to(tl.float32)
        u = tl.load(sgu_ptr + row * stride_sgu + IS + ii, mask=ms, other=0.0).to(tl.float32)
        a = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
        a = tl.reshape(a, (1, BLOCK_I // 8, 8))
        m2 = mh[:, None] & (ww < SW)[None, :]
        words = tl.load(sq_ptr + srows * SW + ww[None, :], mask=m2, other=0)
        sc, zr = _group_params(ss_ptr + srows * SG, sz_ptr + srows * SG, ww[None, :], w0, SW, mh[:, None], m2, GROUP,
                               BLOCK_I)
        acc2 += _dequant_words(words, sc, zr, dt) * a
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    y = y.to(dt).to(tl.float32)                                      # [K, HO], rounded per expert
    y = (y * wts[:, None]).to(dt).to(tl.float32)
    total = _ascending_sum(y, ids, offs_k, mk, TOPK, BLOCK_K, BLOCK_HO, dt)
    ys = tl.sum(tl.sum(acc2, axis=2), axis=1).to(dt).to(tl.float32)
    gl = tl.load(sgl_ptr + row * stride_sgl).to(tl.float32)
    gs = tl.sigmoid(gl).to(dt).to(tl.float32)
    ys = (gs * ys).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_h, (total + ys).to(dt), mask=mh)


# ----------------------------------------------------------------------------- batch 1 on the tensor cores
# One token: its 8 experts' weights are each read once, and the kernels above spend ~8-10 SASS
# instructions a weight in the dequantization. These hand the dequantized tiles to the tensor
# cores (building blocks _code, _to_dt, _per_word in linear/int4.py): per K tile and code position j, the
# [rows, words] tile of code j (columns 8w + j) is one dot operand, so no tile is reshaped and
# each weight costs lop3, fadd, fma and half a cvt. The other operand is the activations' [words, 8]
# tile as stored (column c = input 8w + c), loaded once per K tile for all eight dots; dot j
# accumulates into its own [rows, 8] accumulator, of which only column j is kept (_diag). The
# products are exact in fp32 and the sums fp32, so the roundings are the kernels' above.
@triton.jit
def _code_weight(words, hi, s, zs, J: tl.constexpr, DT: tl.constexpr):
    """Code position J (0..7) of each word, dequantized as QuantizedLinear.dequantize rounds it
    (fma(q, s, -z*s): see _dequant_codes), in DT: the [.., words] tile of columns 8w + J."""
    return _to_dt(tl.fma(_code(words if J < 4 else hi, J % 4), s, zs), DT)


@triton.jit
def _dot_acc(w, x, acc, DOT_FP32: tl.constexpr):
    """acc + w @ x (2-D, or batched 3-D) with fp32 accumulation. The interpreter multiplies in fp32
    (exact for model-dtype operands)."""
    if DOT_FP32:
        return acc + tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(w, x, acc)


@triton.jit
def _dot_codes(words, hi, s, zs, xt, a0, a1, a2, a3, a4, a5, a6, a7, DT: tl.constexpr, DOT_FP32: tl.constexpr):
    """One K tile into the eight per-code accumulators: dot j takes code position j's dequantized
    tile (_code_weight) against the activations' [words, 8] tile xt."""
    a0 = _dot_acc(_code_weight(words, hi, s, zs, 0, DT), xt, a0, DOT_FP32)
    a1 = _dot_acc(_code_weight(words, hi, s, zs, 1, DT), xt, a1, DOT_FP32)
    a2 = _dot_acc(_code_weight(words, hi, s, zs, 2, DT), xt, a2, DOT_FP32)
    a3 = _dot_acc(_code_weight(words, hi, s, zs, 3, DT), xt, a3, DOT_FP32)
    a4 = _dot_acc(_code_weight(words, hi, s, zs, 4, DT), xt, a4, DOT_FP32)
    a5 = _dot_acc(_code_weight(words, hi, s, zs, 5, DT), xt, a5, DOT_FP32)
    a6 = _dot_acc(_code_weight(words, hi, s, zs, 6, DT), xt, a6, DOT_FP32)
    a7 = _dot_acc(_code_weight(words, hi, s, zs, 7, DT), xt, a7, DOT_FP32)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _col(acc, J: tl.constexpr):
    """Column J of acc ([.., 8]), the other columns' zeros added (exact)."""
    c = tl.arange(0, 8)
    if len(acc.shape) == 3:
        return tl.sum(tl.where(c[None, None, :] == J, acc, 0.0), axis=2)
    else:
        return tl.sum(tl.where(c[None, :] == J, acc, 0.0), axis=1)


@triton.jit
def _diag(a0, a1, a2, a3, a4, a5, a6, a7):
    """Sum over j of column j of accumulator j: each row's fp32 sum over all its columns."""
    return (((_col(a0, 0) + _col(a1, 1)) + (_col(a2, 2) + _col(a3, 3)))
            + ((_col(a4, 4) + _col(a5, 5)) + (_col(a6, 6) + _col(a7, 7))))


@triton.jit
def _per_word_3d(v, S: tl.constexpr, R: tl.constexpr, G: tl.constexpr, GW: tl.constexpr):
    """_per_word over a leading slot dimension: [S, R, G] -> [S, R, G * GW]."""
    return tl.reshape(tl.broadcast_to(v[:, :, :, None], (S, R, G, GW)), (S, R, G * GW))


@triton.jit
def _moe_gate_up_int4_tc_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, act_ptr, H, I, TOPK, stride_x,
                                GROUP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                                DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    """_moe_gate_up_int4_kernel at batch 1 on the tensor cores: a program's BLOCK_I gate rows and
    the matching up rows are one [2 BLOCK_I, words] tile (gate first). BLOCK_H is a power of two,
    a multiple of GROUP and >= 128 (a dot's K is BLOCK_H / 8 words)."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)     # row * TOPK + slot
    ib = tl.program_id(1)
    row = pid // TOPK
    e = tl.load(ids_ptr + pid).to(tl.int64)
    offs_r = tl.arange(0, 2 * BLOCK_I)
    offs_i = ib * BLOCK_I + offs_r % BLOCK_I
    mr = tl.where(e >= 0, offs_i < I, False)[:, None]    # id < 0: another rank's expert, not read (act = 0)
    rows = (e * 2 * I + offs_i + tl.where(offs_r < BLOCK_I, 0, I))[:, None]   # of gate_up_proj as [E*2I, H]
    NW = H // 8
    NG = H // GROUP
    offs_w = tl.arange(0, BLOCK_H // 8)
    offs_g = tl.arange(0, BLOCK_H // GROUP)
    offs_c = tl.arange(0, 8)
    dt = act_ptr.dtype.element_ty
    a0 = tl.zeros([2 * BLOCK_I, 8], tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    for k0 in range(0, H, BLOCK_H):
        ow = k0 // 8 + offs_w
        mw = ow < NW
        words = tl.load(q_ptr + rows * NW + ow[None, :], mask=mr & mw[None, :], other=0)
        og = k0 // GROUP + offs_g
        mg = mr & (og < NG)[None, :]
        sg = tl.load(s_ptr + rows * NG + og[None, :], mask=mg, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rows * NG + og[None, :], mask=mg, other=0.0).to(tl.float32)
        s = _per_word(sg, 2 * BLOCK_I, BLOCK_H // GROUP, GROUP // 8)
        zs = _per_word(zg * -sg, 2 * BLOCK_I, BLOCK_H // GROUP, GROUP // 8)
        hi = words >> 16
        xt = tl.load(x_ptr + row * stride_x + 8 * ow[:, None] + offs_c[None, :], mask=mw[:, None], other=0.0)
        a0, a1, a2, a3, a4, a5, a6, a7 = _dot_codes(words, hi, s, zs, xt, a0, a1, a2, a3, a4, a5, a6, a7, dt, DOT_FP32)
    v = tl.reshape(_diag(a0, a1, a2, a3, a4, a5, a6, a7), (2, BLOCK_I))
    first = tl.arange(0, 2)[:, None] == 0
    g = tl.sum(tl.where(first, v, 0.0), axis=0).to(dt).to(tl.float32)
    u = tl.sum(tl.where(first, 0.0, v), axis=0).to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    oi = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(act_ptr + pid.to(tl.int64) * I + oi, (a * u).to(dt), mask=oi < I)


@triton.jit
def _moe_down_int4_tc_kernel(act_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, w_ptr, sgu_ptr, sq_ptr, ss_ptr, sz_ptr,
                             sgl_ptr, out_ptr, H, I, IS, TOPK, stride_sgu, stride_sgl, stride_out,
                             GROUP: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_I: tl.constexpr,
                             BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, USE_GDC: tl.constexpr):
    """_moe_down_int4_kernel at batch 1 on the tensor cores. The routed tiles are [slots, rows,
    words], each slot its own expert's rows and its own act row: one batched dot per code position
    (slot-wise, so no product crosses slots). The shared expert follows in a loop of 2-D dots, its
    act formed per K tile. BLOCK_I: as BLOCK_H of the gate/up kernel."""
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_I // 8)
    offs_g = tl.arange(0, BLOCK_I // GROUP)
    offs_c = tl.arange(0, 8)
    mh = offs_h < H
    mk = offs_k < TOPK
    dt = out_ptr.dtype.element_ty
    ids = tl.load(ids_ptr + row * TOPK + offs_k, mask=mk, other=0)
    wts = tl.load(w_ptr + row * TOPK + offs_k, mask=mk, other=0.0).to(tl.float32)
    mine = mk & (ids >= 0)     # id < 0: another rank's expert: not read, its y is 0 (adds nothing)
    rows = (ids.to(tl.int64)[:, None] * H + offs_h[None, :])[:, :, None]    # [K, HO, 1] of down_proj as [E*H, I]
    m_rows = (mine[:, None] & mh[None, :])[:, :, None]
    a_tile = act_ptr + (row * TOPK + offs_k).to(tl.int64)[:, None, None] * I + offs_c[None, None, :]
    NW, NG, SW, SG = I // 8, I // GROUP, IS // 8, IS // GROUP
    a0 = tl.zeros([BLOCK_K, BLOCK_HO, 8], tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    for k0 in range(0, I, BLOCK_I):
        ow = k0 // 8 + offs_w
        mw = ow < NW
        words = tl.load(q_ptr + rows * NW + ow[None, None, :], mask=m_rows & mw[None, None, :], other=0)
        og = k0 // GROUP + offs_g
        mg = m_rows & (og < NG)[None, None, :]
        sg = tl.load(s_ptr + rows * NG + og[None, None, :], mask=mg, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rows * NG + og[None, None, :], mask=mg, other=0.0).to(tl.float32)
        s = _per_word_3d(sg, BLOCK_K, BLOCK_HO, BLOCK_I // GROUP, GROUP // 8)
        zs = _per_word_3d(zg * -sg, BLOCK_K, BLOCK_HO, BLOCK_I // GROUP, GROUP // 8)
        hi = words >> 16
        xt = tl.load(a_tile + 8 * ow[None, :, None], mask=mine[:, None, None] & mw[None, :, None], other=0.0)
        a0, a1, a2, a3, a4, a5, a6, a7 = _dot_codes(words, hi, s, zs, xt, a0, a1, a2, a3, a4, a5, a6, a7, dt, DOT_FP32)
    y = _diag(a0, a1, a2, a3, a4, a5, a6, a7).to(dt).to(tl.float32)   # [K, HO], rounded per expert
    y = (y * wts[:, None]).to(dt).to(tl.float32)
    total = _ascending_sum(y, ids, offs_k, mk, TOPK, BLOCK_K, BLOCK_HO, dt)
    srows = offs_h.to(tl.int64)[:, None]
    b0 = tl.zeros([BLOCK_HO, 8], tl.float32)
    b1, b2, b3, b4, b5, b6, b7 = b0, b0, b0, b0, b0, b0, b0
    for k0 in range(0, IS, BLOCK_I):
        ow = k0 // 8 + offs_w
        mw = ow < SW
        words = tl.load(sq_ptr + srows * SW + ow[None, :], mask=mh[:, None] & mw[None, :], other=0)
        og = k0 // GROUP + offs_g
        mg = mh[:, None] & (og < SG)[None, :]
        sg = tl.load(ss_ptr + srows * SG + og[None, :], mask=mg, other=0.0).to(tl.float32)
        zg = tl.load(sz_ptr + srows * SG + og[None, :], mask=mg, other=0.0).to(tl.float32)
        s = _per_word(sg, BLOCK_HO, BLOCK_I // GROUP, GROUP // 8)
        zs = _per_word(zg * -sg, BLOCK_HO, BLOCK_I // GROUP, GROUP // 8)
        hi = words >> 16
        ii = k0 + tl.arange(0, BLOCK_I)
        g = tl.load(sgu_ptr + row * stride_sgu + ii, mask=ii < IS, other=0.0).to(tl.float32)
        u = tl.load(sgu_ptr + row * stride_sgu + IS + ii, mask=ii < IS, other=0.0).to(tl.float32)
        xt = tl.reshape(((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt), (BLOCK_I // 8, 8))
        b0, b1, b2, b3, b4, b5, b6, b7 = _dot_codes(words, hi, s, zs, xt, b0, b1, b2, b3, b4, b5, b6, b7, dt, DOT_FP32)
    ys = _diag(b0, b1, b2, b3, b4, b5, b6, b7).to(dt).to(tl.float32)
    gl = tl.load(sgl_ptr + row * stride_sgl).to(tl.float32)
    gs = tl.sigmoid(gl).to(dt).to(tl.float32)
    ys = (gs * ys).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_h, (total + ys).to(dt), mask=mh)


# ----------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class MoeInt4Launch(MoeLaunch):
    """MoeLaunch plus which kernel runs on the tensor cores: gate_up_tc (the K tile then >= 128
    columns, the tile 2 x gate_up_block_i rows), down_tc (K tile >= 128 columns, down_block_ho rows
    of every slot); or over blocks of whole rows on a fixed number of programs (int4_rows.py,
    batch 1): gate_up_programs > 0 (gate_up_block_h >= H), down_programs > 0 (down_block_i >=
    max(I, Is))."""
    gate_up_tc: bool = False
    down_tc: bool = False
    gate_up_programs: int = 0
    down_programs: int = 0


# the smallest K tile of the tensor-core kernels: a dot's K (words) is at least 16
_TC_MIN_K = 128


# the tensor-core kernels run a program per (row, slot) and per row: any batch of decode rows works;
# above a few rows a grouped GEMM (as prefill's) would share each expert's dequantization
TC_MAX_BATCH = 8
# the tensor-core down kernel from this many rows: at batch 1 it took 13.0 us a layer against the
# CUDA-core kernel's 11.6 (H200, tools/bench_moe.py --quant int4), at batch 8 61 against 77
DOWN_TC_MIN_BATCH = 2


def moe_int4_tc_eligible(b: int, k: int, dtype=None) -> bool:
    """Up to TC_MAX_BATCH rows with bf16/fp16 values (what the tensor cores take), at most 8 slots;
    dtype None: the shape alone."""
    return 1 <= b <= TC_MAX_BATCH and k <= 8 and (dtype is None or dtype in (torch.bfloat16, torch.float16))


def moe_int4_launch_config(b: int, h: int, i: int, k: int, i_s: int, group_size: int,
                           profile=None, *, tc: bool | None = None, rows: bool | None = None) -> MoeInt4Launch:
    """The tensor-core kernels' tiles (_tc_config) for the kernels that take them, else the CUDA-core
    kernels' (_cuda_core_config). tc=None (default): gate/up on the tensor cores up to TC_MAX_BATCH
    rows with at most 8 slots, down from DOWN_TC_MIN_BATCH rows on; True: both kernels (up to
    TC_MAX_BATCH rows); False: neither (the caller passes False for fp32 rows). rows (default: the
    MODEL_INT4_MOE_ROWS setting): at batch 1, unless tc=True, both kernels over blocks of whole rows
    (moe_int4_rows_config)."""
    profile = current_profile() if profile is None else profile
    if (SETTINGS.int4_moe_rows if rows is None else rows) and b == 1 and tc is not True:
        return moe_int4_rows_config(h, i, k, i_s, group_size, profile)
    fits = moe_int4_tc_eligible(b, k)
    gate_up_tc = fits if tc is None else tc
    down_tc = fits and b >= DOWN_TC_MIN_BATCH if tc is None else tc
    cuda_core = _cuda_core_config(b, h, i, k, i_s, group_size, profile)
    tensor_core = _tc_config(h, i, i_s, group_size, profile)
    gu = tensor_core if gate_up_tc else cuda_core
    dn = tensor_core if down_tc else cuda_core
    return MoeInt4Launch(gu.gate_up_block_i, gu.gate_up_block_h, gu.gate_up_warps, gu.gate_up_stages,
                         dn.down_block_ho, dn.down_block_i, dn.down_warps, dn.down_stages, gate_up_tc, down_tc)


def moe_int4_rows_config(h: int, i: int, k: int, i_s: int, group_size: int, profile) -> MoeInt4Launch:
    """The whole-row kernels (int4_rows.py) at batch 1, in the whole-row GEMV's proportions
    (gemv_int4_rows_config): blocks of about 8192 weights (gate/up: 2 gate + 2 up rows of H = 2048;
    down: 2 output rows of 8 slots plus the shared expert, 512 each), four programs per SM. Not yet
    measured: MODEL_INT4_MOE_ROWS is off by default."""
    block_h = max(group_size, next_pow2(h))
    block_i2 = max(group_size, next_pow2(max(i, i_s)))
    block_i = max(1, min(next_pow2(i), 4096 // block_h))
    block_ho = max(1, min(next_pow2(h), 8192 // (next_pow2(k) * block_i2)))
    programs = 4 * profile.sm_count
    return MoeInt4Launch(block_i, block_h, 4, 1, block_ho, block_i2, 4, 1, gate_up_programs=programs,
                         down_programs=programs)


def _cuda_core_config(b: int, h: int, i: int, k: int, i_s: int, group_size: int, profile) -> MoeInt4Launch:
    """moe_launch_config's configuration with the K tiles widened to at least one group (they are
    powers of two, so they then hold whole groups)."""
    c = moe_launch_config(b, h, i, k, i_s, profile)
    # gate/up: K tiles of up to 2048 columns, so that each of the 128 threads holds at least eight
    # inputs, a whole word's (the compiler then keeps a word's codes in one thread: _dequant_words);
    # the accumulators are one fp32 per word, so a program holds 4x the bf16 kernel's weights
    # (fewer, 4 x 1024, with one FMA a weight into [rows, words, 8]: 8.9 instructions a weight
    # against 8.3, counted in the compiled loop)
    block_h = max(group_size, min(next_pow2(h), 2048))
    block_i2 = max(group_size, c.down_block_i)
    block_i, block_ho = c.gate_up_block_i, c.down_block_ho
    if profile.interpreter:   # Triton's CPU interpreter runs programs one after another: fewer, wider ones
        block_i, block_ho = next_pow2(i), next_pow2(h)
    return MoeInt4Launch(max(1, min(block_i, 16384 // block_h)), block_h, c.gate_up_warps, c.gate_up_stages,
                         max(1, min(block_ho, 8192 // (next_pow2(k) * block_i2))), block_i2, c.down_warps,
                         c.down_stages)


def _tc_config(h: int, i: int, i_s: int, group_size: int, profile) -> MoeInt4Launch:
    """The tensor-core kernels' tiles: 16 gate + 16 up rows over 512 columns on 2 warps (4.9 SASS
    instructions a weight in the compiled loop at group 128, against 8.1 for the CUDA-core
    kernel), and 16 rows of each of the 8 slots over 256 columns on 4 warps (5.2 a weight, 5.9
    with the shared expert's loop, against 9.9), counted in the compiled loop (sm_90, Triton 3.6);
    1 mma row block (16 rows) per warp. Measured (H200, docs/int4.md): gate/up 10.4 us a layer at
    batch 1 against 12.7, 50 against 84 at batch 8; down slower at batch 1 (DOWN_TC_MIN_BATCH)."""
    block_h = max(_TC_MIN_K, group_size, min(512, next_pow2(h)))
    block_i2 = max(_TC_MIN_K, group_size, min(256, next_pow2(max(i, i_s))))
    block_i, block_ho = 16, 16
    if profile.interpreter:   # Triton's CPU interpreter runs programs one after another: fewer, wider ones
        block_i, block_ho = next_pow2(i), next_pow2(h)
    return MoeInt4Launch(block_i, block_h, 2, 3, block_ho, block_i2, 4, 3, gate_up_tc=True, down_tc=True)


def _check_launch(cfg: MoeLaunch, group_size: int) -> None:
    for name, tc in (("gate_up_block_h", "gate_up_tc"), ("down_block_i", "down_tc")):
        least = _TC_MIN_K if getattr(cfg, tc, False) else group_size
        v = getattr(cfg, name)
        if v % group_size or v & (v - 1) or v < least:
            raise ValueError(f"launch.{name}={v} must be a power of two holding whole groups of {group_size}"
                             + (f" and at least {least} columns (the tensor-core kernels)" if least > group_size else ""))


def _use_tc(cfg: MoeLaunch, field: str, b: int, k: int, dtype) -> bool:
    """cfg's `field` (gate_up_tc or down_tc), refused where the tensor-core kernels cannot run."""
    if not getattr(cfg, field, False):
        return False
    if not moe_int4_tc_eligible(b, k, dtype):
        raise ValueError(f"launch.{field}: the tensor-core expert kernels take batches up to {TC_MAX_BATCH}, <= 8 "
                         f"slots and bf16/fp16 rows, got B={b}, k={k}, {dtype}")
    return True


def _rows_programs(cfg: MoeLaunch, part: str, b: int, block: int, least: int, block_name: str) -> int:
    """cfg's `part`_programs (0: not the whole-row kernel), refused unless it can run: batch 1, not
    also on the tensor cores, K tiles of whole rows."""
    programs = getattr(cfg, f"{part}_programs", 0)
    if programs == 0:
        return 0
    if programs < 0 or getattr(cfg, f"{part}_tc", False) or b != 1 or block < least:
        raise ValueError(f"launch.{part}_programs={programs}: the whole-row expert kernels take one row, not the "
                         f"tensor cores, and {block_name} >= {least} (whole rows); got B={b}, {part}_tc="
                         f"{getattr(cfg, f'{part}_tc', False)}, {block_name}={block}")
    return programs


def launch_moe_gate_up_int4(x, gate_up_proj: QuantizedLinear, ids, act_ws, cfg: MoeLaunch) -> None:
    b, h = x.shape
    k = ids.shape[1]
    i = gate_up_proj.shape[1] // 2
    if programs := _rows_programs(cfg, "gate_up", b, cfg.gate_up_block_h, h, "gate_up_block_h"):
        blocks = k * triton.cdiv(i, cfg.gate_up_block_i)
        _moe_gate_up_int4_rows_kernel[(min(blocks, programs),)](
            x, gate_up_proj.qweight, gate_up_proj.scales, gate_up_proj.zeros, ids, act_ws, h, i, k,
            GROUP=gate_up_proj.group_size, BLOCK_I=cfg.gate_up_block_i, BLOCK_H=cfg.gate_up_block_h,
            num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages, **pdl(x))
        return
    if _use_tc(cfg, "gate_up_tc", b, k, x.dtype):
        _moe_gate_up_int4_tc_kernel[(b * k, triton.cdiv(i, cfg.gate_up_block_i))](
            x, gate_up_proj.qweight, gate_up_proj.scales, gate_up_proj.zeros, ids, act_ws, h, i, k, x.stride(0),
            GROUP=gate_up_proj.group_size, BLOCK_I=cfg.gate_up_block_i, BLOCK_H=cfg.gate_up_block_h,
            DOT_FP32=INTERPRET, num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages, **pdl(x))
        return
    _moe_gate_up_int4_kernel[(b * k, triton.cdiv(i, cfg.gate_up_block_i))](
        x, gate_up_proj.qweight, gate_up_proj.scales, gate_up_proj.zeros, ids, act_ws, h, i, k, x.stride(0),
        GROUP=gate_up_proj.group_size, BLOCK_I=cfg.gate_up_block_i, BLOCK_H=cfg.gate_up_block_h,
        num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages, **pdl(x))


def launch_moe_down_int4(act_ws, down_proj: QuantizedLinear, ids, weights, shared_gate_up,
                         shared_down: QuantizedLinear, shared_gate_logit, out, cfg: MoeLaunch) -> None:
    b, h = out.shape
    k = ids.shape[1]
    i, i_s = down_proj.shape[2], shared_down.shape[1]
    if shared_down.group_size != down_proj.group_size:
        raise ValueError(f"shared_down has group_size={shared_down.group_size}, down_proj "
                         f"{down_proj.group_size}: the down kernel takes one")
    sgl = shared_gate_logit
    if programs := _rows_programs(cfg, "down", b, cfg.down_block_i, max(i, i_s), "down_block_i"):
        _moe_down_int4_rows_kernel[(min(triton.cdiv(h, cfg.down_block_ho), programs),)](
            act_ws, down_proj.qweight, down_proj.scales, down_proj.zeros, ids, weights, shared_gate_up,
            shared_down.qweight, shared_down.scales, shared_down.zeros, sgl, out, h, i, i_s, k,
            GROUP=down_proj.group_size, BLOCK_HO=cfg.down_block_ho, BLOCK_I=cfg.down_block_i,
            BLOCK_K=next_pow2(k), num_warps=cfg.down_warps, num_stages=cfg.down_stages, **pdl(out))
        return
    if _use_tc(cfg, "down_tc", b, k, out.dtype):
        _moe_down_int4_tc_kernel[(b, triton.cdiv(h, cfg.down_block_ho))](
            act_ws, down_proj.qweight, down_proj.scales, down_proj.zeros, ids, weights, shared_gate_up,
            shared_down.qweight, shared_down.scales, shared_down.zeros, sgl, out, h, i, i_s, k,
            shared_gate_up.stride(0), sgl.stride(0), out.stride(0), GROUP=down_proj.group_size,
            BLOCK_HO=cfg.down_block_ho, BLOCK_I=cfg.down_block_i, BLOCK_K=next_pow2(k), DOT_FP32=INTERPRET,
            num_warps=cfg.down_warps, num_stages=cfg.down_stages, **pdl(out))
        return
    _moe_down_int4_kernel[(b, triton.cdiv(h, cfg.down_block_ho))](
        act_ws, down_proj.qweight, down_proj.scales, down_proj.zeros, ids, weights, shared_gate_up,
        shared_down.qweight, shared_down.scales, shared_down.zeros, sgl, out, h, i, i_s, k,
        shared_gate_up.stride(0), sgl.stride(0), out.stride(0), GROUP=down_proj.group_size,
        BLOCK_HO=cfg.down_block_ho, BLOCK_I=cfg.down_block_i, BLOCK_K=next_pow2(k), num_warps=cfg.down_warps,
        num_stages=cfg.down_stages, **pdl(out))


def moe_experts_int4_triton(x, gate_up_proj: QuantizedLinear, down_proj: QuantizedLinear, ids, weights,
                            shared_gate_up, shared_down: QuantizedLinear, shared_gate_logit, act_ws, out, *,
                            launch: MoeLaunch | None = None) -> None:
    """Same contract as moe_experts_int4_reference; `launch` overrides the configuration."""
    b, h, e, i, k, i_s = _check_int4_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                         shared_gate_logit, act_ws, out)
    groups = {gate_up_proj.group_size, down_proj.group_size, shared_down.group_size}
    if len(groups) != 1:
        raise ValueError(f"gate_up_proj, down_proj and shared_down must share one group size, got "
                         f"{gate_up_proj.group_size}, {down_proj.group_size}, {shared_down.group_size}")
    g = groups.pop()
    cfg = launch or moe_int4_launch_config(b, h, i, k, i_s, g, profile_for(out),
                                           tc=None if moe_int4_tc_eligible(b, k, x.dtype) else False)
    _check_launch(cfg, g)
    # both kernels' whole-row settings refused before either runs (act_ws is not written for nothing)
    _rows_programs(cfg, "gate_up", b, cfg.gate_up_block_h, h, "gate_up_block_h")
    _rows_programs(cfg, "down", b, cfg.down_block_i, max(i, i_s), "down_block_i")
    launch_moe_gate_up_int4(x, gate_up_proj, ids, act_ws, cfg)
    launch_moe_down_int4(act_ws, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, out, cfg)
