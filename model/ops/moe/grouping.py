"""Grouping the (token, slot) pairs of a chunk by expert, on the device, for the grouped GEMMs.

Pair p = token * k + slot chose expert ids[p]. Three kernels, no atomics, no host sync:
  1. count:   per chunk of CHUNK pairs, how many go to each expert            -> counts [C, E]
  2. scan:    expert totals (every program alike), each expert's rows padded up to BLOCK_M, the
              sorted row of every (chunk, expert)'s first pair (a slice of experts a program) and
              the block -> (expert, valid rows) table (a tile of blocks a program; blocks past
              the used count get 0 rows)                                       -> base [C, E], blocks
  3. scatter: each pair to its sorted row (ascending pair index within an expert) -> sorted_pairs
Rows of a block past its valid count are never written (the GEMMs mask them). With `info`, pairs
of padding tokens (t >= n_valid, read on the device) are not grouped at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._util import next_pow2, pdl, pdl_wait


def pair_chunk(n_pairs: int) -> int:
    """Pairs per program of the count/scatter kernels (scatter ranks them with a [C, C] compare)."""
    return min(128, max(16, next_pow2(n_pairs)))


def max_blocks(n_pairs: int, e: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / BLOCK_M): each non-empty expert wastes < one block."""
    return triton.cdiv(n_pairs, block_m) + min(e, n_pairs)


@triton.jit
def _valid_pairs(info_ptr, NPAIRS, TOPK, HAS_INFO: tl.constexpr):
    """Pairs 0 .. n-1 are real; pairs of padding tokens (t >= n_valid) come after them."""
    if HAS_INFO:
        n_valid = tl.load(info_ptr + 2).to(tl.int32)
        return tl.maximum(tl.minimum(n_valid * TOPK, NPAIRS), 0)
    else:
        return NPAIRS + 0


@triton.jit
def _moe_count_kernel(ids_ptr, info_ptr, counts_ptr, NPAIRS, TOPK, E, HAS_INFO: tl.constexpr,
                      CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    c = tl.program_id(0)
    n = _valid_pairs(info_ptr, NPAIRS, TOPK, HAS_INFO)
    offs_e = tl.arange(0, BLOCK_E)
    hist = tl.zeros([BLOCK_E], tl.int32)
    for s in range(0, CHUNK, SUB):   # one-hot sums in slices keep the [SUB, E] tile small
        p = c * CHUNK + s + tl.arange(0, SUB)
        ex = tl.load(ids_ptr + p, mask=p < n, other=-1)
        hist += tl.sum((ex[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E + offs_e, hist, mask=offs_e < E)


@triton.jit
def _moe_scan_kernel(counts_ptr, base_ptr, block_ptr, NCHUNKS, E, NBLOCKS, BLOCK_M: tl.constexpr,
                     BLOCK_E: tl.constexpr, TILE_C: tl.constexpr, SLICE_E: tl.constexpr, TILE_CS: tl.constexpr,
                     TILE_B: tl.constexpr, USE_GDC: tl.constexpr):
    """Program j: every expert's total (each program alike: the counts are L2-resident), then the
    bases of experts j * SLICE_E .. and the blocks j * TILE_B .. of the table."""
    pdl_wait(USE_GDC)
    j = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    me = offs_e < E
    offs_c = tl.arange(0, TILE_C)
    total = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, NCHUNKS, TILE_C):
        m = ((c0 + offs_c) < NCHUNKS)[:, None] & me[None, :]
        cnt = tl.load(counts_ptr + (c0 + offs_c)[:, None] * E + offs_e[None, :], mask=m, other=0)
        total += tl.sum(cnt, axis=0)
    nblk = (total + BLOCK_M - 1) // BLOCK_M
    blk_end = tl.cumsum(nblk, axis=0)
    blk_start = blk_end - nblk
    if j * SLICE_E < E:
        # next free sorted row of each expert of the slice, then down the chunks
        offs_s = j * SLICE_E + tl.arange(0, SLICE_E)
        ms = offs_s < E
        carry = tl.sum(tl.where(offs_e[None, :] == offs_s[:, None], blk_start[None, :], 0), axis=1) * BLOCK_M
        offs_cs = tl.arange(0, TILE_CS)
        for c0 in range(0, NCHUNKS, TILE_CS):
            m = ((c0 + offs_cs) < NCHUNKS)[:, None] & ms[None, :]
            ptrs = (c0 + offs_cs)[:, None] * E + offs_s[None, :]
            cnt = tl.load(counts_ptr + ptrs, mask=m, other=0)
            tl.store(base_ptr + ptrs, carry[None, :] + tl.cumsum(cnt, axis=0) - cnt, mask=m)
            carry += tl.sum(cnt, axis=0)
    # block b belongs to the expert whose block range holds it: the number of experts ending at or before b
    bb = j * TILE_B + tl.arange(0, TILE_B)
    ex = tl.sum(((blk_end[None, :] <= bb[:, None]) & me[None, :]).to(tl.int32), axis=1)
    sel = offs_e[None, :] == ex[:, None]
    start = tl.sum(tl.where(sel, blk_start, 0), axis=1)
    tot = tl.sum(tl.where(sel, total, 0), axis=1)
    used = ex < E
    rows = tl.where(used, tl.minimum(tot - (bb - start) * BLOCK_M, BLOCK_M), 0)
    mb = bb < NBLOCKS
    tl.store(block_ptr + bb * 2, tl.where(used, ex, 0), mask=mb)
    tl.store(block_ptr + bb * 2 + 1, rows, mask=mb)


@triton.jit
def _moe_scatter_kernel(ids_ptr, info_ptr, base_ptr, sorted_ptr, NPAIRS, TOPK, E, HAS_INFO: tl.constexpr,
                        CHUNK: tl.constexpr, USE_GDC: tl.constexpr):
    pdl_wait(USE_GDC)
    c = tl.program_id(0)
    n = _valid_pairs(info_ptr, NPAIRS, TOPK, HAS_INFO)
    offs = tl.arange(0, CHUNK)
    p = c * CHUNK + offs
    ex = tl.load(ids_ptr + p, mask=p < n, other=-1)
    ok = (ex >= 0) & (ex < E)            # an id outside [0, E) is counted nowhere, so stored nowhere
    ex = tl.where(ok, ex, -1)
    # rank among this chunk's earlier pairs of the same expert
    same = (ex[:, None] == ex[None, :]) & (offs[None, :] < offs[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(base_ptr + c * E + ex, mask=ok, other=0)
    tl.store(sorted_ptr + base + rank, p, mask=ok)


def group_pairs(ids: torch.Tensor, info, n_pairs: int, num_experts: int, block_m: int, counts: torch.Tensor,
                base: torch.Tensor, blocks: torch.Tensor, sorted_pairs: torch.Tensor) -> None:
    """Launch the three kernels. ids: int32 [T, k] (n_pairs = T * k); counts/base: int32 with
    >= ceil(n_pairs / pair_chunk(n_pairs)) * E elements; blocks: int32 [>= max_blocks, 2];
    sorted_pairs: int32 with >= max_blocks * block_m elements (the caller checks the sizes)."""
    k, e = ids.shape[1], num_experts
    chunk = pair_chunk(n_pairs)
    n_chunks = triton.cdiv(n_pairs, chunk)
    block_e = next_pow2(e)
    has_info = info is not None
    opts = pdl(ids)
    _moe_count_kernel[(n_chunks,)](ids, info, counts, n_pairs, k, e, HAS_INFO=has_info, CHUNK=chunk,
                                   SUB=min(chunk, max(16, 8192 // block_e)), BLOCK_E=block_e, num_warps=4, **opts)
    n_blocks = max_blocks(n_pairs, e, block_m)
    slice_e, tile_b = min(block_e, 32), max(1, min(64, 16384 // block_e))
    n_prog = max(triton.cdiv(e, slice_e), triton.cdiv(n_blocks, tile_b))
    _moe_scan_kernel[(n_prog,)](counts, base, blocks, n_chunks, e, n_blocks,
                                BLOCK_M=block_m, BLOCK_E=block_e, TILE_C=max(1, min(16, 8192 // block_e)),
                                SLICE_E=slice_e, TILE_CS=64, TILE_B=tile_b, num_warps=8, **opts)
    _moe_scatter_kernel[(n_chunks,)](ids, info, base, sorted_pairs, n_pairs, k, e, HAS_INFO=has_info,
                                     CHUNK=chunk, num_warps=4, **opts)
