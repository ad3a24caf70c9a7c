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

import torch
import triton
import triton.language as tl

from ...quant.format import QuantizedLinear
from .._util import MODEL_DTYPES, next_pow2, pdl, pdl_wait
from ..hardware import current_profile, profile_for
from ..linear.int4 import _dequant_codes, _dequant_words, _load_words
from .decode import MoeLaunch, _check_moe, moe_experts_reference, moe_launch_config


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
def _group_params(s_rows, z_rows, ww, w0, m_row, m, GROUP: tl.constexpr, BLOCK_I: tl.constexpr):
    """The scale and zero (fp32) of the groups of words ww (starting at word w0) for row pointers
    s_rows/z_rows [..., 1]: when BLOCK_I == GROUP the tile is one group, so one pair per row
    ([..., 1], mask m_row) rather than one per word (mask m)."""
    if BLOCK_I == GROUP:
        sc = tl.load(s_rows + w0 // (GROUP // 8), mask=m_row, other=0.0).to(tl.float32)
        zr = tl.load(z_rows + w0 // (GROUP // 8), mask=m_row, other=0.0).to(tl.float32)
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
        sc, zr = _group_params((s_ptr + rows * NG)[:, :, None], (z_ptr + rows * NG)[:, :, None],
                               ww[None, None, :], w0, m_rows, m3, GROUP, BLOCK_I)
        acc += _dequant_codes(words[:, :, :, None], sc[:, :, :, None], zr[:, :, :, None], nib, dt) * av
        ms = ii < IS
        g = tl.load(sgu_ptr + row * stride_sgu + ii, mask=ms, other=0.0).to(tl.float32)
        u = tl.load(sgu_ptr + row * stride_sgu + IS + ii, mask=ms, other=0.0).to(tl.float32)
        a = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
        a = tl.reshape(a, (1, BLOCK_I // 8, 8))
        m2 = mh[:, None] & (ww < SW)[None, :]
        words = tl.load(sq_ptr + srows * SW + ww[None, :], mask=m2, other=0)
        sc, zr = _group_params(ss_ptr + srows * SG, sz_ptr + srows * SG, ww[None, :], w0, mh[:, None], m2, GROUP,
                               BLOCK_I)
        acc2 += _dequant_words(words, sc, zr, dt) * a
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    y = y.to(dt).to(tl.float32)                                      # [K, HO], rounded per expert
    y = (y * wts[:, None]).to(dt).to(tl.float32)
    # add them in ascending expert id (transformers' order), rounding after each add
    order_ids = tl.where(mk, ids, 2147483647)
    total = tl.zeros([BLOCK_HO], tl.float32)
    for _ in range(0, TOPK):
        e32 = tl.min(order_ids, axis=0)
        slot = tl.min(tl.where(order_ids == e32, offs_k, BLOCK_K), axis=0)
        order_ids = tl.where(offs_k == slot, 2147483647, order_ids)
        yj = tl.sum(tl.where(offs_k[:, None] == slot, y, 0.0), axis=0)
        total = (total + yj).to(dt).to(tl.float32)
    ys = tl.sum(tl.sum(acc2, axis=2), axis=1).to(dt).to(tl.float32)
    gl = tl.load(sgl_ptr + row * stride_sgl).to(tl.float32)
    gs = tl.sigmoid(gl).to(dt).to(tl.float32)
    ys = (gs * ys).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_h, (total + ys).to(dt), mask=mh)


# ----------------------------------------------------------------------------- launch
def moe_int4_launch_config(b: int, h: int, i: int, k: int, i_s: int, group_size: int,
                           profile=None) -> MoeLaunch:
    """moe_launch_config's configuration with the K tiles widened to at least one group (they are
    powers of two, so they then hold whole groups). Not yet tuned on a GPU."""
    profile = current_profile() if profile is None else profile
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
    return MoeLaunch(max(1, min(block_i, 16384 // block_h)), block_h, c.gate_up_warps, c.gate_up_stages,
                     max(1, min(block_ho, 8192 // (next_pow2(k) * block_i2))), block_i2, c.down_warps,
                     c.down_stages)


def _check_launch(cfg: MoeLaunch, group_size: int) -> None:
    for name in ("gate_up_block_h", "down_block_i"):
        v = getattr(cfg, name)
        if v % group_size or v & (v - 1):
            raise ValueError(f"launch.{name}={v} must be a power of two holding whole groups of {group_size}")


def launch_moe_gate_up_int4(x, gate_up_proj: QuantizedLinear, ids, act_ws, cfg: MoeLaunch) -> None:
    b, h = x.shape
    k = ids.shape[1]
    i = gate_up_proj.shape[1] // 2
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
    cfg = launch or moe_int4_launch_config(b, h, i, k, i_s, g, profile_for(out))
    _check_launch(cfg, g)
    launch_moe_gate_up_int4(x, gate_up_proj, ids, act_ws, cfg)
    launch_moe_down_int4(act_ws, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, out, cfg)
