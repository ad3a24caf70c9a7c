"""Depthwise causal conv1d decode update (Gated DeltaNet), as transformers' causal_conv1d_update.

conv_state[B, C, W] holds the last W pre-conv inputs (model dtype). One step shifts the new input
in, then out = silu(sum_j weight[c, j] * state[b, c, j]): the conv result is rounded to the model
dtype before the SiLU, like the eager path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_contiguous, check_rows, next_pow2, pdl, pdl_wait


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
def _conv1d_update_kernel(x_ptr, state_ptr, w_ptr, out_ptr, C, W, stride_x, stride_o,
                          BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    row = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    mc = offs_c < C
    mw = offs_w < W
    m2 = mc[:, None] & mw[None, :]
    s_ptrs = state_ptr + (row * C + offs_c)[:, None].to(tl.int64) * W + offs_w[None, :]
    # shifted state: column j takes old column j + 1, the last column takes x
    shifted = tl.load(s_ptrs + 1, mask=mc[:, None] & (offs_w[None, :] < W - 1), other=0.0)
    x = tl.load(x_ptr + row * stride_x + offs_c, mask=mc, other=0.0)
    is_last = offs_w[None, :] == W - 1
    new = tl.where(is_last, x[:, None].to(shifted.dtype), shifted)
    w = tl.load(w_ptr + offs_c[:, None] * W + offs_w[None, :], mask=m2, other=0.0)
    acc = tl.sum(new.to(tl.float32) * w.to(tl.float32), axis=1)
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt).to(tl.float32)
    y = y * tl.sigmoid(y)
    tl.debug_barrier()  # every lane has read the old state before any lane overwrites it
    tl.store(s_ptrs, new.to(state_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + row * stride_o + offs_c, y.to(dt), mask=mc)


def conv1d_update_triton(x, conv_state, weight, out) -> None:
    b, c, w = _check(x, conv_state, weight, out)
    block_c = min(512, next_pow2(c))
    grid = (b, triton.cdiv(c, block_c))
    _conv1d_update_kernel[grid](x, conv_state, weight, out, c, w, x.stride(0), out.stride(0),
                                BLOCK_C=block_c, BLOCK_W=next_pow2(w), num_warps=4, **pdl(x))
