"""Per-row bookkeeping of the decode loop on the device: after each sampling step, record the rows'
new tokens, stop rows on end-of-sequence or at their budget, advance positions, and set the flag
that keeps a conditional WHILE node looping (model/device_loop.py).

Layout of `ctl` (int64, contiguous, on the device; the host fills it once per request):
  ctl[0:B]      positions   the position of each row's next step (all rows advance together, as
                            the per-step generator advances them)
  ctl[B:2B]     active      1 while the row still generates
  ctl[2B:3B]    count       tokens the row has produced
  ctl[3B:4B]    budget      the row's max_new_tokens
  ctl[4B:4B+E]  eos         end-of-sequence ids, padded with -1 (never a token)
  ctl[4B+E]     step        ring rows written so far
`ring` [R, B] int32 (pinned, mapped host memory: the host reads it while the loop runs) gets one
row per step in which some row was active: the token of each active row, -1 for stopped rows.
A step after every row stopped (the fixed-K graphs run whole) records and advances nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2, pdl, pdl_wait

EOS_SLOTS = 16    # end-of-sequence ids a request may name


def ctl_numel(batch: int) -> int:
    return 4 * batch + EOS_SLOTS + 1


def _check(tokens, ctl, ring, flag):
    if tokens.dim() != 1 or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 [B], got {tokens.dtype} {tuple(tokens.shape)}")
    B = tokens.shape[0]
    if ctl.dtype != torch.int64 or tuple(ctl.shape) != (ctl_numel(B),) or not ctl.is_contiguous():
        raise ValueError(f"ctl must be a contiguous int64 [{ctl_numel(B)}] (4 x batch {B} + {EOS_SLOTS} + 1), "
                         f"got {ctl.dtype} {tuple(ctl.shape)}")
    if ring.dtype != torch.int32 or ring.dim() != 2 or ring.shape[1] != B or not ring.is_contiguous():
        raise ValueError(f"ring must be a contiguous int32 [R, {B}], got {ring.dtype} {tuple(ring.shape)}")
    if flag.dtype != torch.int32 or flag.numel() < 1:
        raise ValueError(f"flag must be an int32 tensor of >= 1 element, got {flag.dtype} {tuple(flag.shape)}")
    return B


def advance_rows_reference(tokens: torch.Tensor, ctl: torch.Tensor, ring: torch.Tensor, flag: torch.Tensor) -> None:
    B = _check(tokens, ctl, ring, flag)
    pos, active, count, budget = (ctl[i * B:(i + 1) * B] for i in range(4))
    eos = ctl[4 * B:4 * B + EOS_SLOTS]
    step = ctl[4 * B + EOS_SLOTS:]
    was = active != 0
    if not bool(was.any()):
        flag[0] = 0
        return
    s = int(step[0])
    is_eos = (tokens[:, None] == eos[None, :]).any(1)
    count += was.to(count.dtype)
    still = was & ~is_eos & (count < budget)
    if s < ring.shape[0]:
        ring[s] = torch.where(was, tokens, torch.full_like(tokens, -1)).to(torch.int32)
    active.copy_(still.to(active.dtype))
    pos += 1
    step += 1
    flag[0] = int(still.any())


@triton.jit
def _advance_rows_kernel(tokens, ctl, ring, flag, B, R, BLOCK_B: tl.constexpr, EOS: tl.constexpr,
                         USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    rows = tl.arange(0, BLOCK_B)
    m = rows < B
    act = tl.load(ctl + B + rows, mask=m, other=0)
    if tl.max(act, 0) > 0:
        tok = tl.load(tokens + rows, mask=m, other=0)
        eos = tl.load(ctl + 4 * B + tl.arange(0, EOS))
        is_eos = tl.sum((tok[:, None] == eos[None, :]).to(tl.int32), 1) > 0
        cnt = tl.load(ctl + 2 * B + rows, mask=m, other=0) + act
        bud = tl.load(ctl + 3 * B + rows, mask=m, other=0)
        still = (act != 0) & (~is_eos) & (cnt < bud)
        s = tl.load(ctl + 4 * B + EOS)
        # write-through: the host polls this mapped memory while the loop runs
        tl.store(ring + s * B + rows, tl.where(act != 0, tok, -1).to(tl.int32), mask=m & ((rows * 0 + s) < R),
                 cache_modifier=".wt")
        tl.store(ctl + 2 * B + rows, cnt, mask=m)
        tl.store(ctl + B + rows, still.to(tl.int64), mask=m)
        pos = tl.load(ctl + rows, mask=m, other=0)
        tl.store(ctl + rows, pos + 1, mask=m)
        tl.store(ctl + 4 * B + EOS, s + 1)
        tl.store(flag, (tl.sum(still.to(tl.int32), 0) > 0).to(tl.int32))
    else:
        tl.store(flag, 0)


def advance_rows_triton(tokens: torch.Tensor, ctl: torch.Tensor, ring: torch.Tensor, flag: torch.Tensor) -> None:
    B = _check(tokens, ctl, ring, flag)
    _advance_rows_kernel[(1,)](tokens, ctl, ring, flag, B, ring.shape[0], BLOCK_B=max(16, next_pow2(B)),
                               EOS=EOS_SLOTS, num_warps=1, **pdl(tokens))
