"""Depthwise causal conv1d (Gated DeltaNet): the decode update, as transformers' causal_conv1d_update,
and its prefill form over a chunk of tokens of one sequence.

conv_state[B, C, W] holds the last W pre-conv inputs (model dtype). One step shifts the new input
in, then out = silu(sum_j weight[c, j] * state[b, c, j]): the conv result is rounded to the model
dtype before the SiLU, like the eager path.

Prefill (info = (row, start, n_valid), see the prefill contract): the same as n_valid decode steps
on row `row`, in one pass. With seq = [old state's W columns, x[0..n_valid-1]] along time,
out[t] = silu(sum_j w[:, j] * seq[t + 1 + j]) and the new state is seq's last W columns. The kernel's
grid is (channel blocks, token blocks): every output is independent, so the grid just covers
[T, C] (x is read ~once, from L2 for the W-1 overlapping rows). Only token block 0 reads the old
state (BLOCK_T >= W - 1), so its programs also write the new state, after a barrier: no program
can read a state column another has already overwritten. Fully padded token blocks exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_contiguous, check_info, check_rows, next_pow2, pdl, pdl_wait


def _check(x, conv_state, weight, out):
    b, c, w = conv_state.shape
    check_rows("x", x, b, c)
    check_rows("out", out, b, c)
    check_contiguous("conv_state", conv_state, (b, c, w))
    check_contiguous("weight", weight, (c, w))
    return b, c, w


def conv1d_update_reference(x, conv_state, weight, out) -> None:
    """conv_state <- [conv_state[:, :, 1:], x]; out = silu(sum_j weight[:, j] * conv_state[:, :, j])."""
    _check(x, conv_state, weight, out)
    new = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1).to(weight.dtype)
    conv_state.copy_(new[:, :, 1:])
    y = torch.nn.functional.conv1d(new, weight.unsqueeze(1), None, padding=0, groups=weight.shape[0])
    out.copy_(torch.nn.functional.silu(y[:, :, -1]).to(out.dtype))


@triton.jit
def conv_channels(x_ptr, s_row_ptr, w_ptr, ch, mc, W, BLOCK_W: tl.constexpr, DT: tl.constexpr):
    """One decode step of the channels ch (mask mc) of one row: x_ptr and s_row_ptr point at the
    row's input and its [C, W] state. Returns (out as fp32: the conv rounded to DT, SiLU, rounded
    to DT; the new state tile [channels, BLOCK_W]; its pointers and mask) so that the caller
    stores the state once every reader of the old one is done."""
    offs_w = tl.arange(0, BLOCK_W)
    m2 = mc[:, None] & (offs_w < W)[None, :]
    s_ptrs = s_row_ptr + ch.to(tl.int64)[:, None] * W + offs_w[None, :]
    # shifted state: column j takes old column j + 1, the last column takes x
    shifted = tl.load(s_ptrs + 1, mask=mc[:, None] & (offs_w[None, :] < W - 1), other=0.0)
    x = tl.load(x_ptr + ch, mask=mc, other=0.0)
    new = tl.where(offs_w[None, :] == W - 1, x[:, None].to(shifted.dtype), shifted)
    w = tl.load(w_ptr + ch[:, None] * W + offs_w[None, :], mask=m2, other=0.0)
    y = tl.sum(new.to(tl.float32) * w.to(tl.float32), axis=1).to(DT).to(tl.float32)
    y = (y * tl.sigmoid(y)).to(DT).to(tl.float32)
    return y, new, s_ptrs, m2


@triton.jit
def _conv1d_update_kernel(x_ptr, state_ptr, w_ptr, out_ptr, C, W, stride_x, stride_o,
                          BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    dt = out_ptr.dtype.element_ty
    y, new, s_ptrs, m2 = conv_channels(x_ptr + row * stride_x, state_ptr + row.to(tl.int64) * C * W, w_ptr, offs_c,
                                       mc, W, BLOCK_W, dt)
    tl.debug_barrier()  # every lane has read the old state before any lane overwrites it
    tl.store(s_ptrs, new.to(state_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + row * stride_o + offs_c, y.to(dt), mask=mc)


def conv1d_update_triton(x, conv_state, weight, out) -> None:
    b, c, w = _check(x, conv_state, weight, out)
    block_c = min(512, next_pow2(c))
    grid = (b, triton.cdiv(c, block_c))
    _conv1d_update_kernel[grid](x, conv_state, weight, out, c, w, x.stride(0), out.stride(0),
                                BLOCK_C=block_c, BLOCK_W=next_pow2(w), num_warps=4, **pdl(x))


# ---- prefill: a chunk of tokens of one sequence ------------------------------------------------

def _check_prefill(x, conv_state, weight, out, info):
    if conv_state.dim() != 3:
        raise ValueError(f"conv_state must be [B, C, W], got shape {tuple(conv_state.shape)}")
    b, c, w = conv_state.shape
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [T >= 1, {c}], got shape {tuple(x.shape)}")
    t = x.shape[0]
    check_rows("x", x, t, c)
    check_rows("out", out, t, c)
    check_contiguous("conv_state", conv_state, (b, c, w))
    check_contiguous("weight", weight, (c, w))
    check_info(info, x.device)
    return t, c, w


def conv1d_prefill_reference(x, conv_state, weight, out, info) -> None:
    """n_valid conv1d_update steps of row info[0] in one pass: out[:n_valid] and conv_state[row]."""
    t, c, w = _check_prefill(x, conv_state, weight, out, info)
    row, _, n = info.tolist()
    if not (0 <= row < conv_state.shape[0] and 1 <= n <= t):
        raise ValueError(f"info = (row {row}, start, n_valid {n}) out of range for B={conv_state.shape[0]}, T={t}")
    seq = torch.cat([conv_state[row], x[:n].t()], dim=-1).to(weight.dtype)   # [C, W + n]
    conv_state[row].copy_(seq[:, -w:])
    y = torch.nn.functional.conv1d(seq.unsqueeze(0), weight.unsqueeze(1), None, padding=0, groups=c)[0, :, 1:]
    out[:n].copy_(torch.nn.functional.silu(y).t().to(out.dtype))


@triton.jit
def _conv1d_prefill_kernel(x_ptr, state_ptr, w_ptr, out_ptr, info_ptr, C, stride_x, stride_o,
                           W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                           USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    cb = tl.program_id(0)
    tb = tl.program_id(1)
    row = tl.load(info_ptr)
    n_valid = tl.load(info_ptr + 2).to(tl.int32)
    if tb * BLOCK_T >= n_valid:
        return
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    st = state_ptr + (row * C + offs_c).to(tl.int64) * W     # this row's state, one pointer per channel
    sdt = state_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        # seq[s] with s = t + 1 + j: old state column s where s < W, else x row s - W (< n_valid)
        s = offs_t + 1 + j
        xr = s - W
        in_x = (xr >= 0) & (xr < n_valid)
        xv = tl.load(x_ptr + xr[:, None] * stride_x + offs_c[None, :], mask=in_x[:, None] & mc[None, :], other=0.0)
        sv = tl.load(st[None, :] + s[:, None], mask=(s < W)[:, None] & mc[None, :], other=0.0)
        val = tl.where((xr >= 0)[:, None], xv.to(sdt), sv)    # the decode op casts x to the state dtype
        wj = tl.load(w_ptr + offs_c * W + j, mask=mc, other=0.0)
        acc += val.to(tl.float32) * wj.to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt).to(tl.float32)      # the conv result is rounded before the SiLU
    y = y * tl.sigmoid(y)
    tl.store(out_ptr + offs_t[:, None] * stride_o + offs_c[None, :], y.to(dt),
             mask=(offs_t < n_valid)[:, None] & mc[None, :])
    if tb == 0:
        # only token block 0 read the old state: it writes the new one, seq[n_valid + j] for j < W
        offs_w = tl.arange(0, BLOCK_W)
        mw = offs_w < W
        sn = n_valid + offs_w
        xrn = sn - W
        xvn = tl.load(x_ptr + xrn[None, :] * stride_x + offs_c[:, None],
                     mask=mc[:, None] & (mw & (xrn >= 0))[None, :], other=0.0)
        svn = tl.load(st[:, None] + sn[None, :], mask=mc[:, None] & (mw & (sn < W))[None, :], other=0.0)
        new = tl.where((xrn >= 0)[None, :], xvn.to(sdt), svn)
        tl.debug_barrier()  # every lane has read the old state before any lane overwrites it
        tl.store(st[:, None] + offs_w[None, :], new, mask=mc[:, None] & mw[None, :])


def conv1d_prefill_triton(x, conv_state, weight, out, info) -> None:
    """As conv1d_prefill_reference; info is read on the device only (capturable)."""
    t, c, w = _check_prefill(x, conv_state, weight, out, info)
    # 64 channels x 32 tokens, 4 warps: H100 at 35b-a3b widths (8,192 channels), 171 -> 131 us at
    # 4,096 tokens and 86 -> 60 us at 1,024 against 128 x 64 (a sweep of 64..256 x 16..128, 4/8 warps)
    block_c = min(64, next_pow2(c))
    block_t = max(min(32, next_pow2(t)), next_pow2(w))   # >= W - 1: later token blocks never read the state
    grid = (triton.cdiv(c, block_c), triton.cdiv(t, block_t))
    _conv1d_prefill_kernel[grid](x, conv_state, weight, out, info, c, x.stride(0), out.stride(0),
                                 W=w, BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_W=next_pow2(w),
                                 num_warps=4, **pdl(x))
