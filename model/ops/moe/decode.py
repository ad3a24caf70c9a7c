"""Sparse MoE: router (softmax fp32, top-k, renormalise) and the experts plus the gated shared expert.

The experts are read in place by index from the fused tensors gate_up_proj [E, 2I, H] (gate rows
first) and down_proj [E, H, I]: no gathers. Two kernels:
  1. gate/up GEMV of every (row, chosen expert), SiLU-multiply fused -> act_ws [B, k, I] (model dtype);
  2. down GEMV of every chosen expert, times its routing weight, summed in ascending expert id (the
     order transformers' eager loop adds them, with the same model-dtype rounding after each add),
     plus the shared expert: its gate/up rows come precomputed (a slice of a fused GEMV output),
     its act is formed on the fly, then down_proj and x sigmoid(shared gate logit).
Rows that pick the same expert read its weights once each (fine for the small decode batch).
An id < 0 marks a slot whose expert lives on another rank (expert parallel, model/parallel): it
contributes nothing and its weights are not read; router_topk(local_experts=...) writes such ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._util import check_contiguous, check_rows, next_pow2, pdl, pdl_wait
from ..hardware import DeviceProfile, current_profile, profile_for


# ----------------------------------------------------------------------------- router
def _check_router(logits, top_k, weights_out, ids_out, local_experts=None):
    b, e = logits.shape
    check_rows("logits", logits, b, e)
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
    check_contiguous("weights_out", weights_out, (b, top_k))
    check_contiguous("ids_out", ids_out, (b, top_k))
    if ids_out.dtype != torch.int32:
        raise TypeError(f"ids_out must be int32, got {ids_out.dtype}")
    if local_experts is not None:
        ok = (isinstance(local_experts, tuple) and len(local_experts) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in local_experts))
        if not ok or local_experts[0] < 0 or local_experts[1] < 1 or sum(local_experts) > e:
            raise ValueError(f"local_experts must be (start, count) of experts inside [0, {e}), "
                             f"got {local_experts!r}")
    return b, e


def router_topk_reference(logits, top_k, weights_out, ids_out, *, local_experts=None) -> None:
    """softmax (fp32) -> top-k (descending; ties to the lowest expert id, as the kernel breaks
    them: torch.topk leaves their order unspecified, and bf16 logits tie often) -> renormalise ->
    rounded to the logits dtype.

    local_experts=(start, count) (expert parallel: this rank holds experts start..start+count-1):
    ids_out holds id - start for those and -1 for every other expert; the weights are unchanged."""
    _check_router(logits, top_k, weights_out, ids_out, local_experts)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    val, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    val, idx = val[:, :top_k], idx[:, :top_k]
    val = val / val.sum(dim=-1, keepdim=True)
    weights_out.copy_(val.to(logits.dtype))
    if local_experts is not None:
        start, count = local_experts
        idx = torch.where((idx >= start) & (idx < start + count), idx - start, -1)
    ids_out.copy_(idx.to(torch.int32))


@triton.jit
def _topk_row(logits_ptr, w_ptr, ids_ptr, row, E, TOPK, stride_l, E_START, E_LOCAL, BLOCK_E: tl.constexpr,
              BLOCK_K: tl.constexpr, LOCAL: tl.constexpr, CG: tl.constexpr):
    """Row `row`'s softmax, top-k and renormalised weights (router_topk_reference's contract).
    CG: the logits were just stored by other programs of this kernel (the fused router epilogue
    of the GEMVs), so they are read from L2 past this SM's L1."""
    offs = tl.arange(0, BLOCK_E)
    me = offs < E
    if CG:
        x = tl.load(logits_ptr + row * stride_l + offs, mask=me, other=float("-inf"), cache_modifier=".cg")
    else:
        x = tl.load(logits_ptr + row * stride_l + offs, mask=me, other=float("-inf"))
    x = x.to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(me, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros([BLOCK_K], tl.float32)
    idxs = tl.zeros([BLOCK_K], tl.int32)
    for j in range(0, TOPK):
        best = tl.max(p, axis=0)
        bi = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)   # lowest index among ties
        vals = tl.where(offs_k == j, best, vals)
        idxs = tl.where(offs_k == j, bi, idxs)
        p = tl.where(offs == bi, -2.0, p)
    mk = offs_k < TOPK
    vals = vals / tl.sum(tl.where(mk, vals, 0.0), axis=0)
    tl.store(w_ptr + row * TOPK + offs_k, vals.to(w_ptr.dtype.element_ty), mask=mk)
    if LOCAL:   # expert parallel: this rank's experts renumbered from 0, every other one -1
        idxs = tl.where((idxs >= E_START) & (idxs < E_START + E_LOCAL), idxs - E_START, -1)
    tl.store(ids_ptr + row * TOPK + offs_k, idxs, mask=mk)


@triton.jit
def _router_topk_kernel(logits_ptr, w_ptr, ids_ptr, E, TOPK, stride_l, E_START, E_LOCAL,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, LOCAL: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    _topk_row(logits_ptr, w_ptr, ids_ptr, tl.program_id(0), E, TOPK, stride_l, E_START, E_LOCAL, BLOCK_E, BLOCK_K,
              LOCAL, False)


def router_topk_triton(logits, top_k, weights_out, ids_out, *, local_experts=None) -> None:
    b, e = _check_router(logits, top_k, weights_out, ids_out, local_experts)
    start, count = local_experts if local_experts is not None else (0, e)
    _router_topk_kernel[(b,)](logits, weights_out, ids_out, e, top_k, logits.stride(0), start, count,
                              BLOCK_E=next_pow2(e), BLOCK_K=next_pow2(top_k), LOCAL=local_experts is not None,
                              num_warps=1 if e <= 1024 else 4, **pdl(logits))   # one warp: the top-k reductions stay in shuffles


# ----------------------------------------------------------------------------- experts
def moe_workspace_numel(batch: int, top_k: int, intermediate: int) -> int:
    """Model-dtype elements of moe_experts' act_ws: the SiLU-multiplied gate/up of each (row, expert)."""
    return batch * top_k * intermediate


def moe_workspace(batch, top_k, intermediate, dtype, device) -> torch.Tensor:
    return torch.empty(moe_workspace_numel(batch, top_k, intermediate), dtype=dtype, device=device)


def check_expert_args(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit,
                      out):
    """The routed and shared experts' arguments, shared by the decode and the grouped (prefill) ops:
    (rows, H, E, I, k, Is)."""
    b, h = x.shape
    check_rows("x", x, b, h)
    if gate_up_proj.dim() != 3 or not gate_up_proj.is_contiguous() or gate_up_proj.shape[2] != h \
            or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be a contiguous [E, 2I, {h}], got {tuple(gate_up_proj.shape)}")
    e, i2, _ = gate_up_proj.shape
    i = i2 // 2
    check_contiguous("down_proj", down_proj, (e, h, i))
    if ids.dim() != 2:
        raise ValueError(f"ids must be [{b}, k], got shape {tuple(ids.shape)}")
    k = ids.shape[1]
    check_contiguous("ids", ids, (b, k))
    check_contiguous("weights", weights, (b, k))
    if ids.dtype != torch.int32:
        raise TypeError(f"ids must be int32, got {ids.dtype}")
    if shared_down.dim() != 2 or shared_down.shape[0] != h or not shared_down.is_contiguous():
        raise ValueError(f"shared_down must be a contiguous [{h}, Is], got {tuple(shared_down.shape)}")
    i_s = shared_down.shape[1]
    check_rows("shared_gate_up", shared_gate_up, b, 2 * i_s)
    if shared_gate_logit.dim() not in (1, 2) or shared_gate_logit.shape[0] != b or shared_gate_logit.numel() != b:
        raise ValueError(f"shared_gate_logit must hold one logit per row ([{b}] or [{b}, 1]), "
                         f"got {tuple(shared_gate_logit.shape)}")
    check_rows("out", out, b, h)
    return b, h, e, i, k, i_s


def _check_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, act_ws, out):
    b, h, e, i, k, i_s = check_expert_args(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                           shared_gate_logit, out)
    if act_ws.numel() < b * k * i or act_ws.dtype != x.dtype:
        raise ValueError(f"act_ws must be {x.dtype} with >= {b * k * i} elements (moe_workspace_numel), "
                         f"got {act_ws.dtype} {act_ws.numel()}")
    return b, h, e, i, k, i_s


def moe_experts_reference(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                          shared_gate_logit, act_ws, out) -> None:
    """out = sum_j w_j * down[e_j](silu(gate) * up) + sigmoid(shared_gate_logit) * shared_down(act_s),
    with transformers' eager rounding and summation order (ascending expert id)."""
    b, h, e, i, k, i_s = _check_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                    shared_gate_logit, act_ws, out)
    act = torch.nn.functional.silu
    for r in range(b):
        total = torch.zeros(h, dtype=x.dtype, device=x.device)
        order = torch.argsort(ids[r].long())
        for j in order.tolist():
            ex = int(ids[r, j])
            if ex < 0:          # another rank's expert (expert parallel): contributes nothing
                continue
            gate, up = torch.nn.functional.linear(x[r:r + 1], gate_up_proj[ex]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(act(gate) * up, down_proj[ex])[0]
            total = total + (y * weights[r, j]).to(x.dtype)
        sg, su = shared_gate_up[r:r + 1, :i_s], shared_gate_up[r:r + 1, i_s:2 * i_s]
        ys = torch.nn.functional.linear(act(sg) * su, shared_down)[0]
        gl = shared_gate_logit.reshape(b)[r:r + 1]
        out[r].copy_(total + torch.sigmoid(gl) * ys)


@triton.jit
def _moe_gate_up_kernel(x_ptr, gu_ptr, ids_ptr, act_ptr, H, I, TOPK, stride_x,
                        BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)     # row * TOPK + slot
    ib = tl.program_id(1)
    row = pid // TOPK
    e = tl.load(ids_ptr + pid).to(tl.int64)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_h = tl.arange(0, BLOCK_H)
    mi = offs_i < I
    mw = tl.where(e >= 0, mi, False)   # id < 0: another rank's expert, whose weights are not read (act = 0)
    g_rows = gu_ptr + (e * 2 * I + offs_i)[:, None] * H
    u_rows = g_rows + I * H
    acc_g = tl.zeros([BLOCK_I, BLOCK_H], tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        mh = hh < H
        xv = tl.load(x_ptr + row * stride_x + hh, mask=mh, other=0.0).to(tl.float32)
        m2 = mw[:, None] & mh[None, :]
        wg = tl.load(g_rows + hh[None, :], mask=m2, other=0.0)
        wu = tl.load(u_rows + hh[None, :], mask=m2, other=0.0)
        acc_g += wg.to(tl.float32) * xv[None, :]
        acc_u += wu.to(tl.float32) * xv[None, :]
    dt = act_ptr.dtype.element_ty
    g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    tl.store(act_ptr + pid.to(tl.int64) * I + offs_i, (a * u).to(dt), mask=mi)


@triton.jit
def _ascending_sum(y, ids, offs_k, mk, TOPK, BLOCK_K: tl.constexpr, BLOCK_HO: tl.constexpr, dt: tl.constexpr):
    """The slots' rows y [K, HO] added in ascending expert id (transformers' order), rounded to dt
    after each add."""
    order_ids = tl.where(mk, ids, 2147483647)
    total = tl.zeros([BLOCK_HO], tl.float32)
    for _ in range(0, TOPK):
        e32 = tl.min(order_ids, axis=0)
        slot = tl.min(tl.where(order_ids == e32, offs_k, BLOCK_K), axis=0)
        order_ids = tl.where(offs_k == slot, 2147483647, order_ids)
        yj = tl.sum(tl.where(offs_k[:, None] == slot, y, 0.0), axis=0)
        total = (total + yj).to(dt).to(tl.float32)
    return total


@triton.jit
def _moe_down_kernel(act_ptr, dn_ptr, ids_ptr, w_ptr, sgu_ptr, sdn_ptr, sgl_ptr, out_ptr,
                     H, I, IS, TOPK, stride_sgu, stride_sgl, stride_out,
                     BLOCK_HO: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    offs_i = tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    mh = offs_h < H
    mk = offs_k < TOPK
    dt = out_ptr.dtype.element_ty
    ids = tl.load(ids_ptr + row * TOPK + offs_k, mask=mk, other=0)
    wts = tl.load(w_ptr + row * TOPK + offs_k, mask=mk, other=0.0).to(tl.float32)
    mine = mk & (ids >= 0)     # id < 0: another rank's expert: not read, its y is 0 (adds nothing)
    # every chosen expert's [BLOCK_HO, I] slice of down_proj at once: k independent streams in flight,
    # and the shared expert's [BLOCK_HO, IS] slice in the same loop (its act formed on the fly from
    # the precomputed gate/up rows), so its loads overlap the routed ones instead of trailing them
    rows = dn_ptr + (ids.to(tl.int64)[:, None] * H + offs_h[None, :])[:, :, None] * I     # [K, HO, 1]
    a_base = act_ptr + (row * TOPK + offs_k).to(tl.int64)[:, None] * I                      # [K, 1]
    srows = sdn_ptr + offs_h.to(tl.int64)[:, None] * IS                                    # [HO, 1]
    m3 = mine[:, None, None] & mh[None, :, None]
    acc = tl.zeros([BLOCK_K, BLOCK_HO, BLOCK_I], tl.float32)
    acc2 = tl.zeros([BLOCK_HO, BLOCK_I], tl.float32)
    for i0 in range(0, tl.maximum(I, IS), BLOCK_I):
        ii = i0 + offs_i
        mi = ii < I
        av = tl.load(a_base + ii[None, :], mask=mine[:, None] & mi[None, :], other=0.0).to(tl.float32)
        wv = tl.load(rows + ii[None, None, :], mask=m3 & mi[None, None, :], other=0.0)
        ms = ii < IS
        g = tl.load(sgu_ptr + row * stride_sgu + ii, mask=ms, other=0.0).to(tl.float32)
        u = tl.load(sgu_ptr + row * stride_sgu + IS + ii, mask=ms, other=0.0).to(tl.float32)
        ws = tl.load(srows + ii[None, :], mask=mh[:, None] & ms[None, :], other=0.0)
        acc += wv.to(tl.float32) * av[:, None, :]
        a = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
        acc2 += ws.to(tl.float32) * a[None, :]
    y = tl.sum(acc, axis=2).to(dt).to(tl.float32)                  # [K, HO], rounded per expert
    y = (y * wts[:, None]).to(dt).to(tl.float32)
    total = _ascending_sum(y, ids, offs_k, mk, TOPK, BLOCK_K, BLOCK_HO, dt)
    ys = tl.sum(acc2, axis=1).to(dt).to(tl.float32)
    gl = tl.load(sgl_ptr + row * stride_sgl).to(tl.float32)
    gs = tl.sigmoid(gl).to(dt).to(tl.float32)
    ys = (gs * ys).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_h, (total + ys).to(dt), mask=mh)


@dataclass(frozen=True)
class MoeLaunch:
    """Launch configuration of the two expert kernels; a pure function of the shapes
    (moe_launch_config), never autotuned, so it is safe inside a CUDA-graph capture."""
    gate_up_block_i: int      # weight rows of gate (and as many of up) per program
    gate_up_block_h: int      # hidden columns per loop iteration
    gate_up_warps: int
    gate_up_stages: int
    down_block_ho: int        # output rows per program (of every chosen expert at once)
    down_block_i: int         # intermediate columns per loop iteration
    down_warps: int
    down_stages: int


def moe_launch_config(b: int, h: int, i: int, k: int, i_s: int,
                      profile: DeviceProfile | None = None) -> MoeLaunch:
    """The expert kernels' configuration on a device of ``profile`` (the current device's by
    default): blocks shrink until the GPU has enough programs."""
    fill = (current_profile() if profile is None else profile).fill_programs
    # kernel 1: (row, slot) x I-blocks, each streaming 2*BLOCK_I weight rows of length H
    block_h = min(512, next_pow2(h))
    block_i = max(1, min(8, 4096 // block_h))
    while block_i > 2 and b * k * triton.cdiv(i, block_i) < fill:
        block_i //= 2
    # kernel 2: row x H-blocks, each streaming BLOCK_HO rows of every chosen expert's down_proj at once
    block_k = next_pow2(k)
    block_i2 = min(128, next_pow2(max(i, i_s)))
    block_ho = max(1, min(16, 8192 // (block_k * block_i2)))   # H100: 8 rows x 8 experts x 128 was best
    while block_ho > 1 and b * triton.cdiv(h, block_ho) < fill // 2:
        block_ho //= 2
    return MoeLaunch(block_i, block_h, 4, 3, block_ho, block_i2, 4, 3)   # 3 stages: Triton's default


def launch_moe_gate_up(x, gate_up_proj, ids, act_ws, cfg: MoeLaunch) -> None:
    b, h = x.shape
    k = ids.shape[1]
    i = gate_up_proj.shape[1] // 2
    _moe_gate_up_kernel[(b * k, triton.cdiv(i, cfg.gate_up_block_i))](
        x, gate_up_proj, ids, act_ws, h, i, k, x.stride(0), BLOCK_I=cfg.gate_up_block_i,
        BLOCK_H=cfg.gate_up_block_h, num_warps=cfg.gate_up_warps, num_stages=cfg.gate_up_stages, **pdl(x))


def launch_moe_down(act_ws, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, out,
                    cfg: MoeLaunch) -> None:
    b, h = out.shape
    k = ids.shape[1]
    i, i_s = down_proj.shape[2], shared_down.shape[1]
    sgl = shared_gate_logit  # [B] or [B, 1], any row stride: one element per row
    _moe_down_kernel[(b, triton.cdiv(h, cfg.down_block_ho))](
        act_ws, down_proj, ids, weights, shared_gate_up, shared_down, sgl, out, h, i, i_s, k,
        shared_gate_up.stride(0), sgl.stride(0), out.stride(0), BLOCK_HO=cfg.down_block_ho,
        BLOCK_I=cfg.down_block_i, BLOCK_K=next_pow2(k), num_warps=cfg.down_warps, num_stages=cfg.down_stages, **pdl(out))


def moe_experts_triton(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                       shared_gate_logit, act_ws, out, *, launch: MoeLaunch | None = None) -> None:
    """Same contract as moe_experts_reference; `launch` overrides the configuration (benchmarks)."""
    b, h, e, i, k, i_s = _check_moe(x, gate_up_proj, down_proj, ids, weights, shared_gate_up, shared_down,
                                    shared_gate_logit, act_ws, out)
    cfg = launch or moe_launch_config(b, h, i, k, i_s, profile_for(out))
    launch_moe_gate_up(x, gate_up_proj, ids, act_ws, cfg)
    launch_moe_down(act_ws, down_proj, ids, weights, shared_gate_up, shared_down, shared_gate_logit, out, cfg)
