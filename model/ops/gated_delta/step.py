"""Gated DeltaNet decode step, fused: one kernel does the L2 norm of q and k (fp32), the q scale,
key-head sharing (value head j reads key head j // (NV // NK)), beta = sigmoid(b) and
g = -exp(A_log) * softplus(a + dt_bias), the decay and delta-rule update of the fp32 state in
place, and the output o = S^T q — optionally followed by the gated RMSNorm of the output
(norm(o) * w * silu(z)), which saves a kernel per layer.

At batch 1 one program per value head leaves most SMs idle (32 heads, 132 SMs), and the state
(64 KB per head) is the step's whole traffic. So the value columns, which the delta rule updates
independently, are split across programs; with the fused norm, which needs a head's whole output,
each program stores its rounded slice and bumps a per-head counter, and the head's last program
(the one that sees count = slices - 1) normalises the whole head and resets the counter. The
counters live in a zeroed int32 workspace (gated_delta_workspace); without one, no split.

Math and rounding points as transformers' torch_recurrent_gated_delta_rule (use_qk_l2norm_in_kernel
=True): beta is rounded to the model dtype (b.sigmoid() on model-dtype b), g is fp32, the output is
rounded to the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import NamedTuple

from ...settings import SETTINGS
from .._util import as_rows, check_contiguous, check_rows, fill_programs, next_pow2, pdl, pdl_wait
from ..conv import _check as _check_conv, conv1d_update_reference, conv1d_update_triton, conv_channels
from ..norm import gated_rmsnorm_reference


class ConvIn(NamedTuple):
    """The depthwise conv that precedes the step (conv1d_update's contract, with qkv its input):
    state [B, C, W] and weight [C, W] as conv1d_update takes them; counters: zeroed int32, >= B x NK
    (gated_delta_conv_counters), with which the Triton kernel does the conv itself
    (MODEL_FUSED_CONV=1); out [B, C]: the conv's output buffer where it runs as its own kernel."""
    state: torch.Tensor
    weight: torch.Tensor
    counters: torch.Tensor
    out: torch.Tensor


def gated_delta_conv_counters(batch: int, num_key_heads: int, device) -> torch.Tensor:
    """Per-(row, key head) arrival counters of the fused conv (ConvIn.counters); zero between steps."""
    return torch.zeros(batch * num_key_heads, dtype=torch.int32, device=device)


def _check_conv_in(conv: ConvIn, qkv, bsz, NK):
    if not isinstance(conv, ConvIn):
        raise TypeError(f"conv must be a ConvIn, got {type(conv).__name__}")
    st = conv.state
    if not isinstance(st, torch.Tensor) or st.dim() != 3 or tuple(st.shape[:2]) != (bsz, qkv.shape[1]):
        raise ValueError(f"conv.state must be [{bsz}, {qkv.shape[1]}, W] (a row per qkv row, a channel per qkv "
                         f"column), got {tuple(getattr(st, 'shape', ()))}")
    _check_conv(qkv, conv.state, conv.weight, conv.out)
    c = conv.counters
    if not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.numel() < bsz * NK or c.device != qkv.device:
        raise ValueError(f"conv.counters must be int32 with >= {bsz * NK} elements on {qkv.device} "
                         f"(gated_delta_conv_counters), got {getattr(c, 'dtype', type(c).__name__)} "
                         f"{getattr(c, 'numel', lambda: '')()}")


def _check(qkv, a, b, A_log, dt_bias, state, out, NK, K, V, z, norm_weight):
    bsz, nv = state.shape[0], state.shape[1]
    check_contiguous("state", state, (bsz, nv, K, V))
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32, got {state.dtype}")
    if nv % NK != 0:
        raise ValueError(f"value heads ({nv}) must be a multiple of key heads ({NK})")
    check_rows("qkv", qkv, bsz, 2 * NK * K + nv * V)
    check_rows("a", a, bsz, nv)
    check_rows("b", b, bsz, nv)
    out2 = as_rows("out", out, bsz, nv * V)
    if (z is None) != (norm_weight is None):
        raise ValueError("z and norm_weight go together (both for the fused gated norm, or neither)")
    if z is not None:
        check_rows("z", z, bsz, nv * V)
        if norm_weight.numel() != V:
            raise ValueError(f"norm_weight must have {V} elements, got {norm_weight.numel()}")
    return bsz, nv, out2


def gated_delta_workspace(batch: int, num_value_heads: int, device) -> torch.Tensor:
    """Per-(row, value head) arrival counters of the split fused-norm path; zero between steps."""
    return torch.zeros(batch * num_value_heads, dtype=torch.int32, device=device)


def gated_delta_step_reference(qkv, a, b, A_log, dt_bias, state, out, NK, K, V,
                               z=None, norm_weight=None, eps=1e-6, workspace=None, conv=None) -> None:
    """`workspace` is accepted for the Triton path's signature and unused. conv (ConvIn): qkv is the
    conv's input, conv1d_update_reference runs first (into conv.out)."""
    bsz, nv, out2 = _check(qkv, a, b, A_log, dt_bias, state, out, NK, K, V, z, norm_weight)
    if conv is not None:
        _check_conv_in(conv, qkv, bsz, NK)
        conv1d_update_reference(qkv, conv.state, conv.weight, conv.out)
        qkv = conv.out
    dtype = qkv.dtype
    q = qkv[:, : NK * K].reshape(bsz, NK, K).float()
    k = qkv[:, NK * K: 2 * NK * K].reshape(bsz, NK, K).float()
    v = qkv[:, 2 * NK * K: 2 * NK * K + nv * V].reshape(bsz, nv, V).float()
    rep = nv // NK
    q = q.repeat_interleave(rep, dim=1)
    k = k.repeat_interleave(rep, dim=1)
    beta = b.sigmoid().float()
    g = -A_log.float().exp() * torch.nn.functional.softplus(a.float() + dt_bias)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q / (K ** 0.5)
    s = state * g.exp()[..., None, None]
    kv = (s * k.unsqueeze(-1)).sum(dim=-2)
    delta = (v - kv) * beta.unsqueeze(-1)
    s = s + k.unsqueeze(-1) * delta.unsqueeze(-2)
    o = (s * q.unsqueeze(-1)).sum(dim=-2)
    state.copy_(s)
    o = o.to(dtype).reshape(bsz, nv * V)
    if z is None:
        out2.copy_(o)
    else:
        gated_rmsnorm_reference(o, z, norm_weight, eps, out2)


@triton.jit
def _gated_delta_kernel(qkv_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, state_ptr, out_ptr, z_ptr, nw_ptr, cnt_ptr,
                        NK, NV, K, V, q_div, eps, stride_qkv, stride_a, stride_b, stride_out, stride_z,
                        FUSE_NORM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_VH: tl.constexpr, USE_GDC: tl.constexpr,
                        cs_ptr, cw_ptr, ccnt_ptr, W, CONV: tl.constexpr, BLOCK_W: tl.constexpr):
    """CONV: qkv is the conv's input; the kernel does conv1d_update for its channels (q and k of
    its key head, its slice of v) from the conv state cs [B, C, W] and weight cw [C, W]. The v
    slice is this program's alone; q and k are read by all the programs of the key head, so their
    new state is stored by the last of them to arrive at the (row, key head) counter."""
    pdl_wait(USE_GDC)
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    row = pid // NV
    vh = pid % NV
    kh = vh // (NV // NK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    base = qkv_ptr + row * stride_qkv
    if CONV:
        C = 2 * NK * K + NV * V
        cdt = qkv_ptr.dtype.element_ty   # the conv's output dtype where it runs on its own
        s_row = cs_ptr + row.to(tl.int64) * C * W
        q, q_new, q_ptrs, q_m = conv_channels(base, s_row, cw_ptr, kh * K + offs_k, mk, W, BLOCK_W, cdt)
        k, k_new, k_ptrs, k_m = conv_channels(base, s_row, cw_ptr, NK * K + kh * K + offs_k, mk, W, BLOCK_W, cdt)
        v, v_new, v_ptrs, v_m = conv_channels(base, s_row, cw_ptr, 2 * NK * K + vh * V + offs_v, mv, W, BLOCK_W,
                                              cdt)
        sdt = cs_ptr.dtype.element_ty
        tl.debug_barrier()   # every thread has read the old state before any overwrites it, or the release
        tl.store(v_ptrs, v_new.to(sdt), mask=v_m)
        arrived = tl.atomic_add(ccnt_ptr + row * NK + kh, 1, sem="acq_rel")
        if arrived == (NV // NK) * tl.num_programs(1) - 1:   # every reader of this key head's old q/k state is done
            tl.store(q_ptrs, q_new.to(sdt), mask=q_m)
            tl.store(k_ptrs, k_new.to(sdt), mask=k_m)
            tl.atomic_xchg(ccnt_ptr + row * NK + kh, 0)
    else:
        q = tl.load(base + kh * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(base + NK * K + kh * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(base + 2 * NK * K + vh * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # beta = sigmoid(b) rounded to the model dtype; g = -exp(A_log) * softplus(a + dt_bias), fp32
    bb = tl.load(b_ptr + row * stride_b + vh).to(tl.float32)
    beta = tl.sigmoid(bb).to(b_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(a_ptr + row * stride_a + vh).to(tl.float32) + tl.load(dtb_ptr + vh).to(tl.float32)
    ex = tl.exp(x)
    sp_small = ex * (1.0 - ex * (0.5 - ex * (1.0 / 3.0 - ex * 0.25)))  # log1p(e) for small e
    sp = tl.where(x > 20.0, x, tl.where(ex < 1e-2, sp_small, tl.log(1.0 + ex)))
    g = -tl.exp(tl.load(alog_ptr + vh).to(tl.float32)) * sp
    # L2 norms (fp32), q scale
    q = q * tl.math.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
    q = q / q_div
    k = k * tl.math.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    # state [K, V] of this (row, value head), fp32, updated in place
    s_ptrs = state_ptr + (pid.to(tl.int64) * K + offs_k[:, None]) * V + offs_v[None, :]
    m2 = mk[:, None] & mv[None, :]
    s = tl.load(s_ptrs, mask=m2, other=0.0)
    s = s * tl.exp(g)
    kv = tl.sum(s * k[:, None], axis=0)
    delta = (v - kv) * beta
    s = s + k[:, None] * delta[None, :]
    tl.store(s_ptrs, s, mask=m2)
    o = tl.sum(s * q[:, None], axis=0)
    o = o.to(dt).to(tl.float32)
    head_out = out_ptr + row * stride_out + vh * V
    if FUSE_NORM:
        if SPLIT:
            # publish the rounded slice; the head's last program normalises the whole head
            tl.store(head_out + offs_v, o.to(dt), mask=mv)
            tl.debug_barrier()   # every thread's store before the (one-thread) release below
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:
                tl.debug_barrier()
                offs_h = tl.arange(0, BLOCK_VH)
                mh = offs_h < V
                oh = tl.load(head_out + offs_h, mask=mh, other=0.0, cache_modifier=".cg").to(tl.float32)
                _gated_norm_store(oh, offs_h, mh, head_out, z_ptr + row * stride_z + vh * V, nw_ptr, V, eps)
                tl.atomic_xchg(cnt_ptr + pid, 0)
        else:
            _gated_norm_store(o, offs_v, mv, head_out, z_ptr + row * stride_z + vh * V, nw_ptr, V, eps)
    else:
        tl.store(head_out + offs_v, o.to(dt), mask=mv)


@triton.jit
def _gated_norm_store(o, offs, mask, out_ptrs, z_ptrs, nw_ptr, V, eps):
    """out = (norm(o) * w) * silu(z) over one head's V outputs, with the reference's roundings."""
    dt = out_ptrs.dtype.element_ty
    var = tl.sum(tl.where(mask, o * o, 0.0), axis=0) / V
    hn = (o * tl.math.rsqrt(var + eps)).to(dt).to(tl.float32)
    w = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hw = (w * hn).to(dt).to(tl.float32)
    zz = tl.load(z_ptrs + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs + offs, (hw * (zz * tl.sigmoid(zz))).to(dt), mask=mask)


def gated_delta_step_triton(qkv, a, b, A_log, dt_bias, state, out, NK, K, V,
                            z=None, norm_weight=None, eps=1e-6, workspace=None, block_v=None, conv=None) -> None:
    """`workspace` (gated_delta_workspace) lets the fused-norm path split value columns too;
    `block_v` overrides the split (tests). conv (ConvIn): as the reference; in this kernel with
    MODEL_FUSED_CONV=1, else conv1d_update_triton first."""
    bsz, nv, out2 = _check(qkv, a, b, A_log, dt_bias, state, out, NK, K, V, z, norm_weight)
    if conv is not None:
        _check_conv_in(conv, qkv, bsz, NK)
        if not SETTINGS.fused_conv:
            conv1d_update_triton(qkv, conv.state, conv.weight, conv.out)
            qkv, conv = conv.out, None
    fuse = z is not None
    if workspace is not None and (workspace.dtype != torch.int32 or workspace.numel() < bsz * nv):
        raise ValueError(f"workspace must be int32 with >= {bsz * nv} elements (gated_delta_workspace), "
                         f"got {workspace.dtype} {workspace.numel()}")
    block_k = next_pow2(K)
    block_v = next_pow2(V) if block_v is None else block_v
    if block_v != next_pow2(block_v) or block_v < 1:
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    fill = fill_programs(state)
    if (not fuse or workspace is not None) and bsz * nv < fill:
        # split the value columns across programs (they are independent) to fill the GPU
        while block_v > 32 and bsz * nv * triton.cdiv(V, block_v) < fill:
            block_v //= 2
    split = fuse and triton.cdiv(V, block_v) > 1
    if split and workspace is None:
        raise ValueError(f"block_v={block_v} < V={V} with the fused norm needs the counter workspace")
    warps = 8 if block_k * block_v >= 8192 else 4
    grid = (bsz * nv, triton.cdiv(V, block_v))
    zt = z if fuse else out2
    cnt = workspace if split else state
    _gated_delta_kernel[grid](qkv, a, b, A_log, dt_bias, state, out2, zt, norm_weight if fuse else A_log, cnt,
                              NK, nv, K, V, float(K ** 0.5), float(eps), qkv.stride(0), a.stride(0),
                              b.stride(0), out2.stride(0), zt.stride(0),
                              FUSE_NORM=fuse, SPLIT=split, BLOCK_K=block_k, BLOCK_V=block_v,
                              BLOCK_VH=next_pow2(V), num_warps=warps, **pdl(state),
                              cs_ptr=conv.state if conv else state, cw_ptr=conv.weight if conv else state,
                              ccnt_ptr=conv.counters if conv else cnt, W=conv.state.shape[2] if conv else 1,
                              CONV=conv is not None, BLOCK_W=next_pow2(conv.state.shape[2]) if conv else 1)
