"""Batch-1 int4 expert kernels over blocks of whole rows: int4.py's CUDA-core math, laid out as
linear/int4.py's whole-row GEMV (_gemv_int4_rows_kernel).

At batch 1 the per-block expert kernels run short programs (a few K tiles each) that wait on a
dependent load (the expert ids) before their first weight load and end in reductions: on an H200
the down kernel took 11.6 us a layer for 5 MB, a fifth of the bandwidth. Here a fixed number of
programs each take every P-th block of whole rows; a program loads its inputs once (x, or the
slots' act rows and the shared expert's act) and the next block's words before it dequantizes the
current one, so that the weight stream does not stop between blocks.

  - gate/up: a block is BLOCK_I gate rows and the matching up rows of one slot's expert over the
    whole H; block b belongs to slot b // cdiv(I, BLOCK_I).
  - down: a block is BLOCK_HO output rows: each slot's expert's rows of down_proj (the whole I)
    and shared_down's rows (the whole IS). The slots are added in ascending expert id, an order
    fixed once per program (every block has the same ids).

The roundings are int4.py's (decode.py's: transformers' eager loop), so each kernel equals the
reference up to the fp32 summation order. Batch 1 only: int4.py refuses more rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._util import pdl_wait
from ..linear.int4 import _dequant_codes, _dequant_words, _load_words


# ----------------------------------------------------------------------------- gate/up
@triton.jit
def _gate_up_block(q_ptr, s_ptr, z_ptr, ids_ptr, blk, NBLK, NB_I, I, NW, NG, offs_r, offs_w,
                   GROUP: tl.constexpr, BLOCK_I: tl.constexpr):
    """Block blk's [2 BLOCK_I, words] tile (gate rows, then the same up rows) with each word's scale
    and zero; past the last block, or for another rank's expert (id < 0), nothing is loaded."""
    e = tl.load(ids_ptr + blk // NB_I, mask=blk < NBLK, other=-1).to(tl.int64)
    offs_i = (blk % NB_I) * BLOCK_I + offs_r % BLOCK_I
    rows = (e * 2 * I + offs_i + tl.where(offs_r < BLOCK_I, 0, I))[:, None]    # of gate_up_proj as [E*2I, H]
    live = tl.where(e >= 0, offs_i < I, False)[:, None]
    return _load_words(q_ptr + rows * NW, s_ptr + rows * NG, z_ptr + rows * NG, offs_w, live, NW, GROUP)


@triton.jit
def _moe_gate_up_int4_rows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, act_ptr, H, I, TOPK,
                                  GROUP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                                  USE_GDC: tl.constexpr):
    """act[slot] = silu(gate) * up of one token (x [1, H]), BLOCK_H >= H: whole rows."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pdl_wait(USE_GDC)   # the ids come from the router top-k: no weight address is known before
    NB_I = tl.cdiv(I, BLOCK_I)
    NBLK = TOPK * NB_I
    NW = H // 8
    NG = H // GROUP
    offs_r = tl.arange(0, 2 * BLOCK_I)
    offs_w = tl.arange(0, BLOCK_H // 8)
    offs_h = tl.arange(0, BLOCK_H)
    offs_o = tl.arange(0, BLOCK_I)
    first = tl.arange(0, 2)[:, None] == 0
    dt = act_ptr.dtype.element_ty
    # loaded flat and reshaped, so that a thread holds a word's eight inputs (see _dequant_words)
    xv = tl.reshape(tl.load(x_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32), (1, BLOCK_H // 8, 8))
    words, s, z = _gate_up_block(q_ptr, s_ptr, z_ptr, ids_ptr, pid, NBLK, NB_I, I, NW, NG, offs_r, offs_w,
                                 GROUP, BLOCK_I)
    for blk in range(pid, NBLK, nprog):
        nxt = _gate_up_block(q_ptr, s_ptr, z_ptr, ids_ptr, blk + nprog, NBLK, NB_I, I, NW, NG, offs_r, offs_w,
                             GROUP, BLOCK_I)
        v = tl.sum(tl.sum(_dequant_words(words, s, z, dt) * xv, axis=2), axis=1)   # a word's codes in-thread
        v = tl.reshape(v, (2, BLOCK_I))
        g = tl.sum(tl.where(first, v, 0.0), axis=0).to(dt).to(tl.float32)
        u = tl.sum(tl.where(first, 0.0, v), axis=0).to(dt).to(tl.float32)
        a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        oi = (blk % NB_I) * BLOCK_I + offs_o
        tl.store(act_ptr + (blk // NB_I) * I + oi, (a * u).to(dt), mask=oi < I)
        words, s, z = nxt


# ----------------------------------------------------------------------------- down + shared
@triton.jit
def _ascending_ranks(ids, offs_k, mk, BLOCK_K: tl.constexpr):
    """Each slot's place when the slots are ordered by expert id, ties to the lower slot (the order
    of decode.py's _ascending_sum); BLOCK_K for the slots past TOPK."""
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (offs_k[None, :] < offs_k[:, None]))
    rank = tl.sum((before & mk[None, :]).to(tl.int32), axis=1)
    return tl.where(mk, rank, BLOCK_K)


@triton.jit
def _ranked_sum(y, rank, TOPK, BLOCK_HO: tl.constexpr, dt: tl.constexpr):
    """The slots' rows y [K, HO] added in the order `rank`, rounded to dt after each add."""
    total = tl.zeros([BLOCK_HO], tl.float32)
    for p in range(0, TOPK):
        total = (total + tl.sum(tl.where(rank[:, None] == p, y, 0.0), axis=0)).to(dt).to(tl.float32)
    return total


@triton.jit
def _down_block(q_ptr, s_ptr, z_ptr, sq_ptr, ss_ptr, sz_ptr, rows_e, mine, blk, H, NW, NG, SW, SG, offs_ho,
                offs_w, GROUP: tl.constexpr, BLOCK_HO: tl.constexpr):
    """Block blk's routed tile ([slots, BLOCK_HO, words]: each slot's expert's rows, rows_e [K] the
    first) and shared tile ([BLOCK_HO, words]), with each word's scale and zero; rows past H, and
    other ranks' experts, load nothing."""
    h = blk * BLOCK_HO + offs_ho
    mh = h < H
    rows = (rows_e[:, None] + h[None, :])[:, :, None]                  # [K, HO, 1] of down_proj as [E*H, I]
    live = (mine[:, None] & mh[None, :])[:, :, None]
    words, s, z = _load_words(q_ptr + rows * NW, s_ptr + rows * NG, z_ptr + rows * NG, offs_w, live, NW, GROUP)
    srows = h.to(tl.int64)[:, None]
    swords, ss, sz = _load_words(sq_ptr + srows * SW, ss_ptr + srows * SG, sz_ptr + srows * SG, offs_w,
                                 mh[:, None], SW, GROUP)
    return words, s, z, swords, ss, sz


@triton.jit
def _moe_down_int4_rows_kernel(act_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, w_ptr, sgu_ptr, sq_ptr, ss_ptr, sz_ptr,
                               sgl_ptr, out_ptr, H, I, IS, TOPK,
                               GROUP: tl.constexpr, BLOCK_HO: tl.constexpr, BLOCK_I: tl.constexpr,
                               BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    """out = sum over slots (ascending id) of w * down[e](act) + sigmoid(gate) * shared_down(act_s)
    for one token; BLOCK_I >= max(I, IS): whole rows."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pdl_wait(USE_GDC)   # the ids (router) and act rows (gate/up kernel): nothing is loaded before
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_I // 8)
    offs_i = tl.arange(0, BLOCK_I)
    offs_ho = tl.arange(0, BLOCK_HO)
    mk = offs_k < TOPK
    dt = out_ptr.dtype.element_ty
    ids = tl.load(ids_ptr + offs_k, mask=mk, other=0)
    wts = tl.load(w_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
    mine = mk & (ids >= 0)     # id < 0: another rank's expert: not read, its y is 0 (adds nothing)
    rank = _ascending_ranks(ids, offs_k, mk, BLOCK_K)
    rows_e = ids.to(tl.int64) * H
    NW, NG, SW, SG = I // 8, I // GROUP, IS // 8, IS // GROUP
    # the inputs, once a program: each slot's act row, the shared expert's act (formed from its
    # precomputed gate/up rows) and its gate, loaded flat and reshaped so that a thread holds a
    # word's eight (see _dequant_codes)
    av = tl.load(act_ptr + offs_k.to(tl.int64)[:, None] * I + offs_i[None, :],
                 mask=mine[:, None] & (offs_i < I)[None, :], other=0.0)
    av = tl.reshape(av.to(tl.float32), (BLOCK_K, 1, BLOCK_I // 8, 8))
    ms = offs_i < IS
    g = tl.load(sgu_ptr + offs_i, mask=ms, other=0.0).to(tl.float32)
    u = tl.load(sgu_ptr + IS + offs_i, mask=ms, other=0.0).to(tl.float32)
    a_s = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
    a_s = tl.reshape(a_s, (1, BLOCK_I // 8, 8))
    gs = tl.sigmoid(tl.load(sgl_ptr).to(tl.float32)).to(dt).to(tl.float32)
    nib = tl.arange(0, 8)[None, None, None, :]
    words, s, z, swords, ss, sz = _down_block(q_ptr, s_ptr, z_ptr, sq_ptr, ss_ptr, sz_ptr, rows_e, mine, pid, H,
                                              NW, NG, SW, SG, offs_ho, offs_w, GROUP, BLOCK_HO)
    for blk in range(pid, tl.cdiv(H, BLOCK_HO), nprog):
        nxt = _down_block(q_ptr, s_ptr, z_ptr, sq_ptr, ss_ptr, sz_ptr, rows_e, mine, blk + nprog, H, NW, NG, SW,
                          SG, offs_ho, offs_w, GROUP, BLOCK_HO)
        w = _dequant_codes(words[:, :, :, None], s[:, :, :, None], z[:, :, :, None], nib, dt)
        y = tl.sum(tl.sum(w * av, axis=3), axis=2).to(dt).to(tl.float32)    # [K, HO], rounded per expert
        y = (y * wts[:, None]).to(dt).to(tl.float32)
        total = _ranked_sum(y, rank, TOPK, BLOCK_HO, dt)
        ys = tl.sum(tl.sum(_dequant_words(swords, ss, sz, dt) * a_s, axis=2), axis=1).to(dt).to(tl.float32)
        ys = (gs * ys).to(dt).to(tl.float32)
        h = blk * BLOCK_HO + offs_ho
        tl.store(out_ptr + h, (total + ys).to(dt), mask=h < H)
        words, s, z, swords, ss, sz = nxt
