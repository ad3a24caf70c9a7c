"""Sparse MoE over a chunk of T tokens (prefill) with int4 experts: grouped.py's op reading packed weights.

gate_up_proj [E, 2I, H], down_proj [E, H, I] and shared_down [H, Is] are QuantizedLinear
(docs/int4.md). Same six kernels, grid and workspace as grouped.py (the pairs grouped by expert on
the device by grouping.group_pairs, then per block of one expert's pairs the gate/up and down GEMMs,
then the shared expert and the ordered combine); the three GEMMs dequantize their weight tiles in
registers exactly as QuantizedLinear.dequantize does ((q - z) * s in fp32, rounded to x's dtype,
linear/int4_gemm._int4_tile) and keep grouped.py's rounding points. So the op equals its
reference (dequantize, then moe_experts_grouped_reference) up to the fp32 summation order.

The routed GEMMs put the weight tile on the dot's left ([BLOCK_N, BLOCK_K] rows of one expert,
the MMA's M) and the gathered token rows on its right ([BLOCK_K, BLOCK_M]), as the int4 linear
GEMM does: the dequantized tile never leaves registers and a block of 16 pairs still fills an MMA.
The shared expert keeps grouped.py's orientation (its act is formed while loading the left
operand), the dequantized tile transposed on the right.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ...quant.format import QuantizedLinear
from .._util import INTERPRET, next_pow2, pdl, pdl_wait
from ..linear.int4_gemm import _int4_tile
from .grouped import (MoeGroupedLaunch, _block_rows, _check_grouped, _combine_store, _mma, _rnd, _shared_act_tile,
                      check_launch, gemm_grid, grouping_blocks, moe_experts_grouped_reference,
                      moe_grouped_launch_config, tile_args)
from .grouping import group_pairs
from .int4 import check_int4_experts

__all__ = ["moe_grouped_int4_launch_config", "moe_experts_grouped_int4_reference", "moe_experts_grouped_int4_triton"]


# ----------------------------------------------------------------------------- checks
def _check_grouped_int4(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                        workspace, out, info):
    """grouped.py's checks on the logical shapes (meta stand-ins in x's dtype), plus the int4 ones."""
    check_int4_experts(x, gate_up_proj, down_proj, shared_down)
    meta = [torch.empty(w.shape, device="meta", dtype=x.dtype) for w in (gate_up_proj, down_proj, shared_down)]
    return _check_grouped(x, meta[0], meta[1], ids, weights, shared_gate_up, meta[2], shared_gate_logit,
                          workspace, out, info)


# ----------------------------------------------------------------------------- reference
def moe_experts_grouped_int4_reference(x, gate_up_proj: QuantizedLinear, down_proj: QuantizedLinear, ids, weights,
                                       shared_gate_up, shared_down: QuantizedLinear, shared_gate_logit, workspace,
                                       out, info=None) -> None:
    """moe_experts_grouped_reference on the experts dequantized to x's dtype."""
    _check_grouped_int4(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                        workspace, out, info)
    dt = x.dtype
    moe_experts_grouped_reference(x, gate_up_proj.dequantize(dt), down_proj.dequantize(dt), ids, weights,
                                  shared_gate_up, shared_down.dequantize(dt), shared_gate_logit, workspace, out, info)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _moe_gate_up_int4_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, block_ptr, sorted_ptr, act_ptr, H, I, TOPK, stride_x,
                                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr,
                                  COLUMNS_FIRST: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    e, rows, pair, mm, col = _block_rows(block_ptr, sorted_ptr, BLOCK_M, COLUMNS_FIRST)
    if rows == 0:                        # a block past the used count
        return
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    NW = H // 8
    NG = H // GROUP
    g_rows = (e * 2 * I + offs_n)[:, None]       # rows of gate_up_proj viewed as [E * 2I, H]
    u_rows = g_rows + I
    xt_ptrs = x_ptr + (pair // TOPK)[None, :] * stride_x + offs_k[:, None]      # [BLOCK_K, BLOCK_M] of x^T
    dt: tl.constexpr = act_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ww = k0 // 8 + offs_w
        wg = _int4_tile(q_ptr + g_rows * NW, s_ptr + g_rows * NG, z_ptr + g_rows * NG, ww, mn[:, None], NW, GROUP,
                        BLOCK_N, BLOCK_K, dt, EMULATE)
        wu = _int4_tile(q_ptr + u_rows * NW, s_ptr + u_rows * NG, z_ptr + u_rows * NG, ww, mn[:, None], NW, GROUP,
                        BLOCK_N, BLOCK_K, dt, EMULATE)
        xt = tl.load(xt_ptrs + k0, mask=((k0 + offs_k) < H)[:, None] & mm[None, :], other=0.0)
        acc_g = _mma(wg, xt, acc_g, DOT_FP32)
        acc_u = _mma(wu, xt, acc_u, DOT_FP32)
    g = _rnd(acc_g, dt, EMULATE)
    u = _rnd(acc_u, dt, EMULATE)
    a = _rnd(_rnd(g * tl.sigmoid(g), dt, EMULATE) * u, dt, EMULATE)
    tl.store(act_ptr + pair[None, :] * I + offs_n[:, None], a.to(dt), mask=mn[:, None] & mm[None, :])


@triton.jit
def _moe_down_int4_gemm_kernel(act_ptr, q_ptr, s_ptr, z_ptr, w_ptr, block_ptr, sorted_ptr, y_ptr, H, I,
                               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, EMULATE: tl.constexpr,
                               COLUMNS_FIRST: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    e, rows, pair, mm, col = _block_rows(block_ptr, sorted_ptr, BLOCK_M, COLUMNS_FIRST)
    if rows == 0:
        return
    offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    NW = I // 8
    NG = I // GROUP
    d_rows = (e * H + offs_n)[:, None]           # rows of down_proj viewed as [E * H, I]
    at_ptrs = act_ptr + pair[None, :] * I + offs_k[:, None]                      # [BLOCK_K, BLOCK_M] of act^T
    dt: tl.constexpr = y_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        w = _int4_tile(q_ptr + d_rows * NW, s_ptr + d_rows * NG, z_ptr + d_rows * NG, k0 // 8 + offs_w, mn[:, None],
                       NW, GROUP, BLOCK_N, BLOCK_K, dt, EMULATE)
        at = tl.load(at_ptrs + k0, mask=((k0 + offs_k) < I)[:, None] & mm[None, :], other=0.0)
        acc = _mma(w, at, acc, DOT_FP32)
    wt = tl.load(w_ptr + pair, mask=mm, other=0.0).to(tl.float32)
    y = _rnd(_rnd(acc, dt, EMULATE) * wt[None, :], dt, EMULATE)
    tl.store(y_ptr + pair[None, :] * H + offs_n[:, None], y.to(dt), mask=mn[:, None] & mm[None, :])


@triton.jit
def _moe_shared_combine_int4_kernel(sgu_ptr, q_ptr, s_ptr, z_ptr, sgl_ptr, ids_ptr, y_ptr, info_ptr, out_ptr, T, H,
                                    IS, TOPK, stride_sgu, stride_sgl, stride_out, GROUP: tl.constexpr,
                                    HAS_INFO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, DOT_FP32: tl.constexpr,
                                    EMULATE: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < T
    mn = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    NW = IS // 8
    NG = IS // GROUP
    dt: tl.constexpr = out_ptr.dtype.element_ty
    g_ptrs = sgu_ptr + offs_m.to(tl.int64)[:, None] * stride_sgu + offs_k[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, IS, BLOCK_K):
        mk = (k0 + offs_k) < IS
        a = _shared_act_tile(g_ptrs, k0, mm[:, None] & mk[None, :], IS, dt, EMULATE)
        w = _int4_tile(q_ptr + rows * NW, s_ptr + rows * NG, z_ptr + rows * NG, k0 // 8 + offs_w, mn[:, None], NW,
                       GROUP, BLOCK_N, BLOCK_K, dt, EMULATE)
        acc = _mma(a, tl.trans(w), acc, DOT_FP32)
    _combine_store(acc, sgl_ptr, ids_ptr, y_ptr, info_ptr, out_ptr, offs_m, offs_n, mm, mn, T, H, TOPK,
                   stride_sgl, stride_out, HAS_INFO, BLOCK_M, BLOCK_N, BLOCK_TOPK, EMULATE)


# ----------------------------------------------------------------------------- launch and op
def moe_grouped_int4_launch_config(t: int, h: int, i: int, k: int, e: int, i_s: int) -> MoeGroupedLaunch:
    """grouped.py's tiles (block_m by the pairs per expert, the N tiles), with K steps of 128
    where the input dim allows (64 bytes of words per weight row). Not yet tuned on a GPU."""
    base = moe_grouped_launch_config(t, h, i, k, e, i_s, large_tiles=False)
    bk = max(16, min(128, next_pow2(min(h, i, i_s))))
    return dataclasses.replace(base, **{kernel: dataclasses.replace(getattr(base, kernel), block_k=bk)
                                        for kernel in ("gate_up", "down", "shared")})


def moe_experts_grouped_int4_triton(x, gate_up_proj: QuantizedLinear, down_proj: QuantizedLinear, ids, weights,
                                    shared_gate_up, shared_down: QuantizedLinear, shared_gate_logit, workspace, out,
                                    info=None, *, launch: MoeGroupedLaunch | None = None) -> None:
    """Same contract as moe_experts_grouped_int4_reference; `launch` overrides the tiles."""
    t, h, e, i, k, i_s = _check_grouped_int4(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                             shared_gate_logit, workspace, out, info)
    cfg = launch or moe_grouped_int4_launch_config(t, h, i, k, e, i_s)
    ws = workspace
    p = t * k
    check_launch(cfg)
    n_blocks = grouping_blocks(cfg, ws, p, e)
    dot_fp32 = INTERPRET or x.dtype == torch.float32
    emulate = INTERPRET and x.dtype == torch.bfloat16
    opts = pdl(x)
    group_pairs(ids, info, p, e, cfg.block_m, ws.chunk_counts, ws.chunk_base, ws.block_info, ws.sorted_pairs)
    flags = dict(BLOCK_M=cfg.block_m, DOT_FP32=dot_fp32, EMULATE=emulate)
    gu, dn, sd = gate_up_proj, down_proj, shared_down
    grid, tiles = gemm_grid(cfg.gate_up, n_blocks, i)
    _moe_gate_up_int4_gemm_kernel[grid](x, gu.qweight, gu.scales, gu.zeros, ws.block_info, ws.sorted_pairs, ws.act,
                                        h, i, k, x.stride(0), GROUP=gu.group_size, **flags, **tiles, **opts)
    grid, tiles = gemm_grid(cfg.down, n_blocks, h)
    _moe_down_int4_gemm_kernel[grid](ws.act, dn.qweight, dn.scales, dn.zeros, weights, ws.block_info, ws.sorted_pairs,
                                     ws.y, h, i, GROUP=dn.group_size, **flags, **tiles, **opts)
    sgl = shared_gate_logit  # [T] or [T, 1], any row stride: one element per token
    _moe_shared_combine_int4_kernel[(triton.cdiv(t, cfg.shared_block_m), triton.cdiv(h, cfg.shared.block_n))](
        shared_gate_up, sd.qweight, sd.scales, sd.zeros, sgl, ids, ws.y, info, out, t, h, i_s, k,
        shared_gate_up.stride(0), sgl.stride(0), out.stride(0), GROUP=sd.group_size, HAS_INFO=info is not None,
        BLOCK_M=cfg.shared_block_m, BLOCK_TOPK=next_pow2(k), DOT_FP32=dot_fp32, EMULATE=emulate,
        **tile_args(cfg.shared), **opts)
